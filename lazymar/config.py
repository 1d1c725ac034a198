"""The composed acceleration configuration and its named presets.

An :class:`AccelConfig` switches each technique on (a config) or off (``None``): LazyMAR's three caches
(token, condition, diffusion head) with the refresh schedule the transformer caches share, GtR's
staged schedules (:mod:`lazymar.gtr`), MARche's cache-aware attention (:mod:`lazymar.marche`), DiSA's
head step annealing (:mod:`lazymar.disa`) and ReCAP's cheap steps (:mod:`lazymar.recap`).
Techniques compose where they touch different parts of a step, or where their modules define how
(DiSA's annealing replaces GtR's stage-aware head counts). Where two would decide the same thing
without such a rule, the config is rejected with a message that names the conflict.

``PRESETS['lazymar']`` is the released LazyMAR (schedules indexed by absolute step, as released);
``lazymar-scaled`` scales them with the step count; the single-cache presets are the paper's
ablations; ``lazymar-off`` has everything disabled and is plain MAR by construction (a test holds it
to that). ``gtr*`` and ``marche*`` are GtR, MARche and their ablations, ``disa`` the DiSA release's
README setting, ``recap`` the ReCAP release's MAR-H setting at any step count, and ``+`` names
combinations.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from lazymar.condition_cache import ConditionCacheConfig
from lazymar.disa import DiSAConfig
from lazymar.gtr import PAPER_STAGE_STEPS, GtRConfig
from lazymar.head_cache import HeadCacheConfig
from lazymar.marche import MARcheConfig
from lazymar.recap import ReCAPConfig
from lazymar.schedules import is_refresh_step
from lazymar.token_cache import TokenCacheConfig


@dataclass(frozen=True)
class AccelConfig:
    """Which acceleration techniques are on, and when LazyMAR's transformer caches refresh.

    Attributes:
        token_cache: encoder/decoder token reuse, or None.
        condition_cache: reuse of the guidance residual in the transformer, or None.
        head_cache: reuse inside the diffusion head's denoising loop, or None.
        refresh_warmup: fraction of the MAR steps at the start that are all full. Release: 5/64.
        refresh_interval: after the warm-up, a full step every ``refresh_interval * num_iter`` steps.
            Release: 9/64. Smaller = more faithful, slower.
        schedule_steps: the step count the MAR-step schedules (refresh, token retain ratios) are laid
            out for. ``64`` reproduces the release at any ``num_iter``: its tables are indexed by absolute
            step (at 32 steps it refreshes at 0-4, 5, 14, 23 and never drops below 60% retention before
            step 20). ``None`` scales them with ``num_iter`` (progress ``step / num_iter``), identical at
            64 steps and proportionate at others. With GtR the step count is GtR's (fewer than
            ``num_iter``), so combinations with GtR use ``None``.
        gtr: GtR's staged orders, step schedule, head steps and FTS, or None.
        marche: MARche's cache-aware attention and selective KV refresh, or None.
        disa: DiSA's annealed head step counts, or None.
        recap: ReCAP's cheap steps over cached context keys/values, or None.
    """

    token_cache: TokenCacheConfig | None = field(default_factory=TokenCacheConfig)
    condition_cache: ConditionCacheConfig | None = field(default_factory=ConditionCacheConfig)
    head_cache: HeadCacheConfig | None = field(default_factory=HeadCacheConfig)
    refresh_warmup: float = 5 / 64
    refresh_interval: float = 9 / 64
    schedule_steps: int | None = 64
    gtr: GtRConfig | None = None
    marche: MARcheConfig | None = None
    disa: DiSAConfig | None = None
    recap: ReCAPConfig | None = None

    def __post_init__(self) -> None:
        if self.marche is not None and self.token_cache is not None:
            raise ValueError("MARche's cache-aware attention and LazyMAR's token cache both choose which "
                             "tokens the transformer recomputes: use one of them (MARche composes with "
                             "the condition and head caches; set token_cache=None)")
        if self.recap is not None:
            recomputes = [name for name, on in (("LazyMAR's token cache", self.token_cache is not None),
                                                 ("MARche", self.marche is not None)) if on]
            if recomputes:
                raise ValueError(f"ReCAP's cheap steps and {recomputes[0]} both choose what the transformer "
                                 f"recomputes: use one of them (ReCAP composes with the condition and head "
                                 f"caches; set token_cache=None, marche=None)")
            if self.gtr is not None:
                raise ValueError("ReCAP and GtR both arrange the generation orders and step schedule "
                                 "(ReCAP's groups go in position order, GtR's stages by checkerboard): "
                                 "use one of them")
            if self.disa is not None:
                raise ValueError("ReCAP's fast head on cheap steps and DiSA's annealing both set the head's "
                                 "step counts: use one of them (ReCAPConfig.fast_ratio sets ReCAP's)")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"schedule_steps must be None or >= 1, got {self.schedule_steps}")
        if not 0.0 <= self.refresh_warmup <= 1.0:
            raise ValueError(f"refresh_warmup must be in [0, 1], got {self.refresh_warmup}")
        if not 0.0 < self.refresh_interval <= 1.0:
            raise ValueError(f"refresh_interval must be in (0, 1], got {self.refresh_interval}")

    def schedule_length(self, num_iter: int) -> int:
        """The step count the MAR-step schedules are evaluated against."""
        return self.schedule_steps if self.schedule_steps is not None else num_iter

    def is_refresh(self, step: int, num_iter: int) -> bool:
        return is_refresh_step(step, self.schedule_length(num_iter), self.refresh_warmup, self.refresh_interval)

    @property
    def caches_transformer(self) -> bool:
        return self.token_cache is not None or self.condition_cache is not None


# The LazyMAR-only name of the same configuration.
LazyMARConfig = AccelConfig

LAZYMAR = AccelConfig()
OFF = AccelConfig(token_cache=None, condition_cache=None, head_cache=None)
GTR = replace(OFF, gtr=GtRConfig())
MARCHE = replace(OFF, marche=MARcheConfig())

PRESETS: dict[str, LazyMARConfig] = {
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
}
