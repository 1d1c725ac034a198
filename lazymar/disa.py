"""DiSA, diffusion step annealing (arXiv 2505.20297): fewer head steps as generation proceeds.

Later MAR steps predict tokens that the tokens around them already constrain, so the head's
distribution is narrower and fewer denoising steps sample it as well. The head's step count falls from
``upper_steps`` at the first MAR step to ``lower_steps`` at the last, along an annealing curve over
progress ``step / (num_steps - 1)``.

As released, every respaced timestep is also clamped to at most 950 (``max_timestep``), merging those
that land on the same value (50 steps become 48): the first step starts at t = 950 instead of 999,
which keeps it from amplifying the head's eps error by ``1 / sqrt(alpha_bar_999)``. The release's
``default`` sampler (no annealing) does not clamp; :func:`lazymar.released.released_config` maps it.

Composition: DiSA sets the step count of every head call except the one GtR's FTS gives its
detailed tokens (which keep ``fts_steps``): with GtR on, DiSA's annealing replaces GtR's stage-aware
counts, both being "fewer steps later", and runs over GtR's own step count. The clamp applies to
every head call of the run. The head cache composes (it works inside each call).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lazymar.plan import StepPlan
from lazymar.technique import Technique

ANNEALING = ("linear", "cosine", "two-stage", "constant")
RELEASED_MAX_TIMESTEP = 950


@dataclass(frozen=True)
class DiSAConfig:
    """DiSA settings (defaults: the release's README setting for MAR-B/L/H).

    Attributes:
        upper_steps: head steps at the first MAR step. Release README: 50.
        lower_steps: head steps at the last MAR step. Release: 5.
        annealing: ``"linear"``, ``"cosine"`` (slow start and end), ``"two-stage"`` (upper for the first
            half of the steps, then lower) or ``"constant"`` (lower throughout).
        max_timestep: clamp of the respaced timesteps (release: 950); ``None`` does not clamp.
    """

    upper_steps: int = 50
    lower_steps: int = 5
    annealing: str = "linear"
    max_timestep: int | None = RELEASED_MAX_TIMESTEP

    def __post_init__(self) -> None:
        if self.lower_steps < 1:
            raise ValueError(f"lower_steps must be >= 1, got {self.lower_steps}")
        if self.upper_steps < self.lower_steps:
            raise ValueError(f"upper_steps ({self.upper_steps}) must be >= lower_steps ({self.lower_steps})")
        if self.upper_steps > 1000:
            raise ValueError(f"upper_steps must be <= 1000 (the head's training timesteps), got {self.upper_steps}")
        if self.annealing not in ANNEALING:
            raise ValueError(f"annealing must be one of {ANNEALING}, got {self.annealing!r}")
        if self.max_timestep is not None and not 0 <= self.max_timestep <= 999:
            raise ValueError(f"max_timestep must be None or in [0, 999], got {self.max_timestep}")


def disa_head_steps(step: int, num_steps: int, config: DiSAConfig) -> int:
    """Head steps at MAR ``step`` (0-based) of ``num_steps``: ``lower + index`` with the release's index
    into ``range(lower, upper + 1)`` (truncated toward zero, as released). A one-step run takes ``upper``."""
    span = config.upper_steps - config.lower_steps
    last = num_steps - 1
    if last == 0:
        return config.upper_steps
    if config.annealing == "linear":
        index = int((last - step) / last * span)
    elif config.annealing == "cosine":
        index = int((math.cos(math.pi * step / last) + 1) / 2 * span)
    elif config.annealing == "two-stage":
        index = span if step < last / 2 else 0
    else:
        index = 0
    return config.lower_steps + index


class DiSA(Technique):
    """Sets the step count (and clamp) of the step's head calls."""

    label = "DiSA"
    writes = frozenset({"head_steps", "max_timestep"})

    def __init__(self, model, config: DiSAConfig, accel=None) -> None:
        super().__init__(model)
        self.config = config

    def plan_head_steps(self, p: StepPlan) -> dict:
        return {"head_steps": disa_head_steps(p.step, p.num_steps, self.config),
                "max_timestep": self.config.max_timestep}
