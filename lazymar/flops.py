"""FLOPs of one image's generation, split by component, for any model size, policy and step count.

Two ways to count, held to the same number by the tests:

- :func:`estimate` — an exact formula of what this project's sampler executes (every linear layer and
  attention product, per MAR step and per diffusion step, following the same pure schedule functions
  the policies use). It needs only the model's shape, so MAR-H at 64 steps counts in milliseconds.
- :func:`measure` — a real run under a dispatch mode that counts matmul-type ops with PyTorch's FLOP
  registry (plus CPU attention, which the registry lacks) and attributes each op to a component by the
  weights it reads (attention products go to the component of the projection before them).

What is counted: multiply-adds x 2 of linear layers, attention products (QK^T and AV) and
convolutions. Not counted: normalisations, activations, softmax, elementwise guidance arithmetic,
gathers (a few percent of the total; see the README for how this relates to the papers' counts).

CLI: ``python -m lazymar.flops --model mar_huge --num_iter 64 --cfg 3.25 [--accel lazymar] [--json]``.
"""
from __future__ import annotations

import argparse
import copy
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from lazymar.schedules import head_mlp_recompute, is_head_refresh_step, keep_count

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
@dataclass(frozen=True)
class _Shape:
    """What the count needs from a MAR."""

    seq_len: int
    buffer: int
    token_dim: int
    enc_dim: int
    enc_hidden: int
    enc_depth: int
    dec_dim: int
    dec_hidden: int
    dec_depth: int
    head_width: int
    head_depth: int
    head_steps: int

    @classmethod
    def of(cls, model) -> "_Shape":
        return cls(seq_len=model.seq_len, buffer=model.buffer_size, token_dim=model.token_embed_dim,
                   enc_dim=model.z_proj.out_features, enc_depth=len(model.encoder_blocks),
                   enc_hidden=model.encoder_blocks[0].mlp.fc1.out_features if len(model.encoder_blocks) else 0,
                   dec_dim=model.decoder_embed.out_features, dec_depth=len(model.decoder_blocks),
                   dec_hidden=model.decoder_blocks[0].mlp.fc1.out_features,
                   head_width=model.diffloss.net.model_channels, head_depth=model.diffloss.net.num_res_blocks,
                   head_steps=model.diffloss.gen_diffusion.num_timesteps)


def _block_macs(dim: int, hidden: int, n_q: int, n_k: int, n_rest: int | None = None) -> int:
    """One transformer block: qkv and attention for ``n_q`` queries over ``n_k`` keys, projection and
    MLP for ``n_rest`` tokens (default ``n_q``)."""
    n_rest = n_q if n_rest is None else n_rest
    return n_q * dim * 3 * dim + 2 * n_q * n_k * dim + n_rest * (dim * dim + 2 * dim * hidden)


def _transformer_macs(s: _Shape, rows: int, known: int, enc_compute: int | None,
                      dec_kept: int | None, sim_layer: int) -> tuple[int, int]:
    """(encoder, decoder) MACs of one step for ``rows`` images with ``known`` known tokens."""
    n_e = s.buffer + known
    nq = n_e if enc_compute is None else enc_compute
    enc = rows * (s.seq_len * s.token_dim * s.enc_dim
                  + s.enc_depth * _block_macs(s.enc_dim, s.enc_hidden, nq, n_e))
    N = s.buffer + s.seq_len
    dec = rows * n_e * s.enc_dim * s.dec_dim  # decoder_embed
    if dec_kept is None:
        dec += rows * s.dec_depth * _block_macs(s.dec_dim, s.dec_hidden, N, N)
    else:
        dec += rows * (sim_layer * _block_macs(s.dec_dim, s.dec_hidden, N, N)
                       + _block_macs(s.dec_dim, s.dec_hidden, N, N, dec_kept)
                       + (s.dec_depth - sim_layer - 1) * _block_macs(s.dec_dim, s.dec_hidden, dec_kept, N))
    return enc, dec


