"""Training-free acceleration policies for MAR sampling.

``MAR.sample_tokens(..., accel=...)`` takes ``None`` (plain MAR), a preset name from :data:`PRESETS`, or
an :class:`AccelConfig` built from the per-technique configs below (``LazyMARConfig`` is the same class).
:func:`released_config` maps the DiSA, ReCAP and CSpD releases' own sampling arguments to a config.
Continuous speculative decoding takes a second model: ``accel=CSpDConfig(draft=...)`` (:mod:`lazymar.cspd`).
Importing this package registers it with :mod:`models.mar` (which does not import the layers above it).
"""
from lazymar.condition_cache import ConditionCacheConfig
from lazymar.config import PRESETS, AccelConfig, LazyMARConfig
from lazymar.cspd import CSPD_PRESETS, CSpDConfig, CSpDStats, StatsLog, cspd_preset
from lazymar.disa import DiSAConfig
from lazymar.gtr import GtRConfig
from lazymar.head_cache import HeadCacheConfig
from lazymar.marche import MARcheConfig
from lazymar.policy import make_sampler
from lazymar.recap import ReCAPConfig
from lazymar.released import released_config
from lazymar.token_cache import TokenCacheConfig
from models.mar import register_accel

register_accel(make_sampler)

__all__ = ["PRESETS", "AccelConfig", "LazyMARConfig", "GtRConfig", "MARcheConfig", "TokenCacheConfig",
           "ConditionCacheConfig", "HeadCacheConfig", "DiSAConfig", "ReCAPConfig", "released_config",
           "CSpDConfig", "CSpDStats", "StatsLog", "CSPD_PRESETS", "cspd_preset"]
