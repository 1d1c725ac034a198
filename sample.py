"""Write a grid of class-conditional samples (rows = classes).

    python sample.py                                   # demo model, its 12 classes, < 1 minute on a CPU
    python sample.py --model mar_huge --classes 207 360 387 974 88 979 417 279 --cfg 3.2
    python sample.py --compare                         # plain | LazyMAR from the same seeds

``--compare`` samples the same batch twice from the same seed (same orders, same noise), without and
with acceleration (``--accel``, default ``lazymar``), and writes both grids side by side, each labelled
with its latency and FLOPs per image.

``--accel cspd --draft_model MODEL`` samples by continuous speculative decoding, ``--model`` verifying
what the draft proposes; it prints (and with ``--compare`` writes under the grid) how many drafts were
accepted.

Without the demo model's files (``pretrained_models/demo``, see ``demo/registry.py``) the default run
falls back to the ``tiny-random`` model (untrained: its images are noise) and says so.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from demo.registry import DEMO_MODEL  # also registers the demo models (and their sampling defaults) with util.loading
from lazymar.cspd import CSpDConfig, StatsLog, describe, named_accel
from lazymar.names import ACCEL_NAMES, check_draft_flags
from lazymar.planned import check_planned_model
from models.schedules import check_sampling_settings
from util.compile import add_compile_args, apply_compile, compile_mode
from util.device import best_device
from util.generate import SamplingSettings, add_sampling_args, generate_batches, sampling_flags
from util.loading import TINY_MODEL, Generator, load_draft, load_generator, model_choices
from util.precision import AUTO, PRECISION_CHOICES, resolve_precision

LABEL_HEIGHT = 24
IMAGENET_EXAMPLE = [207, 360, 387, 974, 88, 979, 417, 279]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL, choices=model_choices())
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids, one row each (default: all classes of the demo / tiny model, "
                        f"{IMAGENET_EXAMPLE} for ImageNet models)")
    p.add_argument("--num_per_class", type=int, default=4)
    add_sampling_args(p)
    p.add_argument("--num_sampling_steps", type=int, default=None,
                   help="diffusion steps of the head (default: the model's own: 100, the demo's from its "
                        "checkpoint; 20 for the untrained tiny-random fallback)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan_from_other_model", action="store_true",
                   help="allow a planned preset (--accel fast / balanced) on a model it was not chosen on "
                        "(refused by default: it was measured on another model)")
    p.add_argument("--accel", default=None, choices=ACCEL_NAMES,
                   help="acceleration preset (cspd / cspd-release: speculative decoding, with --draft_model)")
    p.add_argument("--draft_model", default=None, choices=model_choices(),
                   help="the draft of --accel cspd: a smaller model with --model's token grid")
    p.add_argument("--draft_ckpt", default=None, help="the draft's MAR checkpoint (released models)")
    p.add_argument("--lazy_mar", action="store_true", help="same as --accel lazymar")
    p.add_argument("--compare", action="store_true", help="plain and accelerated grids side by side")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--device", default=str(best_device()), help="this machine's best (util.device.best_device)")
    p.add_argument("--precision", default=AUTO, choices=PRECISION_CHOICES,
                   help="autocast sampling and decoding (weights stay float32); auto: bf16 on a CPU with native "
                        "bf16 (AVX-512 BF16 or AMX), else fp32 (util.precision.resolve_precision)")
    add_compile_args(p)
    p.add_argument("--ckpt", default=None, help="MAR checkpoint (released models)")
    p.add_argument("--vae_path", default=None, help="VAE checkpoint (released models)")
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The model's default sampling settings, overridden by the flags given (:func:`util.generate.sampling_flags`)."""
    return sampling_flags(args.model, args)[0]


def _load(args: argparse.Namespace) -> Generator:
    if args.model == DEMO_MODEL:
        try:
            return load_generator(DEMO_MODEL, ckpt=args.ckpt, vae_path=args.vae_path, device=args.device,
                                  num_sampling_steps=args.num_sampling_steps)
        except FileNotFoundError as e:
            print(f"NOTICE: the demo model is not available ({e}).\n"
                  f"NOTICE: falling back to '{TINY_MODEL}', an UNTRAINED model: the grid will show noise.")
            args.model = TINY_MODEL
    steps = args.num_sampling_steps
    if steps is None and args.model == TINY_MODEL:
        steps = 20  # noise either way; keep the fallback fast
    return load_generator(args.model, ckpt=args.ckpt, vae_path=args.vae_path, device=args.device,
                          num_sampling_steps=steps)


