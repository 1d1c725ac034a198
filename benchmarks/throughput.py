"""Images per second of sampling for MAR-B/L/H, plain vs the acceleration presets, fp32 and bf16, in one
time-boxed run sized for a GPU window.

    python -m benchmarks.throughput --out_json $OUT/throughput.json --out_md $OUT/throughput.md

Random weights (cost does not depend on them), built on the device. Each cell (model, batch, preset,
precision) runs ``--warmup_runs`` untimed generations identical to the timed one (same batch, preset
and step schedule, so every cached path and every token count, i.e. every compiled graph or CUDA graph,
is met before the clock starts) and then times ONE ``--num_iter``-step generation of the batch,
synchronized; ``sample_tokens`` only: the VAE decode is excluded, as in :mod:`benchmarks.sampling`. FLOPs come
from :func:`lazymar.flops.estimate`.

Budget: ``--budget_s`` counts from the start, model building included. The cells run most important
first (:func:`order_cells`); when the budget is reached the cell in progress is interrupted
(:mod:`util.deadline`) and it and every later cell are recorded as ``skipped (budget)``. A cell that
runs out of device memory is recorded as ``OOM``, one that fails otherwise as ``error`` (traceback on
stderr, exit status 1); the run goes on either way. Both reports are rewritten after every cell, so a
run killed from outside still leaves the cells it finished.
"""
from __future__ import annotations

import argparse
import gc
import math
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lazymar.config import PRESETS
from lazymar.flops import estimate
from benchmarks.throughput_report import ERROR, OK, OOM, PLAIN, SKIPPED, Cell, Result, write_reports
from models.mar import MAR, MAR_FACTORIES
from models.schedules import check_sampling_settings
from util.compile import add_compile_args, apply_compile, compile_mode
from util.deadline import DeadlineExceeded, deadline
from util.device import best_device
from util.loading import TINY_MODEL, check_sampling_steps
from util.precision import PRECISIONS, autocast
from util.timing import build_random_model, synchronize, time_call

PRESET_CHOICES = (PLAIN, *sorted(PRESETS))
DEFAULT_MODELS = ("mar_base", "mar_large", "mar_huge")
# Batches per model when --batches is not given: the eval batch 64 everywhere, and 256 for MAR-B.
DEFAULT_BATCHES = {"mar_base": (64, 256), "mar_large": (64,), "mar_huge": (64,), TINY_MODEL: (2,)}
DEFAULT_PRESETS = (PLAIN, "lazymar", "gtr+lazymar", "disa+lazymar", "gtr+disa+lazymar")
HEADLINE_POLICIES = (PLAIN, "lazymar")  # measured first, in every precision, on the first model
DEFAULT_PRECISIONS = ("bf16", "fp32")
CFG_SCHEDULE = "linear"
DEFAULT_BUDGET_S = 270.0  # 5 minutes less ~30 s for starting Python and torch and writing the reports



@dataclass(frozen=True)
class Settings:
    """How every cell samples: the flags that are not a cell's own.

    Attributes:
        num_iter: MAR steps of the timed generation.
        cfg: guidance scale (linear schedule).
        num_sampling_steps: the diffusion head's steps.
        warmup_runs: untimed generations identical to the timed one, run before it (0: none).
        seed: seed of the weights and of every generation.
        compile_mode: ``torch.compile`` mode of the sampling (``--compile``/``--cuda_graph``; None: eager).
    """

    num_iter: int = 64
    cfg: float = 3.0
    num_sampling_steps: int = 100
    warmup_runs: int = 1
    seed: int = 0
    compile_mode: str | None = None


def order_cells(models: Sequence[str], batches: dict[str, Sequence[int]], presets: Sequence[str],
                precisions: Sequence[str]) -> list[Cell]:
    """Every cell, most important first, so that a budget cut drops the least important.

    1. The first model at its first batch: ``plain`` and ``lazymar`` (the headline speedup) in every
       precision, low precision first (cheaper), then the other presets likewise.
    2. The other (model, batch) groups in low precision: each model at its first batch in the given
       model order, then the further batches (MAR-L, MAR-H, then MAR-B at 256 by default).
    3. The same groups in fp32, several times slower than bf16 (no TF32 by default).
    Within a group ``plain`` comes first: every speedup is relative to it.
    """
    groups = sorted(((m, b) for m in models for b in batches[m]),
                    key=lambda g: (list(batches[g[0]]).index(g[1]), list(models).index(g[0])))
    pols = sorted(presets, key=lambda p: p != PLAIN)
    low = [p for p in precisions if p != "fp32"]
    full = [p for p in precisions if p == "fp32"]
    (m0, b0), rest = groups[0], groups[1:]
    cells = [Cell(m0, b0, pol, prec) for prec in low + full for pol in pols if pol in HEADLINE_POLICIES]
    cells += [Cell(m0, b0, pol, prec) for prec in low + full for pol in pols if pol not in HEADLINE_POLICIES]
    for tier in (low, full):
        cells += [Cell(m, b, pol, prec) for m, b in rest for prec in tier for pol in pols]
    return cells


build = build_random_model  # the models every cell times: random weights, created on the device


