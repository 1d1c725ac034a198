"""The configs that reproduce the released DiSA, ReCAP and CSpD code from its own sampling arguments.

``released_config('disa', diff_sampler='DiSA', diff_upper_steps=50, ...)`` takes the argument names of
the release's ``main_mar.py`` and returns what that code does with them, defects included, so that a
result produced with the released scripts can be reproduced here by copying their flags.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

from lazymar.config import OFF, AccelConfig
from lazymar.cspd import CSpDConfig, cspd_preset
from lazymar.disa import ANNEALING, DiSAConfig
from lazymar.recap import ReCAPConfig

# The release's argparse defaults (DiSA's main_mar.py; ReCAP's sample_tokens keywords).
DISA_DEFAULTS = dict(diff_sampler="default", diff_upper_steps=25, diff_lower_steps=5, diff_annealing_strategy="linear")
DISA_SAMPLERS = ("DiSA", "default")  # the release's DDIM / DPM-Solver variants are not reproduced
RECAP_DEFAULTS = dict(pre_full_iters=0, num_cache_iters=1, diff_fast_ratio=0.5, cache_buffer=True)
RELEASED_FAST_RATIO = 0.5  # what the ReCAP release runs whatever diff_fast_ratio says
# CSpD: its runner's constructor (ratio, inner_temperature) and ``run`` (num_draft) defaults.
CSPD_DEFAULTS = dict(draft=None, ratio=0.15, inner_temperature=42.0, num_draft=8)


def released_config(method: str, **kwargs: Any) -> AccelConfig | CSpDConfig:
    """The config that does what the released ``method`` does with these arguments (an
    :class:`AccelConfig`, or for CSpD a :class:`~lazymar.cspd.CSpDConfig` with the release's defects).

    Args:
        method: ``"disa"``, ``"recap"`` or ``"cspd"``.
        kwargs: the release's sampling arguments; those left out take the release's defaults.
            DiSA: ``diff_sampler`` (``"DiSA"`` anneals; ``"default"`` is plain MAR), ``diff_upper_steps``,
            ``diff_lower_steps``, ``diff_annealing_strategy``. ReCAP: ``pre_full_iters``,
            ``num_cache_iters``, ``diff_fast_ratio`` (ignored by the release: its fast head is built at
            the first call, a full step with the default 0.5; passing it warns), ``cache_buffer``.
            CSpD: ``draft`` (the draft MAR, required), ``ratio``, ``inner_temperature``, ``num_draft``.
    """
    if method == "disa":
        return _disa(**_with_defaults("disa", DISA_DEFAULTS, kwargs))
    if method == "recap":
        if "diff_fast_ratio" in kwargs:
            warnings.warn(f"diff_fast_ratio={kwargs['diff_fast_ratio']} has no effect in the ReCAP release "
                          f"(its cheap steps always run {RELEASED_FAST_RATIO:g} of the head steps); the "
                          f"config reproduces that. Use ReCAPConfig(fast_ratio=...) for a fast ratio that "
                          f"takes effect", stacklevel=2)
        return _recap(**_with_defaults("recap", RECAP_DEFAULTS, kwargs))
    if method == "cspd":
        settings = _with_defaults("cspd", CSPD_DEFAULTS, kwargs)
        if settings["draft"] is None:
            raise ValueError("released_config('cspd', ...) needs draft=<the draft MAR model>")
        return cspd_preset("cspd-release", **settings)
    raise ValueError(f"unknown released method {method!r}; choose 'disa', 'recap' or 'cspd'")


def _with_defaults(method: str, defaults: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {method} argument(s) {unknown}; the release's are {sorted(defaults)}")
    return {**defaults, **kwargs}


def _disa(diff_sampler: str, diff_upper_steps: int, diff_lower_steps: int,
          diff_annealing_strategy: str) -> AccelConfig:
    if diff_sampler not in DISA_SAMPLERS:
        raise ValueError(f"diff_sampler must be one of {DISA_SAMPLERS}, got {diff_sampler!r}")
    if diff_annealing_strategy not in ANNEALING:
        raise ValueError(f"diff_annealing_strategy must be one of {ANNEALING}, got {diff_annealing_strategy!r}")
    if diff_sampler == "default":  # no annealing and no timestep clamp: plain MAR
        return OFF
    return replace(OFF, disa=DiSAConfig(upper_steps=diff_upper_steps, lower_steps=diff_lower_steps,
                                        annealing=diff_annealing_strategy))


def _recap(pre_full_iters: int, num_cache_iters: int, diff_fast_ratio: float, cache_buffer: bool) -> AccelConfig:
    if cache_buffer is not True:
        raise ValueError("cache_buffer must be True: the release's default and every script of it; recomputing "
                         "the buffer in cheap steps (cache_buffer=False) is not implemented")
    config = ReCAPConfig(pre_full_iters=pre_full_iters, cheap_steps=num_cache_iters, fast_ratio=RELEASED_FAST_RATIO)
    return replace(OFF, recap=config)
