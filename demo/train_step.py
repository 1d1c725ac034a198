"""A static-shape MAR training step: the mask ratio drawn from a few fixed kept-token counts.

``MAR.forward`` draws a mask ratio per step from a truncated Gaussian, so the encoder sees a new
number of kept tokens almost every step and gathers them with ``nonzero`` (a host sync and a
data-dependent shape). Neither lets a compiler or a CUDA graph capture the step. Here the ratio's
quantile is quantised to ``num_buckets`` equiprobable values (the midpoints of ``num_buckets``
equal-probability bins of the same distribution), the kept tokens are gathered by index
(``orders[:, num_masked:]`` sorted, i.e. the positions ``nonzero`` returns, in the same order) and
scattered back with ``scatter``, without a host sync. The step has one static shape per bucket, so
a compiled step (one graph with the count symbolic) is replayed as ``num_buckets`` CUDA graphs.

Everything else is the model's own code (``encoder_input``, blocks, ``decoder_output``,
``forward_loss``) and the random draws come in the order ``MAR.forward`` makes them, so for the same
count the loss equals ``MAR.forward``'s (``tests/test_train_step.py``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from models.mar import MAR

# Model sizes: transformer width/depth/heads and head size. ``demo`` is the shipped demo model.
_DEMO: dict[str, Any] = dict(encoder_embed_dim=128, encoder_depth=4, encoder_num_heads=4, decoder_embed_dim=128,
                             decoder_depth=4, decoder_num_heads=4, mlp_ratio=4.0, buffer_size=16, diffloss_d=3,
                             diffloss_w=192)
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32,
                 decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0, buffer_size=4, diffloss_d=1,
                 diffloss_w=32),
    "demo": _DEMO,
    # The draft of speculative decoding on the demo (lazymar.cspd): the demo at half its width.
    "demo_draft": dict(_DEMO, encoder_embed_dim=64, decoder_embed_dim=64, diffloss_w=96),
    "small": dict(encoder_embed_dim=256, encoder_depth=6, encoder_num_heads=4, decoder_embed_dim=256,
                  decoder_depth=6, decoder_num_heads=4, mlp_ratio=4.0, buffer_size=32, diffloss_d=3,
                  diffloss_w=512),
}


def bucket_mask_counts(model: MAR, num_buckets: int) -> list[int]:
    """The ``num_buckets`` masked-token counts: ``ceil(L * ppf((k + 0.5) / num_buckets))``, ascending."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    ratios = model.mask_ratio_generator.ppf([(k + 0.5) / num_buckets for k in range(num_buckets)])
    return [min(model.seq_len, int(math.ceil(model.seq_len * float(r)))) for r in ratios]


