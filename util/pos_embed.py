"""2-D sine-cosine position embeddings (as MAE's fixed ones), used to initialise MAR's learned ones.

MAR learns its position embeddings from a N(0, 0.02) start. With ImageNet-scale training that is
fine; a small model trained for minutes first has to discover which tokens are neighbours before it
can predict a token from them, and until then it samples every token from the marginal. Starting
the (still learned) embeddings at the 2-D sin-cos grid gives it locality from step 0. Only the
initial values change: the parameters, their names and shapes stay upstream's.
"""
from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(n,) positions -> (n, embed_dim) [sin | cos] at geometric frequencies (embed_dim even)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(embed_dim: int, h: int, w: int) -> torch.Tensor:
    """(h*w, embed_dim) embedding of a row-major h x w grid: half the channels rows, half columns."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(embed_dim // 2, rows.reshape(-1)),
                      sincos_1d(embed_dim // 2, cols.reshape(-1))], dim=1).float()


@torch.no_grad()
def init_mar_pos_embed_sincos(model) -> None:
    """Set MAR's encoder and decoder position embeddings to the 2-D sin-cos grid (buffer rows 0).

    The diffusion position embedding (added to the head's condition) keeps its random start.
    """
    for param in (model.encoder_pos_embed_learned, model.decoder_pos_embed_learned):
        full = torch.zeros(param.shape[1:], dtype=param.dtype)
        full[model.buffer_size:] = sincos_2d(param.shape[-1], model.seq_h, model.seq_w)
        param.copy_(full.unsqueeze(0))
