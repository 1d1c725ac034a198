"""Positions of a per-row token subset, and moving tokens in and out of position-indexed tensors.

Masked decoding unmasks the same, planned number of tokens in every image, so the positions where a
(B, N) mask is True can be found with a stable sort instead of ``nonzero`` when the count is known:
``nonzero`` (and boolean indexing, which calls it) must copy the count to the host, a device
synchronisation per call that keeps a GPU idle between MAR steps and rules out CUDA graphs.
"""
from __future__ import annotations

import torch


def positions(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """(B, N) bool with the same count per row -> (B, n) positions where it is True, ascending.

    With ``count`` (the plan knows it) a stable argsort puts the True positions first in their
    original order, without a host synchronisation; the count is not checked (that would synchronise).
    Without it (training, where masks are drawn) the count is read from the mask.
    """
    if count is None:
        return mask.nonzero(as_tuple=True)[1].reshape(mask.shape[0], -1)
    return (~mask).to(torch.int8).argsort(dim=1, stable=True)[:, :count]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) at (B, n) positions -> (B, n, D); ``idx=None`` is every position."""
    if idx is None:
        return x
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, N, D) at (B, n) positions -> (B * n, D), row-major as boolean indexing orders them."""
    return gather_tokens(x, idx).reshape(-1, x.shape[-1])


def scattered_tokens(buf: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A copy of (B, N, D) ``buf`` with (B, n, D) ``x`` written at (B, n) positions ``idx``."""
    return buf.scatter(1, idx.unsqueeze(-1).expand(-1, -1, buf.shape[-1]), x.to(buf.dtype))
