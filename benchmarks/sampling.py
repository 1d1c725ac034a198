"""Latency and FLOPs of plain MAR and each preset, side by side, on one model in one run.

    python -m benchmarks.sampling --model mar_base --num_iter 64 --bsz 1 --presets lazymar lazymar-token
    python -m benchmarks.sampling --model mar_huge --presets cspd --draft_model mar_base

Random weights (cost does not depend on them). Latency per image is the median of ``--repeats`` timed
generations after an untimed warm-up generation, synchronized on GPU; FLOPs come from
:func:`lazymar.flops.estimate` (exact for this code). The VAE decode is excluded from both, as in the
papers' step-time comparisons (it is the same for every preset). Speculative decoding (``cspd``,
``cspd-release``) times both models and counts both models' FLOPs; with random weights its acceptance
rate means nothing, and its cost barely depends on it (:mod:`lazymar.cspd_flops`). A progress bar
counts the presets, and each row is printed as its preset finishes (``--json``: all at the end).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from lazymar.cspd import named_accel
from lazymar.flops import estimate
from lazymar.names import ACCEL_NAMES, CSPD_PRESETS, check_draft_flags
from models.mar import MAR_FACTORIES
from util.cli import check_positive
from util.precision import autocast
from util.compile import apply_compile, compile_mode
from util.timing import add_sampler_args, build_random_model, build_timed_model, check_sampler_args, median_time


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
          device: torch.device, seed: int = 0, warmup_iter: int | None = None, draft=None,
          on_row: Callable[[BenchRow], None] | None = None, progress: bool = False) -> list[BenchRow]:
    """Time ``sample_tokens`` for each preset (None = plain MAR, first) and pair it with its FLOPs;
    ``draft``: the draft model of the CSpD presets among them.

    Args:
        on_row: called with each row as soon as its preset is timed (a run over many presets takes long).
        progress: a progress bar over the presets (stderr).
    """
    labels = torch.arange(bsz, device=device) % model.num_classes
    rows: list[BenchRow] = []
    with tqdm(total=len(presets), desc="benchmarks.sampling", unit="preset", disable=not progress) as bar:
        for preset in presets:
            bar.set_postfix_str(preset or "plain")
            accel = named_accel(preset, draft if preset in CSPD_PRESETS else None)

            def run(n=num_iter, accel=accel):
                gen = torch.Generator(device).manual_seed(seed)
                with torch.no_grad():
                    model.sample_tokens(bsz, num_iter=n, cfg=cfg, labels=labels, generator=gen, accel=accel)

            warm = (lambda: run(warmup_iter)) if warmup_iter else None
            seconds = median_time(run, device, repeats, warmup=warm) / bsz
            flops = estimate(model, num_iter=num_iter, cfg=cfg, accel=accel, bsz=bsz).total / 1e12
            row = BenchRow(preset or "plain", seconds, flops)
            base = rows[0] if rows else row  # plain MAR, timed first
            row.speedup = base.seconds_per_image / row.seconds_per_image
            row.flops_ratio = base.tflops_per_image / row.tflops_per_image
            rows.append(row)
            bar.update(1)
            if on_row is not None:
                on_row(row)
    return rows


HEADER = (f"{'preset':<20}{'s/image':>10}{'TFLOPs':>9}{'speedup':>9}{'FLOPs ratio':>13}{'efficiency':>12}\n"
          + "-" * 73)


def format_row(r: BenchRow) -> str:
    return (f"{r.preset:<20}{r.seconds_per_image:>10.2f}{r.tflops_per_image:>9.2f}{r.speedup:>8.2f}x"
            f"{r.flops_ratio:>12.2f}x{r.efficiency:>11.0%}")


def format_rows(rows: list[BenchRow]) -> str:
    return "\n".join([HEADER, *map(format_row, rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sampler_args(p)
    p.add_argument("--presets", nargs="+", default=["lazymar"], choices=ACCEL_NAMES)
    p.add_argument("--draft_model", default=None, choices=sorted(MAR_FACTORIES),
                   help="the draft of the cspd presets (random weights, as the target's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup_iter", type=int, default=4,
                   help="MAR steps of the untimed warm-up generation (0: a full-length one)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    check_sampler_args(args)
    check_positive(repeats=args.repeats)
    if args.warmup_iter < 0:
        raise ValueError(f"--warmup_iter must be >= 0, got {args.warmup_iter}")
    cspd = [n for n in args.presets if n in CSPD_PRESETS]
    check_draft_flags(cspd[0] if cspd else args.presets[-1], args.draft_model)
    model, device = build_timed_model(args)
    draft = None
    if args.draft_model is not None:
        draft = build_random_model(args.draft_model, num_sampling_steps=args.num_sampling_steps, device=device,
                                   seed=1)
        apply_compile(draft, compile_mode(args, device))
        named_accel(cspd[0], draft).check_target(model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if not args.json:  # the table's rows are printed as each preset finishes (tqdm.write: below the bar)
        print(f"{args.model}, {args.num_iter} steps, batch {args.bsz}, cfg {args.cfg}, {args.num_sampling_steps} "
              f"diffusion steps, {name}, {args.precision}; median of {args.repeats}"
              + (f"; CSpD draft {args.draft_model}" if draft is not None else ""))
        print(HEADER, flush=True)
    with autocast(device, args.precision):
        rows = bench(model, [None, *args.presets], num_iter=args.num_iter, cfg=args.cfg, bsz=args.bsz,
                     repeats=args.repeats, device=device, warmup_iter=args.warmup_iter or None, draft=draft,
                     on_row=None if args.json else lambda row: tqdm.write(format_row(row), file=sys.stdout),
                     progress=True)
    if args.json:
        print(json.dumps([asdict(r) | {"efficiency": r.efficiency} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    from util import cli
    cli.run(main)
