"""The acceleration planner's search space, described in one place.

A :class:`SearchSpace` lists the values the planner tries along each dimension: the sampling settings
(MAR step count, guidance scale) and, per technique, the settings of its config; every technique is
also tried off. :func:`candidates` builds every combination as the config the sampler takes
(:class:`lazymar.AccelConfig`, ``None`` where all are off: plain MAR) and prunes the ones the
composition rules reject when the config is made; :func:`price` plans each remaining one as the sampler
would and counts its FLOPs (:func:`lazymar.flops.estimate`), pruning the ones rejected at plan time.
Both count what they prune, by reason. LazyMAR's MAR-step schedules are scaled with the step count
(``schedule_steps=None``), the only layout that composes with GtR and fits every step count.

Extension point, CSpD (speculative decoding with a draft model; it lives on another branch): its
options need a draft model, which the others do not. When it is merged, add a frozen ``CSpDSpace``
whose ``options()`` returns ``[{}]`` (off) plus ``{"cspd": CSpDConfig(...)}`` per setting, and a field
``cspd: CSpDSpace | None = None`` to :class:`SearchSpace` that :meth:`SearchSpace.dimensions` includes
when set; the planner's command line sets it only when it is given a draft model (``--draft``), so
without one CSpD is neither searched nor counted. Nothing else here changes: composition and pricing
come from the config and its plan.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from tqdm.auto import tqdm

from lazymar.condition_cache import ConditionCacheConfig
from lazymar.config import AccelConfig
from lazymar.disa import ANNEALING, DiSAConfig
from lazymar.flops import estimate
from lazymar.gtr import DEFAULT_STAGE_STEPS, PAPER_STAGE_STEPS, GtRConfig
from lazymar.head_cache import HeadCacheConfig
from lazymar.interval_guidance import IntervalGuidanceConfig
from lazymar.marche import MARcheConfig
from lazymar.planned import config_to_dict
from lazymar.recap import ReCAPConfig
from lazymar.token_cache import RELEASED_RETAIN, TokenCacheConfig

LAZYMAR_CACHES = ("token", "condition", "head")


@dataclass(frozen=True)
class LazyMARSpace:
    """LazyMAR's caches and their schedules.

    Attributes:
        caches: the sets of caches tried, each a tuple of names from ``token``, ``condition``, ``head``;
            ``()`` is LazyMAR off.
        refresh_interval: full step every this fraction of the MAR steps (token and condition caches,
            :attr:`lazymar.AccelConfig.refresh_interval`). Release: 9/64; larger = cheaper, less faithful.
        refresh_warmup: fraction of all-full steps at the start. Release: 5/64.
        retain: the token cache's retention schedules (:attr:`TokenCacheConfig.retain`).
        head_interval: the head cache's refresh interval (:attr:`HeadCacheConfig.interval`). Release: 0.07.
    """

    caches: tuple[tuple[str, ...], ...] = ((), ("head",), ("condition",), ("token", "condition"),
                                           ("condition", "head"), ("token", "condition", "head"))
    refresh_interval: tuple[float, ...] = (9 / 64, 18 / 64)
    refresh_warmup: float = 5 / 64
    retain: tuple[tuple[tuple[float, float], ...], ...] = (RELEASED_RETAIN,)
    head_interval: tuple[float, ...] = (0.07,)

    def __post_init__(self) -> None:
        unknown = sorted({c for cs in self.caches for c in cs} - set(LAZYMAR_CACHES))
        if unknown:
            raise ValueError(f"unknown LazyMAR caches {unknown}; choose from {LAZYMAR_CACHES}")

    def options(self) -> list[dict[str, Any]]:
        out = []
        for caches in self.caches:
            token, condition, head = (name in caches for name in LAZYMAR_CACHES)
            for interval in self.refresh_interval if token or condition else (None,):
                for retain in self.retain if token else (None,):
                    for head_interval in self.head_interval if head else (None,):
                        option: dict[str, Any] = dict(
                            token_cache=TokenCacheConfig(retain=retain) if token else None,
                            condition_cache=ConditionCacheConfig() if condition else None,
                            head_cache=HeadCacheConfig(interval=head_interval) if head else None)
                        if interval is not None:
                            option.update(refresh_interval=interval, refresh_warmup=self.refresh_warmup)
                        out.append(option)
        return out


@dataclass(frozen=True)
class GtRSpace:
    """GtR's stages, head step counts and FTS (:class:`lazymar.GtRConfig`); empty ``stage_steps``: GtR off only.

    Attributes:
        stage_steps: MAR steps per stage as fractions of ``num_iter`` (the number of stages is the length).
        head_steps: ``(start, end, reconstruction)`` head steps of the stage-aware diffusion schedule.
        fts: frequency-weighted token selection in reconstruction, on and/or off.
    """

    stage_steps: tuple[tuple[float, ...], ...] = (DEFAULT_STAGE_STEPS, PAPER_STAGE_STEPS)
    head_steps: tuple[tuple[int, int, int], ...] = ((50, 20, 20),)
    fts: tuple[bool, ...] = (True, False)

    def options(self) -> list[dict[str, Any]]:
        return [{}] + [{"gtr": GtRConfig(num_stages=len(s), stage_steps=s, head_steps_start=a, head_steps_end=b,
                                         head_steps_recon=c, fts=f)}
                       for s, (a, b, c), f in itertools.product(self.stage_steps, self.head_steps, self.fts)]


@dataclass(frozen=True)
class DiSASpace:
    """DiSA's head step bounds and annealing (:class:`lazymar.DiSAConfig`); empty ``bounds``: off only.

    Attributes:
        bounds: ``(upper, lower)`` head steps at the first and the last MAR step. Release: (50, 5).
        annealing: how the count falls between them (:data:`lazymar.disa.ANNEALING`).
    """

    bounds: tuple[tuple[int, int], ...] = ((50, 5), (25, 5))
    annealing: tuple[str, ...] = ("linear", "cosine")

    def __post_init__(self) -> None:
        if not set(self.annealing) <= set(ANNEALING):
            raise ValueError(f"annealing must be among {ANNEALING}, got {self.annealing}")

    def options(self) -> list[dict[str, Any]]:
        return [{}] + [{"disa": DiSAConfig(upper_steps=u, lower_steps=lo, annealing=a)}
                       for (u, lo), a in itertools.product(self.bounds, self.annealing)]


@dataclass(frozen=True)
class ReCAPSpace:
    """ReCAP's grouping and fast head (:class:`lazymar.ReCAPConfig`); empty ``full_fraction``: off only.

    Attributes:
        full_fraction: share of the steps at the start that are plain full steps. Release: 0.5.
        cheap_steps: cheap steps after each full step once those are done. Release: 1.
        fast_ratio: head steps of the cheap steps as a fraction of the model's. Release: 0.5.
    """

    full_fraction: tuple[float, ...] = (0.5, 0.25)
    cheap_steps: tuple[int, ...] = (1, 2)
    fast_ratio: tuple[float, ...] = (0.5,)

    def options(self) -> list[dict[str, Any]]:
        return [{}] + [{"recap": ReCAPConfig(full_fraction=f, cheap_steps=c, fast_ratio=r)}
                       for f, c, r in itertools.product(self.full_fraction, self.cheap_steps, self.fast_ratio)]


@dataclass(frozen=True)
class MARcheSpace:
    """MARche's active set and refresh (:class:`lazymar.MARcheConfig`); empty ``active_fraction``: off only.

    Attributes:
        active_fraction: active tokens on partial steps as a fraction of the image tokens. Paper: 0.25.
        refresh_every: a full refresh every this many MAR steps. Paper: 3.
    """

    active_fraction: tuple[float, ...] = (0.25, 0.5)
    refresh_every: tuple[int, ...] = (3,)

    def options(self) -> list[dict[str, Any]]:
        return [{}] + [{"marche": MARcheConfig(active_fraction=a, refresh_every=r)}
                       for a, r in itertools.product(self.active_fraction, self.refresh_every)]


@dataclass(frozen=True)
class IntervalSpace:
    """Interval guidance (:class:`lazymar.IntervalGuidanceConfig`): guidance only while at most ``t_max``
    of the tokens are masked; empty ``t_max``: off only.

    Attributes:
        t_max: the masked fractions above which steps run unguided. At 64 steps on 256 tokens 0.75 skips
            the first 29 (scales below ~1.5 at cfg 2.9), 0.5 the first 42 (scales up to ~2).
    """

    t_max: tuple[float, ...] = (0.75, 0.5)

    def options(self) -> list[dict[str, Any]]:
        return [{}] + [{"interval": IntervalGuidanceConfig(t_max=t)} for t in self.t_max]


@dataclass(frozen=True)
class SearchSpace:
    """Every setting the planner may try: the cross product of its dimensions.

    Attributes:
        num_iter: MAR step counts.
        cfg: guidance scales (the demo model's schedule, linear, is kept).
        lazymar, gtr, disa, recap, marche, interval: each technique's settings (:class:`LazyMARSpace`, ...).
    """

    num_iter: tuple[int, ...] = (16, 32, 64)
    cfg: tuple[float, ...] = (2.0, 3.0)
    lazymar: LazyMARSpace = field(default_factory=LazyMARSpace)
    gtr: GtRSpace = field(default_factory=GtRSpace)
    disa: DiSASpace = field(default_factory=DiSASpace)
    recap: ReCAPSpace = field(default_factory=ReCAPSpace)
    marche: MARcheSpace = field(default_factory=MARcheSpace)
    interval: IntervalSpace = field(default_factory=IntervalSpace)

    def __post_init__(self) -> None:
        if not self.num_iter or min(self.num_iter) < 1:
            raise ValueError(f"num_iter needs step counts >= 1, got {self.num_iter}")
        if not self.cfg or min(self.cfg) < 1.0:
            raise ValueError(f"cfg needs guidance scales >= 1, got {self.cfg}")

    def dimensions(self) -> list[Any]:
        """The technique dimensions, each with ``options()``."""
        return [self.lazymar, self.gtr, self.disa, self.recap, self.marche, self.interval]

    def size(self) -> int:
        """Combinations before pruning."""
        n = len(self.num_iter) * len(self.cfg)
        for dim in self.dimensions():
            n *= len(dim.options())
        return n

    def as_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


# A quick look (--space small) and the full default; the planner's --space chooses.
SPACES: dict[str, SearchSpace] = {
    "default": SearchSpace(),
    "small": SearchSpace(num_iter=(32, 64), cfg=(3.0,),
                         lazymar=LazyMARSpace(caches=((), ("condition", "head"), ("token", "condition", "head")),
                                              refresh_interval=(9 / 64,)),
                         gtr=GtRSpace(stage_steps=(DEFAULT_STAGE_STEPS,), fts=(True,)),
                         disa=DiSASpace(bounds=((50, 5),), annealing=("linear",)),
                         recap=ReCAPSpace(full_fraction=(0.5,), cheap_steps=(1,)),
                         marche=MARcheSpace(active_fraction=(0.25,)), interval=IntervalSpace(t_max=(0.75,))),
}


@dataclass(frozen=True)
class Candidate:
    """One configuration the planner measures: sampling settings and an acceleration config.

    Attributes:
        num_iter: MAR steps.
        cfg: guidance scale.
        accel: the acceleration config, None for plain MAR.
        name: the preset it is (plain MAR is ``"plain"``), None for an unnamed point of the space.
    """

    num_iter: int
    cfg: float
    accel: AccelConfig | None
    name: str | None = None

    @cached_property
    def key(self) -> str:
        """12 hex digits that identify the configuration (not the name): equal keys sample alike."""
        text = json.dumps({"num_iter": self.num_iter, "cfg": self.cfg,
                           "accel": None if self.accel is None else config_to_dict(self.accel)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return f"{self.name or describe(self.accel)} @ {self.num_iter} steps, cfg {self.cfg:g}"


def describe(accel: AccelConfig | None) -> str:
    """A short text of ``accel``: each technique that is on, with the settings that differ from its defaults."""
    if accel is None:
        return "plain"
    short = {"token_cache": "token", "condition_cache": "cond", "head_cache": "head"}
    parts = []
    for f in fields(accel):
        config = getattr(accel, f.name)
        if "technique" not in f.metadata or config is None:
            continue
        default = type(config)()
        changed = [f"{g.name}={_short(getattr(config, g.name))}" for g in fields(config)
                   if getattr(config, g.name) != getattr(default, g.name)]
        parts.append(short.get(f.name, f.name) + (f"({', '.join(changed)})" if changed else ""))
    text = "+".join(parts) or "all off"
    if accel.caches_transformer:
        text += f" [refresh {_short(accel.refresh_interval)}]"
    return text


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, tuple):
        return "(" + ",".join(_short(v) for v in value) + ")"
    return str(value)


def candidates(space: SearchSpace) -> tuple[list[Candidate], Counter]:
    """Every combination of ``space`` as a :class:`Candidate` (equal configurations once), and the
    number rejected when their config was made, by reason (the composition rules)."""
    pruned: Counter = Counter()
    seen: dict[Candidate, None] = {}  # insertion-ordered set
    base = dict(token_cache=None, condition_cache=None, head_cache=None, schedule_steps=None)
    for options in itertools.product(*(dim.options() for dim in space.dimensions())):
        settings = dict(base)
        for option in options:
            settings.update(option)
        try:
            accel = AccelConfig(**settings)
        except ValueError as e:
            pruned[str(e)] += len(space.num_iter) * len(space.cfg)
            continue
        accel = accel if accel.enabled() else None  # every technique off: plain MAR itself
        for num_iter, cfg in itertools.product(space.num_iter, space.cfg):
            seen.setdefault(Candidate(num_iter, cfg, accel))
    return list(seen), pruned


def price(cands: list[Candidate], model, *, bsz: int, progress: bool = False) -> tuple[list[tuple[Candidate, float]],
                                                                                        Counter]:
    """``(candidate, TFLOPs per image)`` of each candidate whose steps plan, and the number rejected at
    plan time, by reason. FLOPs are those of the executed plan (:func:`lazymar.flops.estimate`)."""
    priced, pruned = [], Counter()
    for c in tqdm(cands, desc="pricing", unit="config", disable=not progress):
        try:
            flops = estimate(model, num_iter=c.num_iter, cfg=c.cfg, accel=c.accel, bsz=bsz).total
        except ValueError as e:
            pruned[str(e)] += 1
            continue
        priced.append((c, flops / 1e12))
    return priced, pruned
