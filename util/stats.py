"""Uncertainty for the numbers that decide something: confidence intervals, the stratified bootstrap of a
difference on common random numbers, a verdict from an interval, and the sample size an interval needs.

Why a paired bootstrap: two presets sampled with the same labels, seeds and batch size give image ``i`` of
each from the same random stream (an exact twin where the technique draws what plain MAR draws, an
independent draw otherwise). Resampling image indices jointly keeps that pairing, so the interval of a
difference is as narrow as the pairing makes it; for unpaired presets it is as wide as two independent
sets give, which is also right. Resampling is stratified by class so every resample stays class-balanced,
as the generated sets are.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95  # every interval here is a 95% interval unless a caller asks otherwise
BOOTSTRAP_RESAMPLES = 2000  # percentile-interval end points are stable to ~1% of the width at 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval ``[low, high]`` at ``level``."""

    value: float
    low: float
    high: float
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict:
        return {"value": _json_float(self.value), "low": _json_float(self.low), "high": _json_float(self.high)}


def _json_float(x: float) -> float | None:
    """JSON has no NaN or infinity: None for them (infinite PSNR is written as None and said so)."""
    return float(x) if math.isfinite(x) else None


def mean_ci(values: np.ndarray, level: float = LEVEL) -> Interval:
    """The mean of ``values`` with a Student-t interval (independent values, e.g. per-image distances)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = float(values.mean())
    if n == 1 or not np.isfinite(values).all():
        return Interval(mean, float("nan"), float("nan"), level)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, level)


def wilson_ci(successes: int, n: int, level: float = LEVEL) -> Interval:
    """A binomial proportion with its Wilson score interval (good at small n and near 0 or 1)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_ci needs 0 <= successes <= n and n > 0, got {successes} of {n}")
    z = float(scipy_stats.norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else centre - half  # exactly the end points there; rounding aside
    high = 1.0 if successes == n else centre + half
    return Interval(p, low, high, level)


def stratified_weights(strata: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, N) bootstrap counts: each resample draws, within every stratum (class), as many items as
    the stratum has, with replacement. Row ``r`` weights item ``i`` by how often it was drawn."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, len(strata)), dtype=np.float64)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)),
                                              size=resamples)
    return weights


def bootstrap_difference(statistic: Callable[[np.ndarray | None], tuple[float, float]], strata: np.ndarray, *,
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """The difference ``a - b`` of a statistic of two paired sets, with a percentile bootstrap interval.

    Args:
        statistic: ``weights -> (a, b)``: the statistic of each set under per-item weights (N,) (None:
            every item once). Both sets are weighted alike: item ``i`` of ``a`` and of ``b`` are twins.
        strata: (N,) the class of each item; resampling stays within classes.
    """
    a, b = statistic(None)
    diffs = np.array([np.subtract(*statistic(w)) for w in stratified_weights(strata, resamples, seed)])
    low, high = np.quantile(diffs, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(a - b, float(low), float(high), level)


def bootstrap_value(statistic: Callable[[np.ndarray | None], float], strata: np.ndarray, *,
                    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """One set's statistic with a percentile bootstrap interval (``statistic``: weights -> value)."""
    return bootstrap_difference(lambda w: (statistic(w), 0.0), strata, resamples=resamples, seed=seed, level=level)


VERDICTS = ("better", "no detectable difference", "worse")


def verdict(difference: Interval, *, higher_is_better: bool) -> str:
    """``better`` / ``worse`` when the interval of (preset - plain) excludes zero on that side, else ``no
    detectable difference`` (a statement about the interval's width, not that the two are equal)."""
    if not (math.isfinite(difference.low) and math.isfinite(difference.high)):
        return "no detectable difference"
    gain = difference.low > 0 if higher_is_better else difference.high < 0
    loss = difference.high < 0 if higher_is_better else difference.low > 0
    return "better" if gain else "worse" if loss else "no detectable difference"


def images_needed(half_width: float, n: int, target_half_width: float) -> int:
    """Images for an interval of ``target_half_width``, from one of ``half_width`` measured on ``n`` images:
    the half-width of a mean-like statistic falls as 1/sqrt(n)."""
    if half_width <= 0 or target_half_width <= 0 or n <= 0:
        raise ValueError(f"images_needed needs positive widths and n, got {half_width}, {target_half_width}, {n}")
    return math.ceil(n * (half_width / target_half_width) ** 2)
