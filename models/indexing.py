"""Positions of a per-row token subset whose size the schedule knows in advance.

Masked decoding unmasks the same, planned number of tokens in every image, so the positions where a
(B, N) mask is True can be found with a stable sort instead of ``nonzero``: ``nonzero`` (and boolean
indexing, which calls it) must copy the count to the host, a device synchronisation per call that keeps
a GPU idle between MAR steps and rules out CUDA graphs.
"""
from __future__ import annotations

import torch


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) bool with ``count`` True per row -> (B, count) positions where it is True, ascending.

    A stable argsort puts the True positions first in their original order; no host synchronisation.
    The count must be right: it is not checked (checking it would synchronise).
    """
    return (~mask).to(torch.int8).argsort(dim=1, stable=True)[:, :count]


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, N, D) at (B, n) positions -> (B * n, D), row-major as boolean indexing orders them."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])).reshape(-1, x.shape[-1])