def _marche_decoder_macs(s: _Shape, rows: int, n_base: int, n_active: int, score_layer: int) -> int:
    """Decoder MACs of a MARche step: ``n_base`` active queries up to ``score_layer``, where the active
    set grows to ``n_active`` (the newcomers' qkv and a second attention pass), then ``n_active``; every
    query attends over all N positions (cached and active)."""
    N, D, Hd = s.buffer + s.seq_len, s.dec_dim, s.dec_hidden
    macs = score_layer * _block_macs(D, Hd, n_base, N)
    if n_active > n_base:
        macs += (n_base * D * 3 * D + 2 * n_base * N * D  # first pass, which scores the cached tokens
                 + (n_active - n_base) * D * 3 * D + 2 * n_active * N * D + n_active * (D * D + 2 * D * Hd))
    else:
        macs += _block_macs(D, Hd, n_base, N)
    macs += (s.dec_depth - score_layer - 1) * _block_macs(D, Hd, n_active, N)
    return rows * macs


def _head_macs(s: _Shape, n: int, guided: bool, head_cache, steps: int | None = None) -> int:
    """Diffusion-head MACs of one ``DiffLoss.sample`` call on ``n`` tokens (all images of the batch) with
    ``steps`` diffusion steps (default: the model's); the timestep embedding is computed once per
    diffusion step for the whole batch."""
    W, C = s.head_width, s.token_dim
    T = s.head_steps if steps is None else steps
    rows = 2 * n if guided else n
    block = 5 * W * W  # adaLN (3W^2) + MLP (2W^2)
    final = 2 * W * W + W * 2 * C
    per_step_full = rows * (C * W + s.head_depth * block + final)
    time_embed = 256 * W + W * W  # one row per diffusion step (shared by all tokens)
    macs = rows * s.dec_dim * W  # cond_embed, once per MAR step
    for i in range(T):
        macs += time_embed
        if head_cache is None or is_head_refresh_step(i, T, head_cache.interval):
            macs += per_step_full
            continue
        r = n if (guided and head_cache.guidance) else rows
        recompute = head_mlp_recompute(i, T, head_cache.mlp_warmup)
        live = [j for j in range(s.head_depth) if j not in head_cache.residual_blocks]
        macs += r * (C * W + final + len(live) * (3 * W * W + (2 * W * W if recompute else 0)))
    return macs


def estimate(model, *, num_iter: int, cfg: float, accel: Any = None, bsz: int = 1,
             vae=None) -> FlopReport:
    """Exact FLOPs per image of ``model.sample_tokens(bsz, num_iter, cfg, accel=accel)`` (+ VAE decode).

    Args:
        model: a MAR (a ``meta``-device one is enough: only shapes are read).
        num_iter: MAR steps.
        cfg: guidance scale (only ``cfg != 1`` matters).
        accel: None, a preset name or a policy config.
        bsz: batch size; only the timestep embedding (one per diffusion step, shared by the batch)
            makes FLOPs per image depend on it.
        vae: optional VAE whose decode of one latent is counted (on the meta device).
    """
    from lazymar.gtr import fts_steps_split, head_steps_of
    from lazymar.policy import AccelSteps, resolve_accel
    from models.schedules import plain_mask_lens
    config = None if accel is None else resolve_accel(accel)
    s = _Shape.of(model)
    guided = cfg != 1.0
    if config is None:
        plan, steps = plain_mask_lens(num_iter, s.seq_len), None
    else:  # the sampler's own plan: GtR's staged schedule, MARche's active set size
        steps = AccelSteps(model, config, num_iter=num_iter, guided=guided)
        plan = steps.mask_lens()
    num_steps = len(plan)
    tc = config.token_cache if config else None
    mc = config.marche if config else None
    gtr = config.gtr if config else None
    cond_cache = config is not None and config.condition_cache is not None and guided
    head_cache = config.head_cache if config else None
    sim_layer = min(tc.similarity_layer, s.dec_depth - 1) if tc else 0
    N = s.buffer + s.seq_len
    enc = dec = head = 0
    masked, prev_pred = s.seq_len, 0
    for step, mask_len in enumerate(plan):
        n_pred = masked if step == num_steps - 1 else masked - mask_len
        known = s.seq_len - masked
        refresh = (config is None or step == 0 or not config.caches_transformer
                   or config.is_refresh(step, num_steps))
        marche_full = mc is not None and (step == 0 or mc.is_refresh(step) or (cond_cache and refresh))
        rows = (2 if guided and (refresh or not cond_cache) else 1) * bsz
        enc_full = (marche_full or steps.active_count >= N) if mc is not None else refresh
        incremental = (tc is not None and tc.encoder) or (mc is not None and mc.cache_encoder)
        enc_compute = s.buffer + prev_pred if (incremental and not enc_full) else None
        if mc is not None:
            e, _ = _transformer_macs(s, rows, known, enc_compute, None, 0)
            if marche_full:
                _, d = _transformer_macs(s, rows, known, None, None, 0)
            else:
                n_base = n_pred + (prev_pred if mc.include_prev else 0)
                n_active = min(N, max(steps.active_count, n_base))
                d = rows * (s.buffer + known) * s.enc_dim * s.dec_dim  # decoder_embed
                d += _marche_decoder_macs(s, rows, n_base, n_active, min(mc.score_layer, s.dec_depth - 1))
        else:
            kept = None
            if tc and tc.decoder and not refresh:
                retain = tc.retain_at(step, config.schedule_length(num_steps))
                count = keep_count(N, retain, n_pred, prev_pred, tc.extra_tokens)
                kept = None if count >= N else count
            e, d = _transformer_macs(s, rows, known, enc_compute, kept, sim_layer)
        enc, dec = enc + e, dec + d
        if gtr is None or not gtr.diffusion:
            head += _head_macs(s, n_pred * bsz, guided, head_cache)
        else:
            k = head_steps_of(step, steps.generation_steps, gtr)
            recon = gtr.has_reconstruction and step >= steps.generation_steps
            for n, k_i in (fts_steps_split(n_pred, k, gtr) if recon else [(n_pred, k)]):
                if n:
                    head += _head_macs(s, n * bsz, guided, head_cache, k_i)
        masked, prev_pred = mask_len, n_pred
    report = FlopReport()
    report.components.update(encoder=2.0 * enc / bsz, decoder=2.0 * dec / bsz, diffusion_head=2.0 * head / bsz)
    if vae is not None:
        report.components["vae_decode"] = vae_decode_flops(vae, s)
    return report


