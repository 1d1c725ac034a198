"""The composed acceleration configuration and its named presets.

An :class:`AccelConfig` switches each technique on (a config) or off (``None``): LazyMAR's three caches
(token, condition, diffusion head) with the refresh schedule the transformer caches share, GtR's
staged schedules (:mod:`lazymar.gtr`), MARche's cache-aware attention (:mod:`lazymar.marche`), DiSA's
head step annealing (:mod:`lazymar.disa`), ReCAP's cheap steps (:mod:`lazymar.recap`) and eMIGM's interval
guidance (:mod:`lazymar.interval_guidance`).
A technique is registered by its field here (:func:`technique`). Techniques compose where they decide
different parts of a step, or where one declares that it yields to the other (DiSA's annealing
replaces GtR's stage-aware head counts); where two would decide the same thing without such a rule,
the config is rejected with a message that names both (:func:`lazymar.technique.check_composition`).

``PRESETS['lazymar']`` is the released LazyMAR (schedules indexed by absolute step, as released);
``lazymar-scaled`` scales them with the step count; the single-cache presets are the paper's
ablations; ``lazymar-off`` has everything disabled and is plain MAR by construction (a test holds it
to that). ``gtr*`` and ``marche*`` are GtR, MARche and their ablations, ``disa`` the DiSA release's
README setting, ``recap`` the ReCAP release's MAR-H setting at any step count, ``interval`` guidance only
where at most 75% of the tokens are masked (not a paper's setting: eMIGM's windows are for its own models),
and ``+`` names combinations. The names the acceleration planner chose by measurement (``fast``, ``balanced``) are not
code (:mod:`lazymar.planned`); :func:`lazymar.names.preset` looks up every kind of name.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from lazymar.condition_cache import ConditionCache, ConditionCacheConfig
from lazymar.disa import DiSA, DiSAConfig
from lazymar.gtr import PAPER_STAGE_STEPS, GtR, GtRConfig
from lazymar.head_cache import HeadCache, HeadCacheConfig
from lazymar.interval_guidance import IntervalGuidance, IntervalGuidanceConfig
from lazymar.marche import MARche, MARcheConfig
from lazymar.recap import ReCAP, ReCAPConfig
from lazymar.schedules import is_refresh_step
from lazymar.steps import AccelSteps
from lazymar.technique import Technique, check_composition
from lazymar.token_cache import TokenCache, TokenCacheConfig


def technique(cls: type[Technique], default: Any = None) -> Any:
    """An :class:`AccelConfig` field that switches technique ``cls`` on (its config) or off (None):
    the one line that registers a technique."""
    return field(default=default, metadata={"technique": cls})


@dataclass(frozen=True)
class AccelConfig:
    """Which acceleration techniques are on, and when LazyMAR's transformer caches refresh.

    Attributes:
        token_cache: encoder/decoder token reuse, or None.
        condition_cache: reuse of the guidance residual in the transformer, or None.
        head_cache: reuse inside the diffusion head's denoising loop, or None.
        gtr: GtR's staged orders, step schedule, head steps and FTS, or None.
        marche: MARche's cache-aware attention and selective KV refresh, or None.
        disa: DiSA's annealed head step counts, or None.
        recap: ReCAP's cheap steps over cached context keys/values, or None.
        interval: guidance only on the steps inside an interval of the masked fraction, or None.
        refresh_warmup: fraction of the MAR steps at the start that are all full. Release: 5/64.
        refresh_interval: after the warm-up, a full step every ``refresh_interval * num_iter`` steps.
            Release: 9/64. Smaller = more faithful, slower.
        schedule_steps: the step count the MAR-step schedules (refresh, token retain ratios) are laid
            out for. ``64`` reproduces the release at any ``num_iter``: its tables are indexed by absolute
            step (at 32 steps it refreshes at 0-4, 5, 14, 23 and never drops below 60% retention before
            step 20). ``None`` scales them with ``num_iter`` (progress ``step / num_iter``), identical at
            64 steps and proportionate at others. With GtR the step count is GtR's (fewer than
            ``num_iter``), so combinations with GtR use ``None``.
    """

    token_cache: TokenCacheConfig | None = technique(TokenCache, TokenCacheConfig())
    condition_cache: ConditionCacheConfig | None = technique(ConditionCache, ConditionCacheConfig())
    head_cache: HeadCacheConfig | None = technique(HeadCache, HeadCacheConfig())
    gtr: GtRConfig | None = technique(GtR)
    marche: MARcheConfig | None = technique(MARche)
    disa: DiSAConfig | None = technique(DiSA)
    recap: ReCAPConfig | None = technique(ReCAP)
    interval: IntervalGuidanceConfig | None = technique(IntervalGuidance)
    refresh_warmup: float = 5 / 64
    refresh_interval: float = 9 / 64
    schedule_steps: int | None = 64

    def __post_init__(self) -> None:
        check_composition(cls for cls, _ in self.enabled())
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"schedule_steps must be None or >= 1, got {self.schedule_steps}")
        if not 0.0 <= self.refresh_warmup <= 1.0:
            raise ValueError(f"refresh_warmup must be in [0, 1], got {self.refresh_warmup}")
        if not 0.0 < self.refresh_interval <= 1.0:
            raise ValueError(f"refresh_interval must be in (0, 1], got {self.refresh_interval}")

    def enabled(self) -> list[tuple[type[Technique], Any]]:
        """(technique class, its config) of every technique that is on, in field order."""
        out = []
        for f in fields(self):
            if "technique" in f.metadata and getattr(self, f.name) is not None:
                out.append((f.metadata["technique"], getattr(self, f.name)))
        return out

    def techniques(self, model) -> list[Technique]:
        """One object per enabled technique for one ``sample_tokens`` call (fresh cache state)."""
        return [cls(model, config, self) for cls, config in self.enabled()]

    def sampler(self, model, *, num_iter: int, guided: bool):
        """The step strategy of this config for one ``sample_tokens`` call (``models.mar.StepStrategy``)."""
        return AccelSteps(model, self, num_iter=num_iter, guided=guided)

    def schedule_length(self, num_iter: int) -> int:
        """The step count the MAR-step schedules are evaluated against."""
        return self.schedule_steps if self.schedule_steps is not None else num_iter

    def is_refresh(self, step: int, num_iter: int) -> bool:
        return is_refresh_step(step, self.schedule_length(num_iter), self.refresh_warmup, self.refresh_interval)

    def definition(self) -> str:
        """The config as text for run identities: ``repr`` without the techniques that are off, so that a
        technique added later leaves the identities of the runs that do not use it unchanged."""
        on = [f for f in fields(self) if not ("technique" in f.metadata and getattr(self, f.name) is None)]
        return f"AccelConfig({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in on)})"

    @property
    def pairs_with_plain(self) -> bool:
        """Every enabled technique draws plain MAR's random numbers (:meth:`Technique.draws_as_plain`), so
        each image sampled with this config has a plain twin."""
        return all(cls.draws_as_plain() for cls, _ in self.enabled())

    @property
    def caches_transformer(self) -> bool:
        return self.token_cache is not None or self.condition_cache is not None


LAZYMAR = AccelConfig()
OFF = AccelConfig(token_cache=None, condition_cache=None, head_cache=None)
GTR = replace(OFF, gtr=GtRConfig())
MARCHE = replace(OFF, marche=MARcheConfig())

PRESETS: dict[str, AccelConfig] = {
    "lazymar": LAZYMAR,
    "lazymar-token": replace(LAZYMAR, condition_cache=None, head_cache=None),
    "lazymar-cond": replace(LAZYMAR, token_cache=None, head_cache=None),
    "lazymar-head": replace(LAZYMAR, token_cache=None, condition_cache=None),
    "lazymar-scaled": replace(LAZYMAR, schedule_steps=None),
    "lazymar-off": OFF,
    "gtr": GTR,
    "gtr-transformer": replace(GTR, gtr=GtRConfig(diffusion=False, fts=False)),
    "gtr-diffusion": replace(GTR, gtr=GtRConfig(transformer=False)),
    "gtr-nofts": replace(GTR, gtr=GtRConfig(fts=False)),
    "gtr-paper-rates": replace(GTR, gtr=GtRConfig(stage_steps=PAPER_STAGE_STEPS)),
    "marche": MARCHE,
    "gtr+lazymar": replace(LAZYMAR, gtr=GtRConfig(), schedule_steps=None),
    "marche+lazymar": replace(LAZYMAR, token_cache=None, marche=MARcheConfig(), schedule_steps=None),
    "gtr+marche+lazymar": replace(LAZYMAR, token_cache=None, gtr=GtRConfig(), marche=MARcheConfig(),
                                  schedule_steps=None),
    "disa": replace(OFF, disa=DiSAConfig()),
    "disa+lazymar": replace(LAZYMAR, disa=DiSAConfig()),
    "gtr+disa+lazymar": replace(LAZYMAR, gtr=GtRConfig(), disa=DiSAConfig(), schedule_steps=None),
    "recap": replace(OFF, recap=ReCAPConfig()),
    "recap+lazymar": replace(LAZYMAR, token_cache=None, recap=ReCAPConfig(), schedule_steps=None),
    "interval": replace(OFF, interval=IntervalGuidanceConfig()),
    "interval+lazymar": replace(LAZYMAR, interval=IntervalGuidanceConfig()),
}
