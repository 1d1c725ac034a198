"""FLOPs of a CSpD generation, both models counted: an exact formula and a real count.

A CSpD generation runs the target's plain MAR step at every pre-fill step, the draft's plain step at every
later step, and one target pass per verification (its transformer over the committed tokens, its head over
the tokens drafted since). What it executes does not depend on how many drafts are accepted: there is no
prefix truncation and no draft is redone, every verified token is committed, and the residual rounds are
elementwise arithmetic on 16-channel Gaussians (about 350 FLOPs per token and round, ``residual_rounds``
rounds (100) with the default ``residual_exit="fixed"``, at most that many with the release's early exit:
a few MFLOPs per image, ~1e-6 of the total, not counted, as no elementwise work is here). So the cost is a
function of ``num_iter``, ``ratio`` and ``num_draft`` alone; the acceptance rate only decides how close the
output stays to the draft's or to the target's tokens. :func:`estimate` prices the plan,
:func:`measure` counts a real run (the tests hold them equal, component by component, and count each
model's passes and head calls where they run, with every draft rejected and with every draft kept).

    python -m benchmarks.cspd_flops --target mar_huge --draft mar_base --num_iter 256 --num_draft 4 --ratio 0.05
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lazymar.cspd_schedule import CSpDStepPlan
from lazymar.flops import COMPONENTS, FlopReport, _Counter
from lazymar.plan import HeadCall, ModelShape, StepPlan
from lazymar.technique import PlainMAR, Technique
from models.schedules import plain_mask_lens

if TYPE_CHECKING:  # the config hands itself in (its estimate_flops / measure_flops hooks)
    from lazymar.cspd import CSpDConfig


@dataclass
class CSpDFlops:
    """FLOPs per image of a CSpD generation, per model and component (``total``: both models)."""

    target: FlopReport = field(default_factory=FlopReport)
    draft: FlopReport = field(default_factory=FlopReport)
    plan: CSpDStepPlan | None = None

    @property
    def total(self) -> float:
        return self.target.total + self.draft.total

    def combined(self) -> FlopReport:
        """Both models' FLOPs per component in one report (what :func:`lazymar.flops.estimate` returns)."""
        out = FlopReport()
        for c in out.components:
            out.components[c] = self.target.components[c] + self.draft.components[c]
        return out

    def as_dict(self, unit: float = 1e12) -> dict[str, Any]:
        out = {"total_tflops": self.total / unit, "target": self.target.as_dict(unit), "draft": self.draft.as_dict(unit)}
        if self.plan is not None:
            out.update(prefill_steps=len(self.plan.prefill), draft_steps=len(self.plan.drafts),
                       verifications=len(self.plan.verifications),
                       target_passes=len(self.plan.prefill) + len(self.plan.verifications))
        return out


def _pass_macs(model, runner: Technique, *, n_known: int, n_pred: int, guided: bool, bsz: int) -> dict[str, int]:
    """One transformer pass of ``model`` over ``n_known`` known tokens and its head on ``n_pred`` tokens
    per image, priced by the plain formulas of :mod:`lazymar.plan` (the head by ``runner``)."""
    plain = PlainMAR(model)
    s = ModelShape.of(model)
    p = StepPlan(step=0, num_steps=1, n_known=n_known, n_pred=n_pred, n_prev=0, guided=guided, refresh=True,
                 halves=2 if guided else 1, encoder=plain, decoder=plain, head_runner=runner, head=[HeadCall(n_pred)])
    rows = p.rows(bsz)
    steps = model.diffloss.gen_diffusion.num_timesteps
    return {"encoder": plain.encoder_macs(p, s, rows), "decoder": plain.decoder_macs(p, s, rows),
            "diffusion_head": runner.head_macs(p, s, n_pred * bsz, steps)}


def estimate(target, config: CSpDConfig, *, num_iter: int, cfg: float, bsz: int = 1) -> CSpDFlops:
    """Exact FLOPs per image of ``target.sample_tokens(bsz, num_iter, cfg, accel=config)`` (both models;
    meta-device models are enough), whatever the acceptance rate (module docstring)."""
    draft, guided = config.draft, cfg != 1.0
    L = target.seq_len
    layout = CSpDStepPlan.of(num_iter, config.ratio, config.num_draft)
    lens = plain_mask_lens(num_iter, L)
    # Each head priced by the technique whose model function it runs (the sampler's own choice).
    runners = {role: config.head_model(role, model)[0] for role, model in (("target", target), ("draft", draft))}
    macs = {role: dict.fromkeys(COMPONENTS[:3], 0) for role in ("target", "draft")}

    def add(role: str, model, n_known: int, n_pred: int) -> None:
        for k, v in _pass_macs(model, runners[role], n_known=n_known, n_pred=n_pred, guided=guided, bsz=bsz).items():
            macs[role][k] += v

    masked = committed = L
    for step in range(num_iter):
        after = 0 if step == num_iter - 1 else lens[step]
        if step in layout.prefill:
            add("target", target, L - masked, masked - after)
            committed = after
        else:
            add("draft", draft, L - masked, masked - after)
            if step in layout.verifications:
                add("target", target, L - committed, committed - after)
                committed = after
        masked = after
    out = CSpDFlops(plan=layout)
    for role, report in (("target", out.target), ("draft", out.draft)):
        report.components.update({k: 2.0 * v / bsz for k, v in macs[role].items()})
    return out


def measure(target, config: CSpDConfig, *, num_iter: int, cfg: float, bsz: int = 1, **sample_kwargs) -> CSpDFlops:
    """Count FLOPs per image of a real CSpD run, attributed to each model's components by the weights
    each product reads (as :func:`lazymar.flops.measure`)."""
    owners: dict[int, str] = {}
    for role, model in (("target", target), ("draft", config.draft)):
        for name, p in model.named_parameters():
            component = "diffusion_head" if name.startswith("diffloss.") else (
                "decoder" if name.startswith(("decoder", "mask_token", "diffusion_pos")) else "encoder")
            owners[p.untyped_storage().data_ptr()] = f"{role}/{component}"
    counter = _Counter(owners)
    labels = torch.arange(bsz) % min(target.num_classes, config.draft.num_classes)
    with torch.no_grad(), counter:
        target.sample_tokens(bsz, num_iter=num_iter, cfg=cfg, accel=config, labels=labels, **sample_kwargs)
    out = CSpDFlops(plan=CSpDStepPlan.of(num_iter, config.ratio, config.num_draft))
    for key, flops in counter.totals.items():
        role, component = (key or "target/encoder").split("/")
        getattr(out, role).components[component] += flops / bsz
    return out
