"""Posterior samples of cached VAE latents, the training input of MAR.

Building the cache of a data set is the data set's business (the demo's: :mod:`demo.latents`).
"""
from __future__ import annotations

import torch


def draw_latents(mean: torch.Tensor, std: torch.Tensor, scale: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A posterior sample ``scale * (mean + std * eps)`` (what MAR trains on)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return (mean + std * eps) * scale
