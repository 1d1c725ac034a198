"""Latency and FLOPs of plain MAR and each preset, side by side, on one model in one run.

    python -m benchmarks.sampling --model mar_base --num_iter 64 --bsz 1 --presets lazymar lazymar-token

Random weights (cost does not depend on them). Latency per image is the median of ``--repeats`` timed
generations after an untimed warm-up generation, synchronized on GPU; FLOPs come from
:func:`lazymar.flops.estimate` (exact for this code). The VAE decode is excluded from both, as in the
papers' step-time comparisons (it is the same for every preset).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from lazymar.config import PRESETS
from lazymar.flops import estimate
from util.cli import check_positive
from util.precision import autocast
from util.timing import add_sampler_args, build_timed_model, check_sampler_args, median_time


@dataclass
class BenchRow:
    preset: str
    seconds_per_image: float
    tflops_per_image: float
    speedup: float = 1.0
    flops_ratio: float = 1.0

    @property
    def efficiency(self) -> float:
        """Measured speedup as a fraction of the FLOPs ratio."""
        return self.speedup / self.flops_ratio


def bench(model, presets: list[str | None], *, num_iter: int, cfg: float, bsz: int, repeats: int,
          device: torch.device, seed: int = 0, warmup_iter: int | None = None) -> list[BenchRow]:
    """Time ``sample_tokens`` for each preset (None = plain MAR, first) and pair it with its FLOPs."""
    labels = torch.arange(bsz, device=device) % model.num_classes
    rows = []
    for preset in presets:
        def run(n=num_iter, preset=preset):
            gen = torch.Generator(device).manual_seed(seed)
            with torch.no_grad():
                model.sample_tokens(bsz, num_iter=n, cfg=cfg, labels=labels, generator=gen,
                                    accel=None if preset is None else PRESETS[preset])

        warm = (lambda: run(warmup_iter)) if warmup_iter else None
        seconds = median_time(run, device, repeats, warmup=warm) / bsz
        flops = estimate(model, num_iter=num_iter, cfg=cfg, accel=preset, bsz=bsz).total / 1e12
        rows.append(BenchRow(preset or "plain", seconds, flops))
    base = rows[0]
    for r in rows:
        r.speedup = base.seconds_per_image / r.seconds_per_image
        r.flops_ratio = base.tflops_per_image / r.tflops_per_image
    return rows


def format_rows(rows: list[BenchRow]) -> str:
    out = [f"{'preset':<20}{'s/image':>10}{'TFLOPs':>9}{'speedup':>9}{'FLOPs ratio':>13}{'efficiency':>12}",
           "-" * 73]
    for r in rows:
        out.append(f"{r.preset:<20}{r.seconds_per_image:>10.2f}{r.tflops_per_image:>9.2f}{r.speedup:>8.2f}x"
                   f"{r.flops_ratio:>12.2f}x{r.efficiency:>11.0%}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sampler_args(p)
    p.add_argument("--presets", nargs="+", default=["lazymar"], choices=sorted(PRESETS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup_iter", type=int, default=4,
                   help="MAR steps of the untimed warm-up generation (0: a full-length one)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    check_sampler_args(args)
    check_positive(repeats=args.repeats)
    if args.warmup_iter < 0:
        raise ValueError(f"--warmup_iter must be >= 0, got {args.warmup_iter}")
    model, device = build_timed_model(args)
    with autocast(device, args.precision):
        rows = bench(model, [None, *args.presets], num_iter=args.num_iter, cfg=args.cfg, bsz=args.bsz,
                     repeats=args.repeats, device=device, warmup_iter=args.warmup_iter or None)
    if args.json:
        print(json.dumps([asdict(r) | {"efficiency": r.efficiency} for r in rows], indent=2))
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, {args.num_iter} steps, batch {args.bsz}, cfg {args.cfg}, {args.num_sampling_steps} "
          f"diffusion steps, {name}, {args.precision}; median of {args.repeats}")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    from util import cli
    cli.run(main)
