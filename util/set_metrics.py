"""FID and KID of a generated set's features against a fixed reference, fast enough to bootstrap.

Both take optional per-item weights (bootstrap counts from :func:`util.stats.stratified_weights`), so a
resample is a reweighting, not a copy of the features. The reference is summarised once
(:class:`Reference`): its mean, covariance and the symmetric square root of the covariance, so that each
FID costs one 2048x2048 (Inception) or 128x128 (demo classifier) symmetric eigendecomposition:
``tr sqrt(S_g S_r) = sum sqrt(eig(S_r^1/2 S_g S_r^1/2))`` (similar matrices, non-negative spectrum).

KID is the unbiased squared MMD with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3`` of Binkowski
et al. (2018), the kernel torch-fidelity uses; here over the whole sets rather than torch-fidelity's mean
over random subsets, which estimates the same quantity. It is unbiased at any n, so a difference of two
KIDs at small n is not a difference of two biases (FID's bias falls as 1/n, equal for two sets of one n).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _weighted_moments(features: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D) under integer weights (None: all 1)."""
    f = np.asarray(features, dtype=np.float64)
    w = np.ones(len(f)) if weights is None else np.asarray(weights, dtype=np.float64)
    n = w.sum()
    mu = w @ f / n
    centred = f - mu
    sigma = (centred * w[:, None]).T @ centred / (n - 1)
    return mu, sigma


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


@dataclass(frozen=True)
class Reference:
    """The reference side of FID and KID: Gaussian statistics and, for KID, the features themselves."""

    mu: np.ndarray
    sigma: np.ndarray
    sigma_sqrt: np.ndarray
    features: np.ndarray | None  # (M, D) for KID; None when only statistics are known (e.g. an ADM .npz)
    kernel_mean: float | None  # mean of k(r_a, r_b) over a != b

    @classmethod
    def from_features(cls, features: np.ndarray) -> Reference:
        f = np.asarray(features, dtype=np.float64)
        mu, sigma = _weighted_moments(f, None)
        k = polynomial_kernel(f, f)
        m = len(f)
        return cls(mu, sigma, _psd_sqrt(sigma), f, float((k.sum() - np.trace(k)) / (m * (m - 1))))

    @classmethod
    def from_statistics(cls, mu: np.ndarray, sigma: np.ndarray) -> Reference:
        sigma = np.asarray(sigma, dtype=np.float64)
        return cls(np.asarray(mu, dtype=np.float64), sigma, _psd_sqrt(sigma), None, None)


def fid(features: np.ndarray, reference: Reference, weights: np.ndarray | None = None) -> float:
    """Frechet distance of the (weighted) features' Gaussian to the reference's."""
    mu, sigma = _weighted_moments(features, weights)
    inner = reference.sigma_sqrt @ sigma @ reference.sigma_sqrt
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu - reference.mu
    return float(diff @ diff + np.trace(sigma) + np.trace(reference.sigma) - 2 * tr_sqrt)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(x.y / d + 1)^3`` between the rows of x (N, D) and y (M, D)."""
    return (np.asarray(x, np.float64) @ np.asarray(y, np.float64).T / x.shape[1] + 1) ** 3


class KID:
    """Unbiased KID of a generated set (N, D) against a reference, for many weightings of the set.

    The set's own kernel matrix and its mean kernel to the reference are computed once (O(N^2 + N M));
    each weighting is then a quadratic form.
    """

    def __init__(self, features: np.ndarray, reference: Reference) -> None:
        if reference.features is None:
            raise ValueError("KID needs the reference's features, not only its mean and covariance")
        f = np.asarray(features, dtype=np.float64)
        self.k_self = polynomial_kernel(f, f)
        self.k_diag = np.diag(self.k_self).copy()
        self.k_cross = polynomial_kernel(f, reference.features).mean(axis=1)  # (N,) mean over the reference
        self.reference_mean = reference.kernel_mean

    def __call__(self, weights: np.ndarray | None = None) -> float:
        w = np.ones(len(self.k_diag)) if weights is None else np.asarray(weights, dtype=np.float64)
        n = w.sum()
        # Pairs of distinct items of the (re)sampled set: all ordered pairs minus each item with itself.
        within = (w @ self.k_self @ w - w @ self.k_diag) / (n * (n - 1))
        return float(within + self.reference_mean - 2 * (w @ self.k_cross) / n)


def accuracy(correct: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Share of ``correct`` (N,) booleans, under optional weights."""
    c = np.asarray(correct, dtype=np.float64)
    return float(c.mean() if weights is None else (weights @ c) / weights.sum())
