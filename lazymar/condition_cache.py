"""LazyMAR condition cache: reuse the classifier-free-guidance residual instead of running the
unconditional half.

With guidance every MAR step runs the transformer twice (conditional and unconditional class). The
difference of the two outputs changes slowly across steps, so on cached steps only the conditional
half runs and the unconditional output of the last decoder block (before the final norm) is rebuilt
as ``cond + (uncond - cond)`` with the per-token residual stored at the last refresh step. With
guidance off there is no unconditional half and the cache does nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lazymar.plan import StepPlan
from lazymar.technique import Hidden, Technique
from models.indexing import gather_tokens


@dataclass(frozen=True)
class ConditionCacheConfig:
    """Condition cache settings. It has none beyond being on: which steps refresh is the acceleration
    config's refresh schedule (shared with the token cache), as in the release."""


@dataclass
class ConditionCacheState:
    """Per-token residual ``uncond - cond`` (B, N, D) of the last decoder block, from the last refresh."""

    residual: torch.Tensor | None = None

    def store(self, out: torch.Tensor) -> None:
        """Record the residual from a refresh step's (2B, N, D) outputs, conditional half first."""
        cond, uncond = out.chunk(2, dim=0)
        self.residual = uncond - cond

    def complete(self, cond: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, D) conditional outputs at ``positions`` (None: all) -> (2B, n, D) with the
        unconditional half rebuilt."""
        return torch.cat([cond, cond + gather_tokens(self.residual, positions)], dim=0)


class ConditionCache(Technique):
    """Runs the conditional half alone on steps that do not refresh, and rebuilds the other half.

    A step that runs over another step's transformer context (``StepPlan.reuses``: ReCAP's cheap steps)
    runs that step's rows and records nothing: the context holds those rows only.
    """

    label = "LazyMAR's condition cache"
    writes = frozenset({"halves", "uncond_refresh"})

    def __init__(self, model, config: ConditionCacheConfig, accel=None) -> None:
        super().__init__(model)
        self.state = ConditionCacheState()
        self.halves: dict[int, int] = {}  # step -> guidance halves it runs

    def plan_rows(self, p: StepPlan) -> dict:
        if not p.guided:
            return {}
        if p.reuses is not None:
            halves, record = self.halves[p.reuses], False
        else:
            halves, record = (2 if p.refresh else 1), p.refresh
        self.halves[p.step] = halves
        return {"halves": halves, "uncond_refresh": record}

    def complete(self, p: StepPlan, out: Hidden) -> Hidden:
        if not p.guided:
            return out
        if p.uncond_refresh:
            self.state.store(out.x)
            return out
        if p.halves == 1:
            return Hidden(self.state.complete(out.x, out.positions),
                          None if out.positions is None else out.positions.repeat(2, 1))
        return out
