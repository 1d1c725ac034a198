"""The one registry of acceleration names: what ``accel="<name>"`` and the scripts' ``--accel`` accept.

Three kinds of name: the paper presets (:data:`lazymar.config.PRESETS`, code), the presets the planner
chose by measurement (:mod:`lazymar.planned`, data), and speculative decoding's (:data:`CSPD_PRESETS`:
option sets of a :class:`lazymar.cspd.CSpDConfig`, which also needs a draft model, so :func:`preset`
refuses them). This module sits above the configs it names and below :mod:`lazymar.cspd`, which builds
its configs from these names and takes preset names for the techniques on either of its models.
"""
from __future__ import annotations

from typing import Any

from lazymar.config import PRESETS, AccelConfig
from lazymar.planned import planned_names, planned_preset

# The released defects' behaviour (``released_config("cspd", ...)`` and the ``cspd-release`` preset).
RELEASE_OPTIONS = dict(draft_token="mean", residual_inner_temperature=False, unaccepted="zero",
                       residual_stop="all", residual_rounds=100, residual_exit="early", step_mismatch="prefix")
# Named option sets: ``cspd_preset(name, draft, ...)``.
CSPD_PRESETS: dict[str, dict[str, Any]] = {"cspd": {}, "cspd-release": RELEASE_OPTIONS}


def preset(name: str) -> AccelConfig:
    """The config of preset ``name``: a paper preset (:data:`PRESETS`) or one the planner measured
    (:mod:`lazymar.planned`), with the list of names when it is unknown. Speculative decoding's names
    (:data:`CSPD_PRESETS`) are refused here: they need a draft model."""
    if name in PRESETS:
        return PRESETS[name]
    if name in CSPD_PRESETS:
        raise ValueError(f"{name!r} is speculative decoding, which needs a draft model: "
                         f"lazymar.cspd_preset({name!r}, draft=<the draft MAR>)")
    return planned_preset(name)


def preset_names() -> list[str]:
    """Every name :func:`preset` may accept, for ``choices=``: the paper presets, then the planned ones
    (a planned name the planner has not measured yet is refused by :func:`preset` with the command that
    measures it)."""
    return sorted(PRESETS) + planned_names()


def resolve_accel(accel: Any) -> AccelConfig:
    """A preset name or a config object -> config; raises a clear error for anything else."""
    if isinstance(accel, str):
        return preset(accel)
    if isinstance(accel, AccelConfig):
        return accel
    raise TypeError(f"accel must be None, a preset name ({sorted(PRESETS)}) or an AccelConfig, "
                    f"got {type(accel).__name__}")


# ------------------------------------------------------------------------------------------ scripts
# What the scripts' ``--accel`` takes: a preset, or a CSpD preset with ``--draft_model``.
ACCEL_NAMES = (*preset_names(), *sorted(CSPD_PRESETS))


def check_draft_flags(accel: str | None, draft_model: str | None) -> None:
    """The scripts' rule for ``--accel`` and ``--draft_model``, checked before anything loads: a CSpD
    preset needs a draft model, a draft model needs a CSpD preset, and any other name must be a preset
    whose config exists (a planned one the planner has not measured is refused, with how to measure it)."""
    if accel in CSPD_PRESETS and draft_model is None:
        raise ValueError(f"--accel {accel} needs --draft_model MODEL: the small MAR that drafts for --model "
                         f"(same token grid and channels, e.g. --model mar_huge --draft_model mar_base)")
    if draft_model is not None and accel not in CSPD_PRESETS:
        raise ValueError(f"--draft_model {draft_model} is only used by speculative decoding: add --accel "
                         f"{' or '.join(sorted(CSPD_PRESETS))} (got --accel {accel})")
    if accel is not None and accel not in CSPD_PRESETS:
        preset(accel)  # a planned name the planner has not measured yet is refused here, with how to measure it


def pairs_with_plain(accel: Any) -> bool:
    """Whether images sampled with ``accel`` (None, a name or a config) have plain-MAR twins: the same
    labels, seed and batch give the same random draws (:attr:`AccelConfig.pairs_with_plain`). Plain MAR
    pairs with itself; speculative decoding draws its own noise for the draft and the verification."""
    if accel is None:
        return True
    if isinstance(accel, str):
        if accel in CSPD_PRESETS:
            return False
        accel = preset(accel)
    return isinstance(accel, AccelConfig) and accel.pairs_with_plain