def vae_decode_flops(vae, s: _Shape | None = None, latent_hw: int | None = None) -> float:
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
    """Count FLOPs per image of a real ``sample_tokens`` run (and VAE decode), by component."""
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


# --------------------------------------------------------------------------------------- CLI
def format_table(rows: list[tuple[str, FlopReport]]) -> str:
    head = f"{'policy':<20}" + "".join(f"{c:>16}" for c in COMPONENTS) + f"{'total':>12}{'ratio':>8}"
    lines = [head, "-" * len(head)]
    base = rows[0][1].total
    for name, r in rows:
        lines.append(f"{name:<20}" + "".join(f"{r.components[c] / 1e12:>15.3f}T" for c in COMPONENTS)
                     + f"{r.total / 1e12:>11.2f}T{base / r.total:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from lazymar.config import PRESETS
    from models.mar import MAR_FACTORIES, build_released
    from models.schedules import check_sampling_settings
    from models.vae import KL16_CONFIG, AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mar_huge", choices=sorted(MAR_FACTORIES))
    parser.add_argument("--num_iter", type=int, default=64)
    parser.add_argument("--cfg", type=float, default=3.25)
    parser.add_argument("--num_sampling_steps", type=int, default=100)
    parser.add_argument("--accel", default=None, nargs="+", choices=sorted(PRESETS) + ["all"],
                        help="policies to count beside the baseline (default: baseline only; 'all': every preset)")
    parser.add_argument("--json", action="store_true", help="print the accelerated (or baseline) report as JSON")
    args = parser.parse_args(argv)
    check_sampling_settings(num_iter=args.num_iter, cfg=args.cfg)
    with torch.device("meta"):
        model = build_released(args.model, num_sampling_steps=args.num_sampling_steps)
        vae = AutoencoderKL(**KL16_CONFIG)
    rows = [("baseline", estimate(model, num_iter=args.num_iter, cfg=args.cfg, vae=vae))]
    names = sorted(PRESETS) if args.accel == ["all"] else (args.accel or [])
    for name in names:
        rows.append((name, estimate(model, num_iter=args.num_iter, cfg=args.cfg, accel=name, vae=vae)))
    if args.json:
        out = rows[-1][1].as_dict()
        out.update(model=args.model, num_iter=args.num_iter, cfg=args.cfg, accel=rows[-1][0] if names else None,
                   baseline_total_tflops=rows[0][1].total / 1e12)
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.model}, {args.num_iter} steps, cfg {args.cfg}, {args.num_sampling_steps} diffusion steps, "
              f"FLOPs per image (total excludes the VAE decode)")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    from util import cli
    cli.run(main)
