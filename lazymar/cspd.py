"""Continuous speculative decoding (CSpD, arXiv 2411.11925): a small MAR drafts, the large one verifies.

The target (the model whose ``sample_tokens`` is called) makes the first MAR steps itself ("pre-fill");
then the draft makes the steps, and after every ``num_draft``-th step (and the last) the target runs
once over the tokens committed so far and its head scores every token drafted since: an acceptance
test keeps each draft or replaces it with a residual sample. Every step still unmasks MAR's cosine
schedule of tokens, so the target runs ``prefill + verifications`` times instead of ``num_iter``.

Trajectory alignment: the starting noise of every token and the noise of every diffusion step are
drawn once, before the orders, as (B, L, C) and (B, L, S, C) tensors; a token's trajectory uses the
same noise whichever head denoises it, so the draft's and the target's last-step Gaussians for a token
are comparable. The last diffusion step adds no noise: a head's token is its last-step mean.

What the released rule does to the output distribution, and the options (:class:`CSpDConfig`):

- The test keeps a draft ``x`` where ``F * N(x; mu_p, (Ti s_p)^2) / N(x; mu_q, (Ti s_q)^2) > u``, with the
  last step's means ``mu`` and standard deviations ``s`` (p: target, q: draft), ``F`` the product of
  ``s_p / s_q`` over the earlier steps and channels (their exponent terms are left out) and ``Ti`` the
  inner temperature. With ``Ti = 1`` and ``F = 1`` and ``x ~ q`` this is the speculative sampling test;
  ``Ti > 1`` keeps drafts up to ``Ti`` target standard deviations away (Ti = 42 by default), so the
  output mixes the draft's tokens with the target's.
- ``draft_token``: the release drafts ``x = mu_q`` (the draft's own token: its last step adds no noise),
  though the test assumes ``x ~ N(mu_q, s_q^2)``; ``"sample"`` adds ``s_q`` times the trajectory noise of
  step 0 (drawn by the release and never used), so the test's assumption holds.
- ``residual_inner_temperature``: the residual proposes ``y ~ N(mu_p, s_p^2)`` and keeps it with
  ``max(0, N_p(y) - N_q(y) / F) / N_p(y)``, i.e. from ``max(0, F p - q)``: without ``Ti``. The pair test +
  residual keeps the target distribution only at ``Ti = 1`` and ``F = 1``; True uses ``Ti`` in the
  residual too (the standard pair for the ``Ti``-widened Gaussians, whose samples are ``Ti`` times wider).
- ``unaccepted``: ``F p`` integrates to ``F``, so where ``F < 1`` and the Gaussians overlap the residual
  is (nearly) empty; after ``residual_rounds`` rounds the release leaves such a token at zero, an
  out-of-distribution latent. ``"target"`` gives it the target's own token ``mu_p`` instead.
- ``residual_stop``: the release's rounds wait until every verified token, kept drafts included (whose
  proposals are thrown away), has had a proposal accepted; ``"rejected"`` waits for the rejected ones
  only (fewer rounds, same distribution of what is kept).
- ``residual_exit``: the release reads on the host after every residual round whether to stop (a GPU
  waits for the host each round); ``"fixed"`` runs all ``residual_rounds`` rounds with the updates past
  the release's stop masked: the same verdict from the same draws, no host read, more draws.
- ``step_mismatch``: the release sizes the step noise by the draft's step count; a target with fewer
  steps reads its first entries (no alignment), one with more indexes past the end. ``"error"`` refuses
  such a pair; ``"prefix"`` draws for the larger count and each head reads the first entries of its own.
- ``num_draft = 0`` divides by zero in the release: refused here (``ratio=1.0`` is target-only sampling).
- ``labels``: the release's default is a typing object that fails in the class embedding; here
  ``sample_tokens(labels=None)`` samples unconditionally with both models (``fake_latent``), which is
  what the release does with an explicit ``labels=None``.

Compositions: CSpD runs each model's transformer through the model's one block runner and its head
through :meth:`~models.diffloss.DiffLoss.sample`; of a technique on either model it asks one hook,
``head_model`` (the head's model function). So a technique that decides nothing else composes: LazyMAR's
head cache, on the draft, the target or both (``draft_accel``/``target_accel="lazymar-head"``). Every
other one is refused with the conflict named (:func:`check_composition`).

``target.sample_tokens(accel=CSpDConfig(...))`` reaches :class:`CSpD` through the config's ``sampler``
hook, as every acceleration config does; it is a :class:`models.mar.LoopStrategy`, which runs the whole
generation itself.

Statistics: each ``sample_tokens`` call hands a :class:`CSpDStats` (accepted / verified per verification
and overall) to ``on_stats`` when given (:class:`StatsLog` keeps them).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from tqdm.auto import tqdm

from lazymar import cspd_flops
from lazymar.config import AccelConfig
from lazymar.cspd_accept import RESIDUAL_EXIT, RESIDUAL_STOP, UNACCEPTED, HeadGaussian, Verdict, verify
from lazymar.cspd_schedule import CSpDStepPlan, is_prefill, is_verification
from lazymar.names import CSPD_PRESETS, RELEASE_OPTIONS, preset, preset_names
from lazymar.plan import FIELD_MEANING
from lazymar.steps import decide
from lazymar.technique import PlainMAR, Technique
from models.diffusion import TrajectoryTrace
from models.indexing import gather_rows, gather_tokens, positions, scattered_tokens
from models.schedules import guidance_on, guidance_scale, plain_mask_lens

DRAFT_TOKENS = ("mean", "sample")
STEP_MISMATCH = ("error", "prefix")


@dataclass(frozen=True)
class CSpDConfig:
    """Continuous speculative decoding with ``draft`` proposing tokens for the sampling model to verify.

    The defaults of the first three settings are the release's (its runner's constructor and ``run``).
    The defect options (module docstring) default to what measured best on heads shaped like MAR's
    (``python -m lazymar.cspd_study``, table in ``docs/cspd.md``; error = distance to the target's own
    token in target standard deviations); :data:`RELEASE_OPTIONS` (preset ``cspd-release``) restores
    the release's behaviour.

    Attributes:
        draft: the draft MAR (same token grid and channels as the target; any width, depth, buffer).
        ratio: MAR steps ``s <= num_iter * ratio`` (0-based, a float comparison) are made by the target
            alone ("pre-fill"): more = slower, closer to the target. Release: 0.15 (notebook: 0.05).
        inner_temperature: ``Ti``, widens both Gaussians of the acceptance test: larger = more drafts
            kept, further from the target. Release: 42.
        num_draft: verification after every step ``s`` with ``s % num_draft == 0`` (and the last): the
            target passes are ``prefill + ~(num_iter - prefill) / num_draft``. Release: 8 (notebook: 4).
        draft_token: ``"mean"`` (release, default) or ``"sample"``. Default as released: a sample keeps
            more drafts at ``Ti = 1`` (13% -> 32% at 2 sd apart) but moves every token by ~1 sd
            (error 0.94 -> 1.00 at Ti 1, 0.51 -> 1.12 at Ti 42).
        residual_inner_temperature: use ``Ti`` in the residual sampler too. Default False, as released:
            with it the residual samples are ``Ti`` times wider (error 0.51 -> 8.7 at Ti 42, 2 sd apart)
            and empty where ``F < 1`` (41% zero tokens).
        unaccepted: ``"target"`` (default) or ``"zero"`` (release): what a rejected token with no
            accepted residual proposal becomes. The release's zeros appear where the draft is good (equal
            Gaussians, ``F = e^-0.5``: 41% of tokens, error 103 vs 0.03 with ``"target"``).
        residual_stop: ``"rejected"`` (default) or ``"all"`` (release): which tokens the residual rounds
            wait for. Same output distribution, fewer rounds (75 -> 39, 3.6 -> 1.2 in the study).
        residual_rounds: residual rounds at most. Release: 100.
        residual_exit: ``"fixed"`` (default) or ``"early"`` (release): run every residual round with masked
            updates, or stop by reading a device flag on the host after each round. Same verdict from the
            same draws; ``"fixed"`` makes no host read (a GPU never waits) but draws every round's noise,
            so the generator's later draws, and with them the images, differ from ``"early"``'s.
        step_mismatch: ``"error"`` (default: alignment is the premise of the test) or ``"prefix"``
            (release): draft and target heads with different diffusion step counts.
        draft_accel / target_accel: techniques on either model (a preset name or an
            :class:`~lazymar.config.AccelConfig`); those that decide only the head's model function
            compose, i.e. LazyMAR's head cache (``"lazymar-head"``), see :func:`check_composition`.
        on_stats: called with the :class:`CSpDStats` of every ``sample_tokens`` call.
    """

    draft: Any = field(repr=False)
    ratio: float = 0.15
    inner_temperature: float = 42.0
    num_draft: int = 8
    draft_token: str = "mean"
    residual_inner_temperature: bool = False
    unaccepted: str = "target"
    residual_stop: str = "rejected"
    residual_rounds: int = 100
    residual_exit: str = "fixed"
    step_mismatch: str = "error"
    draft_accel: AccelConfig | str | None = None
    target_accel: AccelConfig | str | None = None
    on_stats: Callable[["CSpDStats"], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not hasattr(self.draft, "sample_tokens") or not hasattr(self.draft, "diffloss"):
            raise TypeError(f"draft must be a MAR model, got {type(self.draft).__name__}")
        if not (isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio <= 1.0):
            raise ValueError(f"ratio must be in [0, 1] (the fraction of MAR steps the target pre-fills), "
                             f"got {self.ratio}")
        if not (isinstance(self.inner_temperature, (int, float)) and math.isfinite(self.inner_temperature)
                and self.inner_temperature > 0):
            raise ValueError(f"inner_temperature must be a finite number > 0, got {self.inner_temperature}")
        if not isinstance(self.num_draft, int) or self.num_draft < 1:
            raise ValueError(f"num_draft must be an integer >= 1 (verification after every num_draft-th step; "
                             f"the release divides by zero at 0, and ratio=1.0 samples with the target "
                             f"alone), got {self.num_draft!r}")
        if self.draft_token not in DRAFT_TOKENS:
            raise ValueError(f"draft_token must be one of {DRAFT_TOKENS}, got {self.draft_token!r}")
        if self.unaccepted not in UNACCEPTED:
            raise ValueError(f"unaccepted must be one of {UNACCEPTED}, got {self.unaccepted!r}")
        if self.residual_stop not in RESIDUAL_STOP:
            raise ValueError(f"residual_stop must be one of {RESIDUAL_STOP}, got {self.residual_stop!r}")
        if not isinstance(self.residual_rounds, int) or self.residual_rounds < 1:
            raise ValueError(f"residual_rounds must be an integer >= 1, got {self.residual_rounds!r}")
        if self.residual_exit not in RESIDUAL_EXIT:
            raise ValueError(f"residual_exit must be one of {RESIDUAL_EXIT}, got {self.residual_exit!r}")
        if self.step_mismatch not in STEP_MISMATCH:
            raise ValueError(f"step_mismatch must be one of {STEP_MISMATCH}, got {self.step_mismatch!r}")
        check_composition(self.draft_accel, "draft")
        check_composition(self.target_accel, "target")

    def settings(self) -> dict[str, Any]:
        """Every setting but the draft and the callback (what a run records beside the draft's weights)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SETTINGS}

    def check_target(self, target) -> None:
        """Raise ``ValueError`` when ``target`` cannot verify this draft (another token grid or channel count,
        another noise schedule, or, with ``step_mismatch="error"``, another diffusion step count): what a
        script checks right after loading both models, before it samples anything."""
        draft = self.draft
        if (draft.seq_len, draft.token_embed_dim) != (target.seq_len, target.token_embed_dim):
            raise ValueError(f"draft and target must share the token grid: draft has {draft.seq_len} tokens of "
                             f"{draft.token_embed_dim} channels, target {target.seq_len} of {target.token_embed_dim}")
        # The test compares the heads' Gaussians of one trajectory, step by step: on two schedules the same
        # step index is another noise level, and F's per-step ratios compare unlike variances.
        schedule_d, schedule_t = (m.diffloss.noise_schedule for m in (draft, target))
        if schedule_d != schedule_t:
            raise ValueError(f"draft head samples on the {schedule_d!r} noise schedule, target head on "
                             f"{schedule_t!r}: trajectory alignment needs one schedule (a draft trained with "
                             f"the target's --noise_schedule)")
        steps_d, steps_t = (m.diffloss.gen_diffusion.num_timesteps for m in (draft, target))
        if steps_d != steps_t and self.step_mismatch == "error":
            raise ValueError(f"draft head runs {steps_d} diffusion steps, target head {steps_t}: trajectory "
                             f"alignment needs the same steps (set num_sampling_steps alike, or "
                             f"step_mismatch='prefix' for the release's behaviour)")

    def estimate_flops(self, target, *, num_iter: int, cfg: float, bsz: int = 1):
        """FLOPs per image of ``target.sample_tokens(accel=self)``, both models' components summed (the
        hook :func:`lazymar.flops.estimate` asks; per model: :func:`lazymar.cspd_flops.estimate`)."""
        return cspd_flops.estimate(target, self, num_iter=num_iter, cfg=cfg, bsz=bsz).combined()

    def measure_flops(self, target, *, num_iter: int, cfg: float, bsz: int = 1, **sample_kwargs):
        """FLOPs per image counted in a real run, both models' components summed (the hook
        :func:`lazymar.flops.measure` asks; per model: :func:`lazymar.cspd_flops.measure`)."""
        return cspd_flops.measure(target, self, num_iter=num_iter, cfg=cfg, bsz=bsz, **sample_kwargs).combined()

    def sampler(self, model, *, num_iter: int, guided: bool) -> "CSpD":
        """The sampler of one ``model.sample_tokens(accel=self)`` call, ``model`` verifying the draft (the
        hook :func:`models.mar.step_strategy` asks every acceleration config)."""
        return CSpD(model, self, guided=guided)

    def head_model(self, role: str, model) -> tuple[Technique, Any]:
        """The technique whose model function ``role``'s head runs (``"draft"`` or ``"target"``, on
        ``model``), asked through the ``head_model`` hook as :class:`lazymar.steps.AccelSteps` asks it, and
        that function's factory (None: the plain one)."""
        accel = _resolve(self.draft_accel if role == "draft" else self.target_accel)
        chosen = None if accel is None else decide("head_model", accel.techniques(model), lambda t: t.head_model())
        return (PlainMAR(model), None) if chosen is None else chosen


_NOT_SETTINGS = ("draft", "on_stats")


def preset_settings(name: str) -> dict[str, Any]:
    """The settings of CSpD preset ``name`` (:meth:`CSpDConfig.settings`), known without a draft model."""
    if name not in CSPD_PRESETS:
        raise ValueError(f"unknown CSpD preset {name!r}; choose one of {sorted(CSPD_PRESETS)}")
    defaults = {f.name: f.default for f in fields(CSpDConfig) if f.name not in _NOT_SETTINGS}
    return {**defaults, **CSPD_PRESETS[name]}


def definition(name: str) -> str:
    """The full definition of the acceleration ``name`` as text, for run identities: the preset's config,
    or for a CSpD preset every setting of its config but the draft, whose weights an identity records by
    digest (``repr`` of the :class:`CSpDConfig` it samples with). A preset's config is written without the
    techniques that are off (:meth:`AccelConfig.definition`)."""
    if name in CSPD_PRESETS:
        return f"CSpDConfig({', '.join(f'{k}={v!r}' for k, v in preset_settings(name).items())})"
    return preset(name).definition()


def _resolve(accel: AccelConfig | str | None) -> AccelConfig | None:
    if accel is None or isinstance(accel, AccelConfig):
        return accel
    if isinstance(accel, str):
        try:
            return preset(accel)
        except ValueError as e:  # an unknown name, with the list of known ones
            raise ValueError(f"CSpD's draft_accel / target_accel must be a preset name: {e}") from None
    raise ValueError(f"CSpD's draft_accel / target_accel must be None, an AccelConfig or a preset name "
                     f"({preset_names()}), got {accel!r}")


# What CSpD asks of a technique on either model: the head's model function; it decides everything else.
COMPOSES = frozenset({"head_model"})
# Why each technique that decides more cannot run on a CSpD model (by its AccelConfig field).
CONFLICTS = {
    "token_cache": "LazyMAR's token cache reuses features of the previous step, but verification rewrites "
                   "drafted tokens between draft steps, the draft starts cold after pre-fill and the "
                   "target's passes are not consecutive steps",
    "condition_cache": "LazyMAR's condition cache reuses the guidance residual of the previous step, but "
                       "the draft starts cold after pre-fill and the target's passes are not consecutive steps",
    "gtr": "GtR changes the step schedule and orders, while CSpD's pre-fill, blocks and verification are laid "
           "out on MAR's schedule shared by both models",
    "marche": "MARche's cache-aware attention reuses keys/values across consecutive steps of one model, "
              "which neither model runs after pre-fill",
    "disa": "DiSA changes the head's step count per MAR step, while trajectory alignment needs the draft's "
            "and the target's head to run the same diffusion steps for a token",
    "recap": "ReCAP's cheap steps reuse the keys/values of a full step of the same model, and change the "
             "schedule, orders and head step counts CSpD aligns on",
}


def check_composition(accel: AccelConfig | str | None, role: str) -> None:
    """Raise ``ValueError`` naming the conflict when ``accel`` enables a technique CSpD cannot run on its
    ``role`` model: one that decides more than :data:`COMPOSES` (by its ``writes``, the fields it may plan)."""
    config = _resolve(accel)
    if config is None:
        return
    for f in fields(config):
        cls = f.metadata.get("technique")
        if cls is None or getattr(config, f.name) is None or cls.writes <= COMPOSES:
            continue
        why = CONFLICTS.get(f.name) or (f"{cls.label} decides "
                                        f"{', '.join(FIELD_MEANING[x] for x in sorted(cls.writes - COMPOSES))}, "
                                        f"which CSpD lays out itself for both models")
        raise ValueError(f"CSpD with {f.name} on the {role}: {why}. Only LazyMAR's head cache composes with "
                         f"CSpD (it decides nothing but the head's model function; e.g. {role}_accel='lazymar-head')")


def cspd_preset(name: str, draft: Any, **settings: Any) -> CSpDConfig:
    """The :class:`CSpDConfig` of preset ``name`` (:data:`CSPD_PRESETS`: ``"cspd"`` with the fixes,
    ``"cspd-release"`` with the release's defects) for ``draft``; ``settings`` override."""
    if name not in CSPD_PRESETS:
        raise ValueError(f"unknown CSpD preset {name!r}; choose one of {sorted(CSPD_PRESETS)}")
    return CSpDConfig(draft=draft, **{**CSPD_PRESETS[name], **settings})


# ------------------------------------------------------------------------------------------ scripts
def named_accel(accel: str | None, draft=None, *, on_stats: Callable[["CSpDStats"], None] | None = None):
    """The config a script's ``--accel NAME`` asks for: None (plain MAR), a preset's
    :class:`~lazymar.config.AccelConfig`, or for a CSpD preset a :class:`CSpDConfig` with ``draft``
    (the loaded draft MAR) reporting to ``on_stats``."""
    if accel in CSPD_PRESETS:
        if draft is None:
            raise ValueError(f"--accel {accel} needs a draft model (--draft_model)")
        return cspd_preset(accel, draft, on_stats=on_stats)
    if draft is not None:
        raise ValueError(f"a draft model is only used by speculative decoding: --accel "
                         f"{' or '.join(sorted(CSPD_PRESETS))}, not {accel}")
    return None if accel is None else preset(accel)


# ------------------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Verification:
    """One verification pass: after draft ``step``, ``verified`` tokens (all images), ``accepted`` drafts
    kept, ``residual_rounds`` run, ``unaccepted`` tokens with no accepted residual proposal."""

    step: int
    verified: int
    accepted: int
    residual_rounds: int
    unaccepted: int


@dataclass
class CSpDStats:
    """What one CSpD generation did: its pre-fill steps, draft steps and verifications.

    The sampler records each verification's counts as device tensors (:meth:`record`) and reads them all
    on the host when ``verifications`` is first asked for, after the generation: reading them during it
    would make a GPU wait for the host at every verification.
    """

    num_iter: int = 0
    prefill_steps: list[int] = field(default_factory=list)
    draft_steps: list[int] = field(default_factory=list)
    verification_steps: list[int] = field(default_factory=list)
    _verified: list[int] = field(default_factory=list, init=False, repr=False)
    # Per verification, (3,) on the device: accepted, residual rounds, unaccepted.
    _counts: list[torch.Tensor] = field(default_factory=list, init=False, repr=False, compare=False)
    _read: list[Verification] = field(default_factory=list, init=False, repr=False, compare=False)

    def record(self, step: int, verified: int, verdict: Verdict) -> None:
        """A verification after draft ``step`` of ``verified`` tokens (a count the plan knows), decided by
        ``verdict``; nothing is read from the device."""
        self.verification_steps.append(step)
        self._verified.append(verified)
        self._counts.append(torch.stack([verdict.accepted.sum(), verdict.residual_rounds, verdict.unaccepted.sum()]))

    @property
    def verifications(self) -> list[Verification]:
        """Every verification, in order (the device counts read in one copy on first access)."""
        if len(self._read) < len(self._counts):
            counts = torch.stack(self._counts).tolist()
            self._read = [Verification(step, n, *c)
                          for step, n, c in zip(self.verification_steps, self._verified, counts, strict=True)]
        return self._read

    @property
    def verified(self) -> int:
        return sum(v.verified for v in self.verifications)

    @property
    def accepted(self) -> int:
        return sum(v.accepted for v in self.verifications)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / verified drafts over the whole generation (0 when nothing was verified)."""
        return self.accepted / self.verified if self.verified else 0.0

    @property
    def target_passes(self) -> int:
        """Transformer passes of the target: pre-fill steps and verifications."""
        return len(self.prefill_steps) + len(self.verification_steps)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for metrics files)."""
        return {"num_iter": self.num_iter, "prefill_steps": len(self.prefill_steps),
                "draft_steps": len(self.draft_steps), "target_passes": self.target_passes,
                "verified": self.verified, "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "verifications": [vars(v) for v in self.verifications]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The statistics of many generations (:meth:`CSpDStats.as_dict` of each, e.g. every batch of an
    evaluation) as one: totals, the overall acceptance rate, and per verification step (the same steps in
    every generation of one setting) the accepted and verified drafts summed over the generations."""
    if not runs:
        return {"generations": 0, "verified": 0, "accepted": 0, "acceptance_rate": 0.0, "verifications": []}
    by_step: dict[int, dict[str, int]] = {}
    for run in runs:
        for v in run["verifications"]:
            row = by_step.setdefault(v["step"], dict.fromkeys(("verified", "accepted", "residual_rounds",
                                                               "unaccepted"), 0))
            for k in row:
                row[k] += v[k]
    verified, accepted = sum(r["verified"] for r in runs), sum(r["accepted"] for r in runs)
    return {"generations": len(runs), "num_iter": runs[0]["num_iter"], "prefill_steps": runs[0]["prefill_steps"],
            "draft_steps": runs[0]["draft_steps"], "target_passes": runs[0]["target_passes"],
            "verified": verified, "accepted": accepted, "acceptance_rate": accepted / verified if verified else 0.0,
            "unaccepted": sum(row["unaccepted"] for row in by_step.values()),
            "verifications": [{"step": step, **row, "acceptance_rate": row["accepted"] / row["verified"]
                               if row["verified"] else 0.0} for step, row in sorted(by_step.items())]}


def describe(summary: dict[str, Any]) -> str:
    """One line of a :func:`summarize` (or :meth:`CSpDStats.as_dict`) result, for logs and figure labels."""
    return (f"accepted {summary['accepted']}/{summary['verified']} drafts ({summary['acceptance_rate']:.1%}), "
            f"{summary['target_passes']} target passes of {summary['num_iter']} steps")


class StatsLog:
    """An ``on_stats`` callback that keeps every generation's :class:`CSpDStats` (``last``, ``runs``)."""

    def __init__(self) -> None:
        self.runs: list[CSpDStats] = []

    def __call__(self, stats: CSpDStats) -> None:
        self.runs.append(stats)

    @property
    def last(self) -> CSpDStats:
        return self.runs[-1]


# ------------------------------------------------------------------------------------------ sampler
@dataclass
class _Drafts:
    """The draft's Gaussians of every drafted, not yet verified token, by position: (B, L, C) each."""

    mean: torch.Tensor
    std: torch.Tensor
    logstd_sum: torch.Tensor

    def put(self, idx: torch.Tensor, g: HeadGaussian) -> None:
        """Record the Gaussians ``g`` (B * n, C) of the tokens at ``idx`` (B, n); n may be 0 (a step past
        the sequence length predicts nothing, as in plain MAR)."""
        for name in ("mean", "std", "logstd_sum"):
            value = getattr(g, name).reshape(*idx.shape, self.mean.shape[-1])
            setattr(self, name, scattered_tokens(getattr(self, name), idx, value))

    def at(self, idx: torch.Tensor) -> HeadGaussian:
        return HeadGaussian(*(gather_rows(getattr(self, n), idx) for n in ("mean", "std", "logstd_sum")))


class CSpD:
    """Runs one CSpD generation with ``target`` verifying ``config.draft`` (see the module docstring): the
    sampler of ``target.sample_tokens(accel=CSpDConfig(...))``, a :class:`models.mar.LoopStrategy`."""

    def __init__(self, target, config: CSpDConfig, *, guided: bool) -> None:
        config.check_target(target)
        draft = config.draft
        steps_d, steps_t = (m.diffloss.gen_diffusion.num_timesteps for m in (draft, target))
        self.target, self.draft, self.config, self.guided = target, draft, config, guided
        # As released, the noise has the draft's step count; where the target has more (the release
        # indexes past the end), "prefix" draws for the larger count.
        self.noise_steps = max(steps_d, steps_t)
        self.factories = {role: config.head_model(role, model)[1]
                          for role, model in (("draft", draft), ("target", target))}

    def generate(self, bsz: int, *, num_iter: int, cfg: float, cfg_schedule: str, labels: torch.Tensor | None,
                 temperature: float, orders: torch.Tensor | None, generator: torch.Generator | None,
                 progress: bool) -> torch.Tensor:
        target, draft, config = self.target, self.draft, self.config
        if not temperature > 0:
            raise ValueError(f"CSpD needs temperature > 0 (its test compares Gaussians whose width it scales), "
                             f"got {temperature}")
        if labels is not None and labels.numel() and int(labels.max()) >= draft.num_classes:
            raise ValueError(f"labels must be in [0, {draft.num_classes}) for the draft too, got max {int(labels.max())}")
        device = target.fake_latent.device
        if draft.fake_latent.device != device:
            raise ValueError(f"draft is on {draft.fake_latent.device}, target on {device}: move both to one device")
        L, C = target.seq_len, target.token_embed_dim
        # Trajectory noise of every token (starting and per step), drawn before the orders as released.
        start = _randn((bsz, L, C), generator, device)  # (B, L, C)
        step_noise = _randn((bsz, L, self.noise_steps, C), generator, device)  # (B, L, S, C)
        if orders is None:
            orders = target.sample_orders(bsz, generator, device)
        orders = orders.to(device)
        guided = self.guided
        if guided != guidance_on(cfg):
            raise ValueError(f"this CSpD sampler was built for guided={guided}, called with cfg={cfg}")
        labels = labels.to(device) if labels is not None else None
        embeddings = {"target": target.class_embeddings(bsz, labels, guided),
                      "draft": draft.class_embeddings(bsz, labels, guided)}
        plan = plain_mask_lens(num_iter, L)
        stats = CSpDStats(num_iter=num_iter)
        tokens = torch.zeros(bsz, L, C, device=device)
        mask = torch.ones(bsz, L, dtype=torch.bool, device=device)
        masked = L
        committed, committed_masked = mask, L  # the mask the target last saw (end of pre-fill / verification)
        drafts = _Drafts(*(torch.zeros(bsz, L, C, device=device) for _ in range(3)))
        steps = tqdm(range(num_iter), desc="CSpD steps", leave=False) if progress else range(num_iter)
        for step in steps:
            last = step == num_iter - 1
            masked_after = 0 if last else plan[step]
            mask_after = torch.zeros_like(mask) if last else target.mask_by_order(plan[step], orders)
            to_pred = mask & ~mask_after
            scale = guidance_scale(cfg, cfg_schedule, plan[step], L)
            prefill = is_prefill(step, num_iter, config.ratio)
            role = "target" if prefill else "draft"
            # One plain MAR step of the pre-filling target or of the draft, on the aligned noise; the draft
            # sees every token so far, unverified drafts included.
            idx = positions(to_pred, masked - masked_after)  # (B, n)
            g = self._head(role, tokens, mask, idx, L - masked, embeddings[role], temperature, scale,
                           start, step_noise)
            x = g.mean
            if role == "draft" and config.draft_token == "sample":
                x = g.mean + g.std * gather_rows(step_noise[:, :, 0], idx)
            tokens = scattered_tokens(tokens, idx, x.reshape(bsz, idx.shape[1], C))
            if prefill:
                stats.prefill_steps.append(step)
                committed, committed_masked = mask_after, masked_after
            else:
                stats.draft_steps.append(step)
                drafts.put(idx, g)
                if is_verification(step, num_iter, config.num_draft):
                    tokens, verdict, n = self._verify(tokens, committed, committed_masked, mask_after, masked_after,
                                                      drafts, embeddings["target"], temperature, scale, start,
                                                      step_noise, generator)
                    stats.record(step, n, verdict)
                    committed, committed_masked = mask_after, masked_after
            mask, masked = mask_after, masked_after
        if config.on_stats is not None:
            config.on_stats(stats)
        return tokens

    def _verify(self, tokens, committed, committed_masked, mask_after, masked_after, drafts: _Drafts,
                class_embedding, temperature, scale, start, step_noise, generator):
        """The target's pass: its encoder sees only the committed tokens; its head scores every token
        drafted since, all at this step's guidance scale; the verdict rewrites them."""
        bsz, _, C = tokens.shape
        drafted = committed & ~mask_after
        idx = positions(drafted, committed_masked - masked_after)  # (B, n)
        p = self._head("target", tokens, committed, idx, tokens.shape[1] - committed_masked, class_embedding,
                       temperature, scale, start, step_noise)
        config = self.config
        verdict: Verdict = verify(gather_rows(tokens, idx), drafts.at(idx), p, inner_temperature=config.inner_temperature,
                                  max_rounds=config.residual_rounds,
                                  residual_inner_temperature=config.residual_inner_temperature,
                                  residual_stop=config.residual_stop, unaccepted=config.unaccepted,
                                  residual_exit=config.residual_exit, generator=generator)
        tokens = scattered_tokens(tokens, idx, verdict.out.reshape(bsz, idx.shape[1], C))
        return tokens, verdict, idx.numel()

    def _head(self, role: str, tokens, mask, idx, n_known: int, class_embedding, temperature: float,
              scale: float, start, step_noise) -> HeadGaussian:
        """One model's transformer on ``tokens`` under ``mask`` and its head on the positions ``idx`` (B, n),
        on their aligned noise: the head's last-step Gaussian and earlier log-standard-deviations."""
        model = self.target if role == "target" else self.draft
        rows = class_embedding.shape[0] // tokens.shape[0]  # 2 with guidance: conditional half first
        z = model.transformer(tokens.repeat(rows, 1, 1), mask.float().repeat(rows, 1), class_embedding, n_known)
        z = gather_rows(z, idx.repeat(rows, 1))  # (rows * B * n, D)
        S = model.diffloss.gen_diffusion.num_timesteps
        noise_steps = gather_tokens(step_noise[:, :, :S].flatten(2), idx).reshape(-1, S, tokens.shape[2])
        trace = TrajectoryTrace()
        model.diffloss.sample(z, temperature, scale, guided=rows == 2, noise=gather_rows(start, idx),
                              step_noise=noise_steps, trace=trace, model_fn_factory=self.factories[role])
        logstd_sum = trace.logstd_sum if trace.logstd_sum is not None else torch.zeros_like(trace.last_mean)
        return HeadGaussian(trace.last_mean, torch.exp(0.5 * trace.last_log_variance) * temperature, logstd_sum)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is not None:
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    return torch.randn(shape, device=device)
