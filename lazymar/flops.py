"""FLOPs of one image's generation, split by component, for any model size, preset and step count.

Two ways to count, held to the same number by the tests:

- :func:`estimate` — an exact formula of what this project's sampler executes (every linear layer and
  attention product, per MAR step and per diffusion step), priced from the sampler's own step plans by
  the techniques that run each part. It needs only the model's shape, so MAR-H at 64 steps counts in
  milliseconds.
- :func:`measure` — a real run under a dispatch mode that counts matmul-type ops with PyTorch's FLOP
  registry (plus CPU attention, which the registry lacks) and attributes each op to a component by the
  weights it reads (attention products go to the component of the projection before them).

What is counted: multiply-adds x 2 of linear layers, attention products (QK^T and AV) and
convolutions. Not counted: normalisations, activations, softmax, elementwise guidance arithmetic,
gathers (a few percent of the total; docs/techniques.md, "FLOPs of LazyMAR against the paper", relates it to the papers' counts).

The command line is :mod:`benchmarks.flops` (``python -m benchmarks.flops --model mar_huge --accel lazymar``).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from lazymar.config import OFF
from lazymar.names import resolve_accel
from lazymar.plan import ModelShape
from lazymar.steps import AccelSteps
from models.schedules import guidance_on

COMPONENTS = ("encoder", "decoder", "diffusion_head", "vae_decode")


@dataclass
class FlopReport:
    """FLOPs per image by component. ``total`` is generation (transformer + head); the VAE decode is
    reported beside it, as the papers' counts leave it out."""

    components: dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in COMPONENTS})

    @property
    def total(self) -> float:
        return sum(v for k, v in self.components.items() if k != "vae_decode")

    @property
    def total_with_vae(self) -> float:
        return sum(self.components.values())

    def as_dict(self, unit: float = 1e12) -> dict[str, Any]:
        return {"total_tflops": self.total / unit, "total_with_vae_tflops": self.total_with_vae / unit,
                "components": {k: v / unit for k, v in self.components.items()}}


# --------------------------------------------------------------------------------------- formula
def estimate(model, *, num_iter: int, cfg: float, accel: Any = None, bsz: int = 1,
             vae=None) -> FlopReport:
    """Exact FLOPs per image of ``model.sample_tokens(bsz, num_iter, cfg, accel=accel)`` (+ VAE decode).

    The count prices the sampler's own step plans (:class:`lazymar.steps.AccelSteps`): each part of a
    step is priced by the technique that runs it, from the counts that technique planned, so what is
    counted cannot drift from what runs.

    Args:
        model: a MAR (a ``meta``-device one is enough: only shapes are read).
        num_iter: MAR steps.
        cfg: guidance scale (only whether it guides matters, ``models.schedules.guidance_on``).
        accel: None, a preset name or an acceleration config; a config over more than one model
            (:class:`lazymar.cspd.CSpDConfig`) prices itself through its ``estimate_flops`` hook (both
            models' components summed).
        bsz: batch size; only the timestep embedding (one per diffusion step, shared by the batch)
            makes FLOPs per image depend on it.
        vae: optional VAE whose decode of one latent is counted (on the meta device).
    """
    if callable(getattr(accel, "estimate_flops", None)):  # runs more than this model: its own plan
        report = accel.estimate_flops(model, num_iter=num_iter, cfg=cfg, bsz=bsz)
        if vae is not None:
            report.components["vae_decode"] = vae_decode_flops(vae, ModelShape.of(model))
        return report
    config = OFF if accel is None else resolve_accel(accel)
    steps = AccelSteps(model, config, num_iter=num_iter, guided=guidance_on(cfg))
    s = ModelShape.of(model)
    enc = dec = head = 0
    for p in steps.plans:
        rows = p.rows(bsz)
        if p.transformer is not None:
            macs = p.transformer.transformer_macs(p, s, rows)
            enc, dec = enc + macs["encoder"], dec + macs["decoder"]
        else:
            enc += p.encoder.encoder_macs(p, s, rows)
            dec += p.decoder.decoder_macs(p, s, rows)
        for call in p.head:
            diffusion_steps = model.diffloss.sampling_diffusion(call.steps, call.max_timestep).num_timesteps
            head += p.head_runner.head_macs(p, s, call.tokens * bsz, diffusion_steps)
    report = FlopReport()
    report.components.update(encoder=2.0 * enc / bsz, decoder=2.0 * dec / bsz, diffusion_head=2.0 * head / bsz)
    if vae is not None:
        report.components["vae_decode"] = vae_decode_flops(vae, s)
    return report


def vae_decode_flops(vae, s: ModelShape | None = None, latent_hw: int | None = None) -> float:
    """FLOPs of decoding one latent, counted by PyTorch on a meta-device copy (no memory, no compute)."""
    hw = latent_hw if latent_hw is not None else int(round(s.seq_len ** 0.5))
    on_meta = next(vae.parameters()).device.type == "meta"
    meta_vae = vae if on_meta else copy.deepcopy(vae).to("meta")
    counter = _Counter({})
    with torch.no_grad(), counter:
        meta_vae.decode(torch.empty(1, vae.embed_dim, hw, hw, device="meta"))
    return float(sum(counter.totals.values()))


# --------------------------------------------------------------------------------------- measure
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


class _Counter(TorchDispatchMode):
    """Counts registered matmul-type ops; attributes them to components by the weight storage they read."""

    def __init__(self, owners: dict[int, str]) -> None:
        super().__init__()
        self.owners = owners
        self.totals: dict[str | None, int] = defaultdict(int)
        self.current: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        for a in args:
            if isinstance(a, torch.Tensor) and a.device.type != "meta":
                owner = self.owners.get(a.untyped_storage().data_ptr())
                if owner is not None:
                    self.current = owner
                    break
        fn = flop_registry.get(packet)
        if fn is None and packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            q, k, v = args[:3]
            flops = _cpu_sdpa_flops(q.shape, k.shape, v.shape)
        elif fn is not None:
            flops = fn(*args, **kwargs, out_val=out)
        else:
            return out
        self.totals[self.current] += flops
        return out


def measure(model, *, num_iter: int, cfg: float, accel: Any = None, bsz: int = 1,
            vae=None, **sample_kwargs) -> FlopReport:
    """Count FLOPs per image of a real ``sample_tokens`` run (and VAE decode), by component (for a config
    over more than one model, through its ``measure_flops`` hook: both models' components summed)."""
    if callable(getattr(accel, "measure_flops", None)):
        report = accel.measure_flops(model, num_iter=num_iter, cfg=cfg, bsz=bsz, **sample_kwargs)
        if vae is not None:
            report.components["vae_decode"] = vae_decode_flops(vae, ModelShape.of(model))
        return report
    owners: dict[int, str] = {}
    for name, p in model.named_parameters():
        component = "diffusion_head" if name.startswith("diffloss.") else (
            "decoder" if name.startswith(("decoder", "mask_token", "diffusion_pos")) else "encoder")
        owners[p.untyped_storage().data_ptr()] = component
    counter = _Counter(owners)
    labels = torch.arange(bsz) % model.num_classes
    with torch.no_grad(), counter:
        tokens = model.sample_tokens(bsz, num_iter=num_iter, cfg=cfg, accel=accel, labels=labels,
                                     **sample_kwargs)
    report = FlopReport()
    for comp, flops in counter.totals.items():
        report.components[comp or "encoder"] += flops / bsz
    if vae is not None:
        report.components["vae_decode"] = vae_decode_flops(vae, latent_hw=tokens.shape[-1])
    return report
