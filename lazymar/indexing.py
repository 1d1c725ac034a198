"""Gather/scatter of per-row token subsets, for token sets that have the same size in every row.

Masked decoding unmasks the same number of tokens in every image of a batch, so "the tokens computed
this step" is an index tensor ``idx`` of shape (B, n); these helpers move tokens (B, N, D) and per-head
keys/values (B, H, N, d) in and out of position-indexed buffers. ``idx=None`` means every position,
which keeps the full (refresh) path free of copies.
"""
from __future__ import annotations

import torch

from models.indexing import gather_tokens, positions  # the token helpers live with the model, re-exported

__all__ = ["positions", "gather_tokens", "scatter_tokens", "gather_heads", "scatter_heads"]


def scatter_tokens(buf: torch.Tensor, idx: torch.Tensor | None, x: torch.Tensor) -> None:
    """Write (B, n, D) into (B, N, D) at ``idx`` in place."""
    if idx is None:
        buf.copy_(x)
    else:
        buf.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, buf.shape[-1]), x.to(buf.dtype))


def gather_heads(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """(B, H, N, d) -> (B, H, n, d)."""
    if idx is None:
        return x
    B, H, _, d = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, -1, d))


def scatter_heads(buf: torch.Tensor, idx: torch.Tensor | None, x: torch.Tensor) -> None:
    """Write (B, H, n, d) into (B, H, N, d) at ``idx`` in place."""
    if idx is None:
        buf.copy_(x)
    else:
        B, H, _, d = buf.shape
        buf.scatter_(2, idx[:, None, :, None].expand(B, H, -1, d), x.to(buf.dtype))
