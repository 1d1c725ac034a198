"""Interval guidance (eMIGM, arXiv 2503.07197): classifier-free guidance only on the steps whose masked
fraction lies in an interval; the others run the conditional half alone and sample unguided.

Why it saves work in MAR: with the linear guidance schedule the scale of a step is
``1 + (cfg - 1) * (1 - s)``, ``s`` the fraction of tokens still masked after the step, so the first
steps run an unconditional pass whose guidance scale is barely above 1 (at MAR's cosine schedule half
of the 64 steps leave more than 70% masked). Skipping it there halves those steps' transformer and head
rows. eMIGM guides when ``t_min < s <= t_max`` with a constant scale (its 256-px scripts use windows such
as (0.2, 0.4] for eMIGM-H at 16 steps); it was not measured on MAR there, and the windows that suit MAR's
linear ramp are for the planner to measure (:class:`lazymar.search_space.IntervalSpace`).

Here a step is guided when ``t_min <= s <= t_max`` (closed, so that the default ``t_min = 0`` keeps the
last step, ``s = 0``, guided, where MAR's linear scale is largest). A step's guidance decides its rows
(:data:`lazymar.plan.STEP_PHASES`' first phase), so everything that follows composes with it: the
condition cache only caches on guided steps, and a guided step after unguided ones runs unconditional
rows no cache holds, so the engine refreshes every cache there (``StepPlan.new_rows``). ReCAP's cheap
steps run over their full step's rows, so they follow its guidance. Unguided steps draw the head's noise
for one half only, so the random stream differs from plain MAR's: no plain twins (``guided`` is a
:data:`lazymar.technique.DRAW_FIELDS` field).
"""
from __future__ import annotations

from dataclasses import dataclass

from lazymar.plan import StepPlan
from lazymar.technique import Technique


@dataclass(frozen=True)
class IntervalGuidanceConfig:
    """Where guidance runs, as the fraction ``s`` of tokens still masked after a step.

    Attributes:
        t_min / t_max: a step is guided when ``t_min <= s <= t_max``. ``(0, 1)`` guides every step (plain
            MAR). The default skips guidance while more than 75% of the tokens are masked (with MAR-H's
            cfg 2.9 on the linear schedule, scales below about 1.5).
    """

    t_min: float = 0.0
    t_max: float = 0.75

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_min <= self.t_max <= 1.0:
            raise ValueError(f"interval guidance needs 0 <= t_min <= t_max <= 1, got t_min={self.t_min}, "
                             f"t_max={self.t_max}")

    @classmethod
    def from_scale(cls, min_scale: float, cfg: float, cfg_schedule: str = "linear") -> "IntervalGuidanceConfig":
        """Guidance on the steps whose scale is at least ``min_scale`` for guidance ``cfg`` on
        ``cfg_schedule``: on the linear schedule that is ``s <= 1 - (min_scale - 1) / (cfg - 1)``; on the
        constant one every step (``min_scale <= cfg``) or none is refused, since that is not an interval."""
        if cfg <= 1.0:
            raise ValueError(f"interval guidance by scale needs guidance on (cfg > 1), got cfg={cfg}")
        if cfg_schedule == "constant":
            if min_scale > cfg:
                raise ValueError(f"min_scale {min_scale} above the constant scale {cfg} leaves no step guided; "
                                 f"use cfg 1.0 to sample without guidance")
            return cls(0.0, 1.0)
        if cfg_schedule != "linear":
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        if not 1.0 <= min_scale <= cfg:
            raise ValueError(f"min_scale must be in [1, cfg={cfg}], got {min_scale}")
        return cls(0.0, 1.0 - (min_scale - 1.0) / (cfg - 1.0))

    def guides(self, masked_fraction: float) -> bool:
        return self.t_min <= masked_fraction <= self.t_max


class IntervalGuidance(Technique):
    """Decides each step's guidance: on inside the interval, off outside it (the conditional half only)."""

    label = "interval guidance"
    writes = frozenset({"guided"})

    def __init__(self, model, config: IntervalGuidanceConfig, accel=None) -> None:
        super().__init__(model)
        self.config = config
        self.guided: dict[int, bool] = {}  # step -> guided, for ReCAP's cheap steps

    def plan_guidance(self, p: StepPlan) -> dict:
        if not p.guided:  # guidance off for the whole run: nothing to decide
            return {}
        if p.reuses is not None:  # a cheap step runs over its full step's rows
            guided = self.guided[p.reuses]
        else:
            guided = self.config.guides(p.guidance_len / self.model.seq_len)
        self.guided[p.step] = guided
        return {"guided": guided}