def generate(gen: Generator, labels: torch.Tensor, settings: dict[str, Any], seed: int, accel: Any,
             precision: str = "fp32") -> tuple[np.ndarray, float]:
    """Images (B, H, W, 3) as one batch of :func:`util.generate.generate_batches`, and seconds per image
    (sampling + decode)."""
    sampling = SamplingSettings(**settings, accel=accel, precision=precision)
    (batch,) = generate_batches(gen, labels, sampling, seed=seed, batch_size=len(labels))
    return batch.images, batch.total_s / len(labels)


def make_grid(images: np.ndarray, rows: int, cols: int) -> Image.Image:
    b, h, w, _ = images.shape
    grid = images.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    return Image.fromarray(np.ascontiguousarray(grid))


def _labelled(grid: Image.Image, lines: list[str]) -> Image.Image:
    out = Image.new("RGB", (grid.width, grid.height + LABEL_HEIGHT), "white")
    out.paste(grid, (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((2, 1 + 11 * i), line, fill="black")
    return out


def main(args: argparse.Namespace) -> Image.Image:
    if args.lazy_mar and args.accel not in (None, "lazymar"):
        raise SystemExit(f"--lazy_mar conflicts with --accel {args.accel}")
    accel = "lazymar" if args.lazy_mar else args.accel
    if args.compare:
        accel = accel or "lazymar"
    t_start = time.perf_counter()
    check_sampling_settings(**_settings(args))  # before loading any weights
    if args.draft_ckpt is not None and args.draft_model is None:
        raise ValueError("--draft_ckpt needs --draft_model (the model whose weights it holds)")
    check_draft_flags(accel, args.draft_model)
    check_planned_model(accel, args.model, other_model=args.plan_from_other_model)
    mode = compile_mode(args, args.device)
    gen = _load(args)
    args.precision = resolve_precision(args.precision, next(gen.mar.parameters()).device)  # "auto" decided once
    print(f"precision {args.precision}")
    apply_compile(gen.mar, mode)
    stats = StatsLog()  # speculative decoding's acceptance statistics, one entry per generation
    draft = None if args.draft_model is None else load_draft(args.draft_model, gen, ckpt=args.draft_ckpt,
                                                             vae_path=args.vae_path)
    config = named_accel(accel, None if draft is None else draft.mar, on_stats=stats)
    if isinstance(config, CSpDConfig):
        config.check_target(gen.mar)  # another token grid: refused before sampling
        apply_compile(draft.mar, mode)
    settings = _settings(args)  # the model may have fallen back to tiny-random, with its own defaults
    num_classes = gen.mar.num_classes
    classes = args.classes
    if classes is None:
        classes = IMAGENET_EXAMPLE if num_classes == 1000 else list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise SystemExit(f"classes {bad} out of range for {args.model} ({num_classes} classes)")
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(args.num_per_class)
    print(f"{args.model}: {len(classes)} classes x {args.num_per_class}, {settings}")

    if not args.compare:
        images, sec = generate(gen, labels, settings, args.seed, config, args.precision)
        grid = make_grid(images, len(classes), args.num_per_class)
        print(f"{sec:.3f} s/image{' with ' + accel if accel else ''}")
        if stats.runs:
            print(f"{accel} ({args.draft_model} drafts): {describe(stats.last.as_dict())}")
    else:
        from lazymar.flops import estimate
        halves = []
        for name, a in (("plain", None), (accel, config)):
            images, sec = generate(gen, labels, settings, args.seed, a, args.precision)
            flops = estimate(gen.mar, num_iter=settings["num_iter"], cfg=settings["cfg"], accel=a,
                             bsz=len(labels)).total
            lines = [name, f"{sec * 1e3:.0f} ms, {flops / 1e9:.3g} GFLOPs / img"]
            if a is not None and stats.runs:  # speculative decoding: how many drafts the target kept
                name, lines[0] = f"{name} ({args.draft_model} drafts)", f"{name}, {args.draft_model} drafts"
                lines[1] += f", accepted {stats.last.acceptance_rate:.0%}"
                print(f"{name}: {describe(stats.last.as_dict())}")
            print(f"{name}: {sec:.3f} s/image, {flops / 1e9:.3f} GFLOPs/image")
            halves.append(_labelled(make_grid(images, len(classes), args.num_per_class), lines))
        grid = Image.new("RGB", (halves[0].width * 2, halves[0].height), "white")
        grid.paste(halves[0], (0, 0))
        grid.paste(halves[1], (halves[0].width, 0))
    grid.save(args.out)
    print(f"wrote {args.out} ({grid.width}x{grid.height}) in {time.perf_counter() - t_start:.1f} s")
    return grid


if __name__ == "__main__":
    from util import cli
    cli.run(main, build_parser().parse_args())
