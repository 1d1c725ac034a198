"""A row of the demo quality table against plain MAR: differences with confidence intervals, and verdicts.

Every row of a table samples the same class-balanced labels with the same seeds and batch size
(:func:`util.generate.batch_seed`), so image ``i`` of any row and image ``i`` of plain MAR come from the
same random stream: common random numbers. The difference of a set metric (demo FID, KID, class accuracy)
is then measured on the pairs by a bootstrap stratified by class (:mod:`util.stats`), not read off two
noisy absolutes. For presets that draw plain MAR's random numbers (``lazymar.names.pairs_with_plain``),
image ``i`` is moreover a twin of plain's, and the per-image distances to it (token relative error,
PSNR, SSIM, feature distance: :mod:`util.paired`) measure the approximation directly.

The verdict of a row is read from the interval of its demo FID difference: ``better`` / ``worse`` when it
excludes zero, else ``no detectable difference`` (at this many images).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from demo.fidelity import ACCURACY_LAYER, FID_LAYER, extract_features
from util.paired import feature_distance, psnr, ssim, token_relative_error
from util.set_metrics import KID, Reference, accuracy, fid
from util.stats import (BOOTSTRAP_RESAMPLES, Interval, bootstrap_difference, bootstrap_value, images_needed, mean_ci,
                        verdict, wilson_ci)

# Metric -> whether higher is better (the sign a verdict reads).
HIGHER_IS_BETTER = {"demo_fid": False, "kid": False, "class_accuracy": True}
VERDICT_METRIC = "demo_fid"
TWIN_DISTANCES = ("token_rel_err", "psnr", "ssim", "feature_distance")
# The resolution the demo table is sized for: a difference's 95% interval within +-3% of plain MAR's value,
# finer than the effects to judge (LazyMAR on MAR-H: +6% FID).
RESOLUTION = 0.03


@dataclass
class RowSample:
    """The per-image data of one row that comparisons need: labels (N,), tokens (N, C, h, w), uint8 images
    (N, H, W, 3), demo-classifier features (N, D) and whether each image is classified as its label."""

    labels: np.ndarray
    tokens: np.ndarray
    images: np.ndarray
    features: np.ndarray
    correct: np.ndarray

    @classmethod
    def measure(cls, images: np.ndarray, tokens: np.ndarray, labels: np.ndarray, classifier_path: str) -> RowSample:
        out = extract_features(images, classifier_path, (FID_LAYER, ACCURACY_LAYER), device="cpu")
        labels = np.asarray(labels)
        return cls(labels, tokens, images, out[FID_LAYER], out[ACCURACY_LAYER].argmax(axis=1) == labels)

    def save(self, path) -> None:
        np.savez_compressed(path, labels=self.labels, tokens=self.tokens, images=self.images,
                            features=self.features, correct=self.correct)

    @classmethod
    def load(cls, path) -> RowSample:
        with np.load(path) as f:
            return cls(**{k: f[k] for k in ("labels", "tokens", "images", "features", "correct")})


def absolute(sample: RowSample, reference: Reference, *, resamples: int = BOOTSTRAP_RESAMPLES,
             seed: int = 0) -> dict[str, Interval]:
    """A row's own demo FID and KID (bootstrap intervals) and class accuracy (Wilson interval)."""
    kid = KID(sample.features, reference)
    return {"demo_fid": bootstrap_value(lambda w: fid(sample.features, reference, w), sample.labels,
                                        resamples=resamples, seed=seed),
            "kid": bootstrap_value(kid, sample.labels, resamples=resamples, seed=seed),
            "class_accuracy": wilson_ci(int(sample.correct.sum()), len(sample.correct))}


def versus_plain(sample: RowSample, plain: RowSample, reference: Reference, *, paired: bool,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """(row - plain) of demo FID, KID and class accuracy with paired bootstrap intervals, the verdict of
    each, and for paired presets the per-image distances to the twin (mean with a t interval).

    Raises ``ValueError`` when the two rows are not on common random numbers (other labels or sizes).
    """
    if not np.array_equal(sample.labels, plain.labels):
        raise ValueError("a row is compared with plain MAR only on the same labels, seeds and batch size")
    kid_row, kid_plain = KID(sample.features, reference), KID(plain.features, reference)
    statistics = {
        "demo_fid": lambda w: (fid(sample.features, reference, w), fid(plain.features, reference, w)),
        "kid": lambda w: (kid_row(w), kid_plain(w)),
        "class_accuracy": lambda w: (accuracy(sample.correct, w), accuracy(plain.correct, w)),
    }
    out: dict = {"paired": paired, "difference": {}, "verdict": {}}
    for name, statistic in statistics.items():
        diff = bootstrap_difference(statistic, sample.labels, resamples=resamples, seed=seed)
        out["difference"][name] = diff
        out["verdict"][name] = verdict(diff, higher_is_better=HIGHER_IS_BETTER[name])
    if paired:
        out["twin"] = {"token_rel_err": mean_ci(token_relative_error(sample.tokens, plain.tokens)),
                       "psnr": mean_ci(psnr(sample.images, plain.images)),
                       "ssim": mean_ci(ssim(sample.images, plain.images)),
                       "feature_distance": mean_ci(feature_distance(sample.features, plain.features))}
    return out


def images_to_resolve(difference: dict, num_images: int, plain_value: float,
                      fraction: float = RESOLUTION) -> int | None:
    """Images per row at which a difference's interval would be +-``fraction`` of plain MAR's value, from its
    saved interval (``{value, low, high}``) on ``num_images`` images: the half-width, (high - low) / 2, falls
    as 1/sqrt(n) (:func:`util.stats.images_needed`). None when the interval has no width to scale (a preset
    identical to plain) or no finite end."""
    low, high = difference.get("low"), difference.get("high")
    if low is None or high is None or not high > low:
        return None
    return images_needed((high - low) / 2, num_images, fraction * abs(plain_value))


def as_json(comparison: dict) -> dict:
    """:func:`versus_plain`'s result with its intervals as JSON-safe dicts."""
    def convert(x):
        if isinstance(x, Interval):
            return x.as_dict()
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        return x
    return convert(comparison)
