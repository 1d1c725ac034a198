"""Pre-norm transformer block with timm's parameter names.

The released MAR checkpoints were trained with ``timm.models.vision_transformer.Block``; we keep its
parameter names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) so that
those checkpoints load with ``strict=True``, but own the code: the acceleration techniques need to get
at queries, keys and values separately (token caches keep keys/values of tokens they do not recompute),
which timm's fused ``forward`` does not expose.

The block is split into the pieces a cache needs:
``qkv(x)`` -> per-head queries/keys/values, ``attend(q, k, v)`` -> attention output before the
projection, and ``finish(x, attn_out)`` -> residual + MLP. ``forward`` is their plain composition;
:func:`models.runner.run_blocks` runs a stack of them with a technique's attention step in between.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head self-attention (timm layout: one fused ``qkv`` linear, then ``proj``).

    Args:
        dim: token width.
        num_heads: number of heads; ``dim`` must be divisible by it.
        qkv_bias: whether the fused qkv projection has a bias (MAR: True).
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection (training only).
        fused_attn: use ``F.scaled_dot_product_attention``; the explicit softmax path is kept because
            FLOP counters and attention-score based techniques need the products spelled out.
    """

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, fused_attn: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> three (B, H, N, C/H) tensors."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention of queries (B, H, Nq, d) over keys/values (B, H, Nk, d) -> (B, Nq, C)."""
        if self.fused_attn:
            dropout_p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, Nq, Nk)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v  # (B, H, Nq, d)
        B, H, Nq, d = x.shape
        return x.transpose(1, 2).reshape(B, Nq, H * d)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        return self.project(self.attend(q, k, v))


class Mlp(nn.Module):
    """Two-layer GELU MLP (timm names ``fc1``/``fc2``)."""

    def __init__(self, dim: int, *, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        qkv_bias: bias on the fused qkv projection.
        norm_layer: normalisation constructor (MAR passes ``LayerNorm(eps=1e-6)``).
        proj_drop: dropout after attention projection and in the MLP (training only).
        attn_drop: dropout on attention weights (training only).
    """

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: type[nn.Module] | callable = nn.LayerNorm, proj_drop: float = 0.0,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_dim=int(dim * mlp_ratio), drop=proj_drop)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries, keys and values of the normalised input; each (B, H, N, d)."""
        return self.attn.qkv_heads(self.norm1(x))

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Rest of the block given the attention output (before ``proj``) of the same tokens."""
        x = x + self.attn.project(attn_out)
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.finish(x, self.attn.attend(q, k, v))
