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


@dataclass(frozen=True)
class ConditionCacheConfig:
    """Condition cache settings. It has none beyond being on: which steps refresh is the policy's
    refresh schedule (shared with the token cache), as in the release."""


@dataclass
class ConditionCache:
    """Per-token residual ``uncond - cond`` (B, N, D) of the last decoder block, from the last refresh."""

    residual: torch.Tensor | None = None

    def store(self, out: torch.Tensor) -> None:
        """Record the residual from a refresh step's (2B, N, D) outputs, conditional half first."""
        cond, uncond = out.chunk(2, dim=0)
        self.residual = uncond - cond

    def complete(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, N, D) conditional outputs -> (2B, N, D) with the unconditional half rebuilt."""
        return torch.cat([cond, cond + self.residual], dim=0)
