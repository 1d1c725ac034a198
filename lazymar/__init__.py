"""Training-free acceleration policies for MAR sampling.

``MAR.sample_tokens(..., accel=...)`` takes ``None`` (plain MAR), a preset name from :data:`PRESETS`, or
an :class:`AccelConfig` built from the per-technique configs below (``LazyMARConfig`` is the same class).
"""
from lazymar.condition_cache import ConditionCacheConfig
from lazymar.config import PRESETS, AccelConfig, LazyMARConfig
from lazymar.gtr import GtRConfig
from lazymar.head_cache import HeadCacheConfig
from lazymar.marche import MARcheConfig
from lazymar.token_cache import TokenCacheConfig

__all__ = ["PRESETS", "AccelConfig", "LazyMARConfig", "GtRConfig", "MARcheConfig", "TokenCacheConfig",
           "ConditionCacheConfig", "HeadCacheConfig"]