class BucketedMaskStep(nn.Module):
    """``MAR.forward`` with the masked count drawn from :func:`bucket_mask_counts` and static shapes.

    A module (not a function) so that DDP can wrap it: DDP needs the forward to run through it.

    Args:
        model: the MAR being trained (its parameters are the step's parameters).
        num_buckets: how many kept-token counts; more buckets approach the continuous ratio
            distribution, fewer mean fewer compiled graphs (one per count).
    """

    def __init__(self, model: MAR, num_buckets: int) -> None:
        super().__init__()
        self.model = model
        self.counts = bucket_mask_counts(model, num_buckets)

    def draw_orders(self, bsz: int, device: torch.device) -> torch.Tensor:
        """Token orders (B, L) drawn as ``MAR.forward`` draws them (CPU generator); on a GPU they go over
        from pinned memory without blocking, so the host keeps queueing work."""
        orders = self.model.sample_orders(bsz, device=torch.device("cpu"))
        if device.type == "cuda":
            return orders.pin_memory().to(device, non_blocking=True)
        return orders.to(device)

    def draw_num_masked(self) -> int:
        """One count, from the same single ``torch.rand(1)`` draw ``MAR.random_masking`` makes."""
        u = torch.rand(1).item()
        return self.counts[min(int(u * len(self.counts)), len(self.counts) - 1)]

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor,
                num_masked: int) -> torch.Tensor:
        """Training loss on scaled latents ``imgs`` (B, C, h, w), ``labels`` (B,), token ``orders`` (B, L)."""
        m = self.model
        class_embedding = m.class_emb(labels)
        x = m.patchify(imgs)  # (B, L, Ct)
        gt_latents = x.detach()
        bsz = x.shape[0]
        mask = m.mask_by_order(num_masked, orders).to(x.dtype)  # (B, L), 1 = masked
        # Kept positions in ascending order (what ``nonzero`` yields), behind the always-kept buffer.
        kept = orders[:, num_masked:].sort(dim=1).values + m.buffer_size  # (B, L - num_masked)
        buffer = torch.arange(m.buffer_size, device=orders.device).expand(bsz, -1)
        index = torch.cat([buffer, kept], dim=1)  # (B, buf + known)

        x = m.encoder_input(x, class_embedding)  # (B, buf + L, D)
        x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, buf + known, D)
        x = m.encoder_norm(m.run_blocks(m.encoder_blocks, x))

        x = m.decoder_embed(x)  # (B, buf + known, Dd)
        full = m.mask_token.to(x.dtype).expand(bsz, m.buffer_size + m.seq_len, -1)
        full = full.scatter(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)  # (B, buf + L, Dd)
        z = m.decoder_output(m.run_blocks(m.decoder_blocks, full + m.decoder_pos_embed_learned))
        return m.forward_loss(z=z, target=gt_latents, mask=mask)


def eager_random_stream() -> None:
    """Make compiled training code draw its random numbers (dropout, the head's noise and timesteps) with
    the eager generator calls (inductor's ``fallback_random``), instead of its own Philox stream.

    Why: a run may be resumed with or without ``--compile`` (train.py exempts the flag from the resume
    check), which is only sound if both execute the same step: same random draws, sums equal to float
    tolerance. Without this the compiled step is another, equally valid, but different random stream.
    Process-wide, as every compiled graph of a training process should follow it.
    """
    import torch._inductor.config as inductor_config
    inductor_config.fallback_random = True


def compile_step(step: nn.Module, num_buckets: int, cuda_graph: bool) -> nn.Module:
    """``torch.compile`` the whole bucketed training forward (and so its backward); with ``cuda_graph``
    the compiled step is also captured and replayed as CUDA graphs, one per bucket.

    Why: the demo model's step is hundreds of small kernels, so a GPU waits on their launches; fused
    kernels and graph replay remove most of that. The masked count is a Python int: the first count
    compiles a static graph, the second a graph with the count symbolic that serves every bucket (two
    compilations in all, measured); the recompile limit still admits one graph per bucket, so a
    specialisation can never silently fall back to eager.
    """
    import torch._dynamo
    eager_random_stream()
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(cfg, name, max(getattr(cfg, name), num_buckets + 2))
    return torch.compile(step, mode="reduce-overhead" if cuda_graph else None)


def compile_for_training(model: MAR) -> None:
    """``torch.compile`` the parts of ``model`` that do the work, in place (``nn.Module.compile``).

    Why these parts: the DiffLoss MLP runs on every token ``diffusion_batch_mul`` times with fixed
    shapes and is a chain of small matmuls and elementwise ops (adaLN modulation, SiLU, LayerNorm)
    that the compiler fuses; the blocks are compiled one by one (each is one graph) rather than the
    whole model, whose encoder gathers a data-dependent number of kept tokens. The encoder blocks see
    that number change every step, so they are compiled with dynamic shapes. In-place compilation
    keeps ``state_dict`` keys as they are, so checkpoints, resume and export do not change.
    """
    eager_random_stream()
    model.diffloss.net.compile()
    for block in model.encoder_blocks:
        block.compile(dynamic=True)
    for block in model.decoder_blocks:
        block.compile()
