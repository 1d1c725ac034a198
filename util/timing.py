"""Wall-clock timing that is honest on GPUs: synchronize before reading the clock, skip warm-up."""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from util.precision import PRECISIONS


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels so that a clock reading covers them (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """Seconds taken by ``fn()`` including its device work, and its result."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def median_time(fn: Callable[[], Any], device: torch.device | str, repeats: int,
                warmup: Callable[[], Any] | None = None) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one untimed ``warmup`` call (default ``fn``)."""
    (warmup or fn)()
    return statistics.median(time_call(fn, device)[0] for _ in range(repeats))


class ComponentTimer:
    """Accumulates wall-clock seconds of named callables, by wrapping them on their instances.

    ``with timer.wrap(model, "forward_mae_encoder", "encoder"): ...`` replaces the bound method on that
    instance for the duration of the block (the class and other instances are untouched). On exit the
    instance is left exactly as it was: an attribute it held before (a compiled method, another wrapper)
    is put back, otherwise the class's method shows through again.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def wrap(self, obj: Any, attr: str, name: str) -> Iterator[None]:
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            dt, out = time_call(lambda: original(*args, **kwargs), self.device)
            self.seconds[name] += dt
            return out

        missing = object()
        own = vars(obj).get(attr, missing)  # an instance attribute shadowing the class's method, if any
        setattr(obj, attr, timed)
        try:
            yield
        finally:
            if own is missing:
                delattr(obj, attr)  # back to the class's method
            else:
                setattr(obj, attr, own)


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    """The options the sampler benchmarks share: which released size, how it samples, where it runs."""
    from models.mar import MAR_FACTORIES
    parser.add_argument("--model", default="mar_base", choices=sorted(MAR_FACTORIES))
    parser.add_argument("--num_iter", type=int, default=64)
    parser.add_argument("--bsz", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--num_sampling_steps", type=int, default=100)
    from util.device import best_device
    parser.add_argument("--device", default=str(best_device()))
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="autocast the sampling (weights stay float32; see util.precision)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    from util.compile import add_compile_args
    add_compile_args(parser)


def check_sampler_args(args: argparse.Namespace) -> None:
    """Reject the values of :func:`add_sampler_args` options that cannot run, before building a model."""
    from models.schedules import check_sampling_settings
    from util.cli import check_positive
    from util.loading import check_sampling_steps
    check_positive(bsz=args.bsz)
    check_sampling_steps(args.num_sampling_steps)
    check_sampling_settings(num_iter=args.num_iter, cfg=args.cfg)
    from util.compile import compile_mode
    compile_mode(args, args.device)  # --cuda_graph without CUDA fails here, before a model is built


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def build_random_model(name: str, *, num_sampling_steps: int, device: torch.device | str, seed: int = 0):
    """A released size (or the tiny test model) with random weights, in eval mode: the cost of sampling
    does not depend on the weights. Created on ``device`` (initialising MAR-H on the CPU and copying it
    over would spend seconds of a GPU window); ``"meta"`` gives one for FLOPs counts."""
    from models.mar import build_released, mar_from_config
    from util.loading import TINY_MAR, TINY_MODEL
    torch.manual_seed(seed)
    with torch.device(device):
        if name == TINY_MODEL:
            model = mar_from_config(dict(TINY_MAR, num_sampling_steps=str(num_sampling_steps)))
        else:
            model = build_released(name, num_sampling_steps=num_sampling_steps)
    return model.to(device).eval()  # anything made from numpy during __init__ is on the CPU


def build_timed_model(args: argparse.Namespace) -> tuple[Any, torch.device]:
    """The model the sampler benchmarks time, and its device: ``args.model`` with random weights (seed 0),
    on ``args.device`` with ``args.threads``, compiled as the flags ask."""
    from util.compile import apply_compile, compile_mode
    apply_threads(args)
    device = torch.device(args.device)
    model = build_random_model(args.model, num_sampling_steps=args.num_sampling_steps, device=device)
    apply_compile(model, compile_mode(args, device))
    return model, device
