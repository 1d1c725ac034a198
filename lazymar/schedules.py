"""Pure schedule functions of the acceleration techniques.

The released LazyMAR hard-codes its schedules for 64 MAR steps and 100 diffusion steps. Here each
schedule is a function of progress (step / number of steps) whose constants are the release's values
expressed as fractions, so that at 64 / 100 steps it gives exactly the release's tables and at other
step counts it scales proportionally.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def round_half_up(x: float) -> int:
    """Round to nearest with .5 going up (Python's ``round`` would send 2.5 to 2)."""
    return int(math.floor(x + 0.5))


def scaled_count(fraction: float, total: int, minimum: int = 0) -> int:
    """``fraction * total`` rounded half up, at least ``minimum``."""
    return max(minimum, round_half_up(fraction * total))


def is_refresh_step(step: int, num_iter: int, warmup: float, interval: float) -> bool:
    """Whether MAR step ``step`` (0-based) recomputes everything and refills the caches.

    The first ``warmup * num_iter`` steps are full (the first always is), then every
    ``interval * num_iter``-th step. The release (64 steps): ``s < 5 or (s - 5) % 9 == 0``, i.e.
    ``warmup = 5/64``, ``interval = 9/64``.
    """
    n_warm = max(1, scaled_count(warmup, num_iter))
    period = scaled_count(interval, num_iter, minimum=1)
    return step < n_warm or (step - n_warm) % period == 0


def piecewise_constant(step: int, num_iter: int, table: Sequence[tuple[float, float]]) -> float:
    """Value of a step table given as ``((start_progress, value), ...)`` sorted by start.

    A row applies from ``step >= start_progress * num_iter`` on (compared exactly as
    ``step * den >= num * num_iter`` for starts that are k/64 fractions, via a small tolerance).
    """
    value = table[0][1]
    for start, v in table:
        if step + 1e-9 >= start * num_iter:
            value = v
    return value


def is_head_refresh_step(i: int, num_steps: int, interval: float) -> bool:
    """Whether diffusion step ``i`` (counting down from ``num_steps - 1`` to 0) runs the full head.

    The release (100 steps): ``t == 99 or t % 7 == 0``, i.e. ``interval = 0.07``.
    """
    period = scaled_count(interval, num_steps, minimum=1)
    return i == num_steps - 1 or i % period == 0


def head_mlp_recompute(i: int, num_steps: int, warmup: float) -> bool:
    """Whether a cached head step still recomputes the (non-residual-cached) blocks' MLPs.

    The release (100 steps) recomputes while ``t > 90``: ``warmup = 0.09`` of the steps after the first.
    """
    return i > num_steps - 1 - scaled_count(warmup, num_steps)


def keep_count(num_tokens: int, retain: float, n_pred: int, n_prev_pred: int, extra: int) -> int:
    """Tokens the decoder keeps computing: ``max(n_pred + n_prev_pred + extra, floor(N * retain))``, <= N."""
    return min(num_tokens, max(n_pred + n_prev_pred + extra, int(math.floor(num_tokens * retain))))
