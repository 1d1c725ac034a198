"""Per-image distances between an accelerated image and its plain-MAR twin (same labels, seed and batch).

Caching papers for diffusion transformers report PSNR / SSIM (and LPIPS) of the cached model's images
against the uncached model's; the same holds here wherever a technique draws the random numbers plain
MAR draws (``lazymar.pairing``): each image then has a twin, and a small loss shows in a few images,
without a reference data set. Where the draws differ, the "twin" is another sample, and these distances
measure nothing but that (the quality table says which presets are paired).

Distances, one value per image:
- token relative error ``||t - t_plain|| / ||t_plain||`` over the image's latent tokens;
- PSNR in dB over uint8 pixels (infinite for identical images);
- SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid region, the mean
  over channels), 1 for identical images;
- feature distance ``||f - f_plain||`` in a classifier's feature space (the demo classifier's for the
  demo; Inception's, as FID uses, for the released models).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PIXEL_RANGE = 255.0


def token_relative_error(tokens: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """(N,) ``||t_i - p_i|| / ||p_i||`` over every dimension but the first."""
    t = np.asarray(tokens, np.float64).reshape(len(tokens), -1)
    p = np.asarray(plain, np.float64).reshape(len(plain), -1)
    return np.linalg.norm(t - p, axis=1) / np.linalg.norm(p, axis=1)


def psnr(images: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """(N,) PSNR in dB of uint8 images (N, H, W, C) against their twins; ``inf`` where identical."""
    diff = np.asarray(images, np.float64) - np.asarray(plain, np.float64)
    mse = (diff.reshape(len(diff), -1) ** 2).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(PIXEL_RANGE ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(images: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """(N,) SSIM of uint8 images (N, H, W, C) against their twins (images of at least 11x11 pixels)."""
    a = torch.as_tensor(np.asarray(images), dtype=torch.float64).permute(0, 3, 1, 2)  # (N, C, H, W)
    b = torch.as_tensor(np.asarray(plain), dtype=torch.float64).permute(0, 3, 1, 2)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(a.shape[-2:])}")
    channels = a.shape[1]
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA).expand(channels, 1, -1, -1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # local Gaussian mean, per channel, valid region
        return F.conv2d(x, window, groups=channels)

    c1, c2 = (SSIM_K1 * PIXEL_RANGE) ** 2, (SSIM_K2 * PIXEL_RANGE) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3)).numpy()


def feature_distance(features: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """(N,) Euclidean distance between each image's features (N, D) and its twin's."""
    return np.linalg.norm(np.asarray(features, np.float64) - np.asarray(plain, np.float64), axis=1)