def generate(model: MAR, *, bsz: int, num_iter: int, cfg: float, preset: str, seed: int) -> torch.Tensor:
    """The one call of the sampler: token latents of ``bsz`` images (labels 0, 1, ... in turn)."""
    device = model.fake_latent.device
    labels = torch.arange(bsz, device=device) % model.num_classes
    generator = torch.Generator(device).manual_seed(seed)
    return model.sample_tokens(bsz, num_iter=num_iter, cfg=cfg, cfg_schedule=CFG_SCHEDULE, labels=labels,
                               generator=generator, accel=None if preset == PLAIN else PRESETS[preset])


def measure(model: MAR, cell: Cell, settings: Settings) -> tuple[float, float | None]:
    """Seconds of one synchronized generation of the cell's batch after ``warmup_runs`` identical untimed
    ones, and the peak device memory of the timed one in GiB (CUDA only).

    The warm-up is the same call, not a shorter one: a few MAR steps never reach LazyMAR's cached steps,
    and every step's token count is a shape that ``--compile`` / ``--cuda_graph`` compile or record once.
    """
    device = model.fake_latent.device
    on_cuda = device.type == "cuda"

    def run() -> torch.Tensor:
        return generate(model, bsz=cell.batch, num_iter=settings.num_iter, cfg=settings.cfg, preset=cell.preset,
                        seed=settings.seed)

    with torch.no_grad(), autocast(device, cell.precision):
        for _ in range(settings.warmup_runs):
            run()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds, _ = time_call(run, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None
    return seconds, peak


def free_memory(device: torch.device) -> None:
    """Hand cached device memory back after a model or a failed cell is dropped."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flops_per_image(cells: Sequence[Cell], settings: Settings) -> dict[Cell, float]:
    """TFLOPs per image of every cell, from meta-device models (no memory, milliseconds each). Also
    rejects a ``num_iter`` a model cannot sample, before any real model is built."""
    out: dict[Cell, float] = {}
    for name in dict.fromkeys(c.model for c in cells):
        meta = build(name, num_sampling_steps=settings.num_sampling_steps, device="meta")
        if settings.num_iter > meta.seq_len:
            raise ValueError(f"--num_iter {settings.num_iter} exceeds {name}'s {meta.seq_len} tokens "
                             f"(each step predicts at least one)")
        for c in cells:
            if c.model == name:
                accel = None if c.preset == PLAIN else c.preset
                report = estimate(meta, num_iter=settings.num_iter, cfg=settings.cfg, accel=accel, bsz=c.batch)
                out[c] = report.total / 1e12
    return out


def _failure(err: Exception) -> tuple[str, str]:
    """Status and one-line detail of a cell (or model build) that raised ``err``."""
    first_line = (str(err).strip().splitlines() or [""])[0][:160]
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return OOM, first_line
    traceback.print_exc()  # an error other than memory is a bug: keep its traceback for the log
    return ERROR, f"{type(err).__name__}: {first_line}"


def run_cell(model: MAR, cell: Cell, tflops_per_image: float, settings: Settings) -> Result:
    """Measure one cell; running out of memory or a failure of its preset gives a result, not an exception."""
    try:
        seconds, peak = measure(model, cell, settings)
        return Result(cell, OK, tflops_per_image, seconds=seconds, peak_mem_gib=peak)
    except Exception as err:  # noqa: BLE001 - OOM or a bug in one preset must not end the run
        status, detail = _failure(err)
    free_memory(model.fake_latent.device)  # here, not in the except: its traceback holds the cell's tensors
    return Result(cell, status, tflops_per_image, detail=detail)


def run_cells(cells: Sequence[Cell], tflops: dict[Cell, float], settings: Settings, device: torch.device,
              stop_at: float, on_result: Callable[[list[Result], int], None]) -> list[Result]:
    """Measure ``cells`` in order until ``stop_at`` (``time.monotonic()``); one result per cell.

    A model is built when the cell's model differs from the previous cell's, the previous one dropped
    first. ``on_result(results, i)`` is called after cell ``i`` is recorded. Every result starts as
    ``skipped (budget)``, so the cell interrupted by the deadline and those after it stay so.
    """
    results = [Result(c, SKIPPED, tflops[c]) for c in cells]
    model: MAR | None = None
    built: str | None = None
    build_error: tuple[str, str] = (OK, "")
    running: tuple[int, float] | None = None  # (index, start) of the cell in progress
    try:
        with deadline(stop_at):
            for i, cell in enumerate(cells):
                if time.monotonic() >= stop_at:  # where the deadline cannot interrupt (not main thread)
                    raise DeadlineExceeded("budget reached between cells")
                running = (i, time.monotonic())
                if cell.model != built:
                    model, built = None, cell.model
                    free_memory(device)
                    try:
                        model = build(cell.model, num_sampling_steps=settings.num_sampling_steps, device=device,
                                      seed=settings.seed)
                        apply_compile(model, settings.compile_mode)
                        print(f"built {cell.model} on {device} in {time.monotonic() - running[1]:.1f} s",
                              flush=True)
                    except Exception as err:  # noqa: BLE001 - recorded for every cell of this model
                        build_error = _failure(err)
                if model is None:
                    results[i] = Result(cell, build_error[0], tflops[cell],
                                        detail=f"building the model: {build_error[1]}")
                else:
                    results[i] = run_cell(model, cell, tflops[cell], settings)
                running = None
                on_result(results, i)
    except DeadlineExceeded:
        if running is not None and results[running[0]].status == SKIPPED:
            results[running[0]].detail = f"interrupted after {time.monotonic() - running[1]:.1f} s"
        synchronize(device)  # let the interrupted cell's queued kernels finish
    model = None
    free_memory(device)
    return results


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, refused with a clear message where it cannot run here."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA device (torch.cuda.is_available() is "
                             f"False); run on a GPU machine, or use --device cpu --tiny for a dry run")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Cells are run most important first; see benchmarks.throughput.order_cells.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(MAR_FACTORIES))
    which.add_argument("--tiny", action="store_true",
                       help=f"time the {TINY_MODEL} model instead (seconds on a CPU: tests and dry runs)")
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="batch sizes for every model (default: 64 for each, and 256 for mar_base; tiny: 2)")
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), choices=PRESET_CHOICES,
                   help=f"'{PLAIN}' (accel=None, the reference of every speedup) and presets of lazymar.config")
    p.add_argument("--precisions", nargs="+", default=list(DEFAULT_PRECISIONS), choices=PRECISIONS)
    p.add_argument("--num_iter", type=int, default=Settings.num_iter)
    p.add_argument("--cfg", type=float, default=Settings.cfg)
    p.add_argument("--num_sampling_steps", type=int, default=Settings.num_sampling_steps)
    p.add_argument("--warmup_runs", type=int, default=Settings.warmup_runs,
                   help="untimed generations identical to each cell's timed one, run before it (0: none)")
    p.add_argument("--seed", type=int, default=Settings.seed)
    add_compile_args(p)
    p.add_argument("--device", default=str(best_device()))
    p.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds from the start (model building included) after which the cell in progress "
                        "is interrupted and the rest are recorded as skipped")
    p.add_argument("--out_json", type=Path, default=None)
    p.add_argument("--out_md", type=Path, default=None, help="the markdown table (also printed)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values that cannot run, before any model is built."""
    for flag in ("models", "presets", "precisions", "batches"):
        values = getattr(args, flag) or []
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            raise ValueError(f"--{flag} lists {', '.join(map(str, repeated))} more than once")
    if args.batches is not None and min(args.batches) < 1:
        raise ValueError(f"--batches must all be >= 1, got {args.batches}")
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        raise ValueError(f"--budget_s must be a positive number of seconds, got {args.budget_s}")
    if args.warmup_runs < 0:
        raise ValueError(f"--warmup_runs must be >= 0, got {args.warmup_runs}")
    check_sampling_settings(num_iter=args.num_iter, cfg=args.cfg)
    check_sampling_steps(args.num_sampling_steps)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    check_args(args)
    device = resolve_device(args.device)
    settings = Settings(num_iter=args.num_iter, cfg=args.cfg, num_sampling_steps=args.num_sampling_steps,
                        warmup_runs=args.warmup_runs, seed=args.seed, compile_mode=compile_mode(args, device))
    models = [TINY_MODEL] if args.tiny else args.models
    batches = {m: args.batches or DEFAULT_BATCHES[m] for m in models}
    cells = order_cells(models, batches, args.presets, args.precisions)
    tflops = flops_per_image(cells, settings)

    meta: dict[str, Any] = {
        "command": "python -m benchmarks.throughput " + shlex.join(argv),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "cuda": torch.version.cuda or "none",
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "num_iter": settings.num_iter, "cfg": settings.cfg, "cfg_schedule": CFG_SCHEDULE,
        "num_sampling_steps": settings.num_sampling_steps, "warmup_runs": settings.warmup_runs,
        "seed": settings.seed, "compile": settings.compile_mode, "weights": "random",
        "budget_s": args.budget_s, "elapsed_s": 0.0}
    print(f"{len(cells)} cells on {meta['device_name']}, budget {args.budget_s:g} s", flush=True)

    def report(results: list[Result]) -> str:
        meta["elapsed_s"] = round(time.monotonic() - started, 2)
        return write_reports(meta, results, out_json=args.out_json, out_md=args.out_md)

    def on_result(results: list[Result], i: int) -> None:
        report(results)
        r = results[i]
        if r.status != OK:
            shown = f"{r.status} {r.detail}"
        elif r.images_per_s is None:
            shown = f"{r.seconds} s: too short to measure"
        else:
            shown = f"{r.seconds:.3f} s, {r.images_per_s:.2f} images/s"
        print(f"[{time.monotonic() - started:6.1f} s] {r.cell.model} batch {r.cell.batch} {r.cell.precision} "
              f"{r.cell.preset}: {shown}", flush=True)

    results = run_cells(cells, tflops, settings, device, started + args.budget_s, on_result)
    print(report(results), end="")
    return 1 if any(r.status == ERROR for r in results) else 0


if __name__ == "__main__":
    from util import cli
    cli.run(main)
