"""The quality statistics on cases with known answers: paired distances of identical images, FID and KID
against independent implementations, intervals that cover the truth at their stated rate."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch_fidelity.metric_kid as tf_kid

from demo.fidelity import frechet_distance, gaussian_stats
from util.paired import feature_distance, psnr, ssim, token_relative_error
from util.set_metrics import KID, Reference, accuracy, fid
from util.stats import (Interval, bootstrap_difference, images_needed, mean_ci, stratified_weights, verdict,
                        wilson_ci)


def images(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_identical_images_have_zero_distance_and_infinite_psnr():
    x = images(4, 0)
    assert np.all(np.isinf(psnr(x, x)))
    np.testing.assert_allclose(ssim(x, x), 1.0, rtol=0, atol=1e-12)
    tokens = np.random.default_rng(1).normal(size=(4, 16, 8, 8))
    np.testing.assert_array_equal(token_relative_error(tokens, tokens), 0.0)
    np.testing.assert_array_equal(feature_distance(tokens.reshape(4, -1), tokens.reshape(4, -1)), 0.0)


def test_psnr_of_a_known_error():
    x = np.full((1, 16, 16, 3), 100, np.uint8)
    y = x + np.uint8(5)  # MSE 25
    assert psnr(y, x)[0] == pytest.approx(10 * math.log10(255 ** 2 / 25))


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = np.full((1, 16, 16, 3), 60, np.uint8), np.full((1, 16, 16, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b)[0] == pytest.approx((2 * 60 * 140 + c1) / (60 ** 2 + 140 ** 2 + c1))
    noisy = np.clip(images(1, 2, size=16).astype(int) // 8 + 100, 0, 255).astype(np.uint8)
    assert ssim(noisy, noisy)[0] == pytest.approx(1.0) and ssim(noisy, a)[0] < 0.5


def test_ssim_is_symmetric_and_falls_with_noise():
    x = images(2, 3)
    rng = np.random.default_rng(4)
    small = np.clip(x + rng.normal(0, 5, x.shape), 0, 255).astype(np.uint8)
    large = np.clip(x + rng.normal(0, 40, x.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(ssim(x, small), ssim(small, x), rtol=1e-12)
    assert np.all(ssim(x, large) < ssim(x, small))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(images(1, 0, size=8), images(1, 1, size=8))


def test_token_relative_error_of_a_scaled_set():
    t = np.random.default_rng(5).normal(size=(3, 4, 2, 2))
    np.testing.assert_allclose(token_relative_error(1.1 * t, t), 0.1, rtol=1e-12)


def test_fid_matches_the_scipy_sqrtm_implementation():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    gen = rng.normal(0.3, 1.2, size=(300, 8)) @ rng.normal(size=(8, 8))
    expected = frechet_distance(*gaussian_stats(gen), *gaussian_stats(ref))
    assert fid(gen, Reference.from_features(ref)) == pytest.approx(expected, rel=1e-6)
    assert fid(ref, Reference.from_features(ref)) == pytest.approx(0.0, abs=1e-8)


def test_fid_with_bootstrap_counts_equals_fid_of_the_repeated_set():
    rng = np.random.default_rng(7)
    f, ref = rng.normal(size=(50, 5)), Reference.from_features(rng.normal(size=(80, 5)))
    w = rng.multinomial(50, np.full(50, 1 / 50)).astype(float)
    assert fid(f, ref, w) == pytest.approx(fid(np.repeat(f, w.astype(int), axis=0), ref), rel=1e-9)


def test_kid_matches_torch_fidelity_on_one_subset_and_is_near_zero_for_the_same_distribution():
    rng = np.random.default_rng(8)
    gen, ref = rng.normal(0.5, 1, size=(60, 6)), rng.normal(size=(60, 6))
    # torch-fidelity's unbiased estimator on one subset holding every sample of both (equal-size) sets.
    kernel = lambda x, y: (x @ y.T / 6 + 1) ** 3  # noqa: E731  torch-fidelity's default kernel
    expected = tf_kid.mmd2(kernel(gen, gen), kernel(gen, ref), kernel(ref, ref))
    assert KID(gen, Reference.from_features(ref))() == pytest.approx(float(expected), rel=1e-9)
    # Unbiased: another sample of the reference's own distribution scores ~0 (mean of 20: |mean| << spread).
    same = [KID(rng.normal(size=(60, 6)), Reference.from_features(ref))() for _ in range(20)]
    assert abs(np.mean(same)) < 2 * np.std(same) / math.sqrt(20) + 1e-3
    assert KID(gen, Reference.from_features(ref))() > 10 * np.std(same)


def test_kid_of_a_set_with_itself():
    f = np.random.default_rng(9).normal(size=(40, 5))
    # The unbiased estimator against itself: within-set pairs (i != j) minus cross pairs (diagonal included).
    k = (f @ f.T / 5 + 1) ** 3
    expected = 2 * (k.sum() - np.trace(k)) / (40 * 39) - 2 * k.mean()
    assert KID(f, Reference.from_features(f))() == pytest.approx(expected, rel=1e-9)
    # which is -2/n of (mean self-kernel - mean kernel between distinct items): negative, O(1/n).
    off = (k.sum() - np.trace(k)) / (40 * 39)
    assert expected == pytest.approx(-2 * (np.trace(k) / 40 - off) / 40, rel=1e-9) and expected < 0


def test_kid_with_bootstrap_counts_equals_kid_of_the_repeated_set():
    rng = np.random.default_rng(10)
    f, ref = rng.normal(size=(30, 4)), Reference.from_features(rng.normal(size=(40, 4)))
    w = rng.multinomial(30, np.full(30, 1 / 30)).astype(float)
    assert KID(f, ref)(w) == pytest.approx(KID(np.repeat(f, w.astype(int), axis=0), ref)(), rel=1e-9)


def test_stratified_weights_keep_every_class_count():
    strata = np.repeat(np.arange(3), [4, 5, 6])
    w = stratified_weights(strata, 50, seed=0)
    for s, n in zip(range(3), (4, 5, 6)):
        np.testing.assert_array_equal(w[:, strata == s].sum(axis=1), n)
    np.testing.assert_array_equal(w, stratified_weights(strata, 50, seed=0))  # deterministic


def test_paired_bootstrap_covers_the_true_difference_at_its_rate():
    """200 synthetic paired experiments with a known mean difference of 0.3: the 95% interval must cover it
    in 95% of them (binomial: at least 180 of 200 happens with probability > 0.999 at a true 95%)."""
    rng = np.random.default_rng(11)
    strata = np.arange(60) % 6
    covered = 0
    for _ in range(200):
        shared = rng.normal(size=60)  # the common random numbers make the pair correlated
        a, b = shared + 0.3 + rng.normal(0, 0.5, 60), shared + rng.normal(0, 0.5, 60)
        ci = bootstrap_difference(lambda w: (np.average(a, weights=w), np.average(b, weights=w)), strata,
                                  resamples=400, seed=int(rng.integers(1 << 30)))
        covered += ci.low <= 0.3 <= ci.high
    assert covered >= 180


def test_pairing_narrows_the_interval():
    rng = np.random.default_rng(12)
    strata = np.arange(120) % 12
    shared = rng.normal(size=120)
    a, b, independent = shared + rng.normal(0, 0.1, 120), shared, rng.normal(size=120)
    paired = bootstrap_difference(lambda w: (np.average(a, weights=w), np.average(b, weights=w)), strata)
    unpaired = bootstrap_difference(lambda w: (np.average(a, weights=w), np.average(independent, weights=w)), strata)
    assert paired.half_width < unpaired.half_width / 5


def test_mean_and_binomial_intervals():
    ci = mean_ci(np.array([1.0, 2.0, 3.0]))
    assert ci.value == 2.0 and ci.half_width == pytest.approx(4.302653 * 1 / math.sqrt(3), rel=1e-6)
    w = wilson_ci(45, 50)
    assert w.value == 0.9 and w.low == pytest.approx(0.7864, abs=1e-4) and w.high == pytest.approx(0.9565, abs=1e-4)
    assert wilson_ci(50, 50).high == 1.0 and wilson_ci(0, 50).low == 0.0
    with pytest.raises(ValueError):
        wilson_ci(3, 2)


def test_verdicts_and_sample_size():
    assert verdict(Interval(-1.0, -1.5, -0.5), higher_is_better=False) == "better"
    assert verdict(Interval(1.0, 0.5, 1.5), higher_is_better=False) == "worse"
    assert verdict(Interval(0.1, -0.5, 0.7), higher_is_better=False) == "no detectable difference"
    assert verdict(Interval(0.02, 0.01, 0.03), higher_is_better=True) == "better"
    assert images_needed(0.6, 120, 0.3) == 480
    assert accuracy(np.array([1, 0, 1, 1])) == 0.75
    assert accuracy(np.array([1, 0]), np.array([3.0, 1.0])) == 0.75


def test_interval_json_has_no_nan():
    assert Interval(float("inf"), float("nan"), 1.0).as_dict() == {"value": None, "low": None, "high": 1.0}
