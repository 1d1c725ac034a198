"""Training-free acceleration policies for MAR sampling.

``MAR.sample_tokens(..., accel=...)`` takes ``None`` (plain MAR), a preset name from :data:`PRESETS`, or
a :class:`LazyMARConfig` built from the per-technique configs below.
"""
from lazymar.condition_cache import ConditionCacheConfig
from lazymar.config import PRESETS, LazyMARConfig
from lazymar.head_cache import HeadCacheConfig
from lazymar.token_cache import TokenCacheConfig

__all__ = ["PRESETS", "LazyMARConfig", "TokenCacheConfig", "ConditionCacheConfig", "HeadCacheConfig"]
