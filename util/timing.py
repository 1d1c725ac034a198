"""Wall-clock timing that is honest on GPUs: synchronize before reading the clock, skip warm-up."""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


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
    instance for the duration of the block (the class and other instances are untouched).
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

        setattr(obj, attr, timed)
        try:
            yield
        finally:
            delattr(obj, attr)  # back to the class's method
