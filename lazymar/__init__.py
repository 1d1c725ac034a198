"""Training-free acceleration techniques for MAR sampling.

``MAR.sample_tokens(..., accel=...)`` takes ``None`` (plain MAR) or an :class:`AccelConfig`: a preset's
(``preset("lazymar")``, :data:`PRESETS`) or one built from the per-technique configs below.
:func:`released_config` maps the DiSA, ReCAP and CSpD releases' own sampling arguments to a config. Preset
names (``accel="lazymar"``) also work once this package is imported; the config always does.
Continuous speculative decoding takes a second model: ``accel=CSpDConfig(draft=...)`` (:mod:`lazymar.cspd`).
"""
from lazymar.condition_cache import ConditionCacheConfig
from lazymar.config import PRESETS, AccelConfig
from lazymar.cspd import CSPD_PRESETS, CSpDConfig, CSpDStats, StatsLog, cspd_preset
from lazymar.disa import DiSAConfig
from lazymar.gtr import GtRConfig
from lazymar.head_cache import HeadCacheConfig
from lazymar.interval_guidance import IntervalGuidanceConfig
from lazymar.marche import MARcheConfig
from lazymar.names import preset
from lazymar.recap import ReCAPConfig
from lazymar.released import released_config
from lazymar.token_cache import TokenCacheConfig
from models.mar import register_preset_names

register_preset_names(preset)  # accel="<name>" for callers of the names

__all__ = ["PRESETS", "AccelConfig", "preset", "GtRConfig", "MARcheConfig", "TokenCacheConfig",
           "ConditionCacheConfig", "HeadCacheConfig", "DiSAConfig", "ReCAPConfig", "IntervalGuidanceConfig",
           "released_config",
           "CSpDConfig", "CSpDStats", "StatsLog", "CSPD_PRESETS", "cspd_preset"]
