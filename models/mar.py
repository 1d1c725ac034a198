"""MAR: masked autoregressive image generation over continuous tokens (Li et al. 2024).

An MAE-style encoder sees the known tokens plus ``buffer_size`` class tokens; a decoder sees all tokens
(masked ones as a learned mask token) and emits a condition per token; the DiffLoss head samples each
token's latent from its condition. Sampling unmasks tokens over ``num_iter`` steps in a random order.

Constructor keywords, parameter names and the random stream follow the released code so that the
released checkpoints load with ``strict=True`` and ``torch.manual_seed`` reproduces upstream samples.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.stats as stats
import torch
import torch.fx.experimental._config
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake
from tqdm.auto import tqdm

from models.blocks import Block
from models.diffloss import DiffLoss
from models.indexing import gather_rows, gather_tokens, positions, scattered_tokens
from models.runner import AttentionStep, run_blocks
from models.schedules import check_sampling_settings, guidance_on, guidance_scale, plain_mask_lens

MASK_RATIO_STD = 0.25  # std of the truncated Gaussian over training mask ratios, centred at 1.0
SAMPLING_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes for sampling
SAMPLING_RECOMPILE_LIMIT = 64  # graphs per compiled sampling function (see _compiled)


class MAR(nn.Module):
    """Masked autoregressive transformer with a diffusion head.

    Args:
        img_size: image resolution in pixels.
        vae_stride: VAE downsampling factor (16 for KL-16).
        patch_size: latent patch size grouped into one token.
        encoder_embed_dim / encoder_depth / encoder_num_heads: encoder width, blocks, heads.
        decoder_embed_dim / decoder_depth / decoder_num_heads: decoder width, blocks, heads.
        mlp_ratio: MLP hidden width relative to the embedding width.
        norm_layer: normalisation constructor (the factories use ``LayerNorm(eps=1e-6)``).
        vae_embed_dim: latent channels of the VAE.
        mask_ratio_min: lower bound of the training mask ratio.
        label_drop_prob: probability of replacing the class by ``fake_latent`` in training (for CFG).
        class_num: number of classes.
        attn_dropout / proj_dropout: dropout rates in training.
        buffer_size: number of class-embedding ("buffer") tokens in front of the sequence.
        diffloss_d / diffloss_w: diffusion head depth and width.
        num_sampling_steps: diffusion steps at sampling time (``'100'`` or ``100``).
        noise_schedule: the head's diffusion schedule, ``"cosine"`` as upstream (not a constructor
            argument there; the released checkpoints use it) or ``"linear"`` (our demo model).
        diffusion_batch_mul: how many noise draws per token in training.
        grad_checkpointing: checkpoint transformer blocks in training.
    """

    def __init__(self, img_size: int = 256, vae_stride: int = 16, patch_size: int = 1,
                 encoder_embed_dim: int = 1024, encoder_depth: int = 16, encoder_num_heads: int = 16,
                 decoder_embed_dim: int = 1024, decoder_depth: int = 16, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_layer: Any = nn.LayerNorm, vae_embed_dim: int = 16,
                 mask_ratio_min: float = 0.7, label_drop_prob: float = 0.1, class_num: int = 1000,
                 attn_dropout: float = 0.1, proj_dropout: float = 0.1, buffer_size: int = 64,
                 diffloss_d: int = 3, diffloss_w: int = 1024, num_sampling_steps: int | str = "100",
                 diffusion_batch_mul: int = 4, grad_checkpointing: bool = False,
                 noise_schedule: str = "cosine") -> None:
        super().__init__()
        if img_size % (vae_stride * patch_size) != 0:
            raise ValueError(f"img_size {img_size} must be divisible by vae_stride*patch_size "
                             f"{vae_stride * patch_size}")
        if not 0.0 < mask_ratio_min <= 1.0:
            raise ValueError(f"mask_ratio_min must be in (0, 1], got {mask_ratio_min}")
        self.vae_embed_dim = vae_embed_dim
        self.img_size = img_size
        self.vae_stride = vae_stride
        self.patch_size = patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.grad_checkpointing = grad_checkpointing

        # Class embedding; ``fake_latent`` is the unconditional class used for guidance.
        self.num_classes = class_num
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.label_drop_prob = label_drop_prob
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))

        # Training mask ratio: left half of a Gaussian centred at 100% masking, truncated at mask_ratio_min.
        self.mask_ratio_min = mask_ratio_min
        self.mask_ratio_generator = stats.truncnorm((mask_ratio_min - 1.0) / MASK_RATIO_STD, 0,
                                                    loc=1.0, scale=MASK_RATIO_STD)

        # Encoder.
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim, bias=True)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.buffer_size = buffer_size
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList([
            Block(encoder_embed_dim, num_heads=encoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                  norm_layer=norm_layer, proj_drop=proj_dropout, attn_drop=attn_dropout)
            for _ in range(encoder_depth)])
        self.encoder_norm = norm_layer(encoder_embed_dim)

        # Decoder.
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                  norm_layer=norm_layer, proj_drop=proj_dropout, attn_drop=attn_dropout)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))

        self.initialize_weights()

        self.diffloss = DiffLoss(target_channels=self.token_embed_dim, z_channels=decoder_embed_dim,
                                 width=diffloss_w, depth=diffloss_d, num_sampling_steps=num_sampling_steps,
                                 grad_checkpointing=grad_checkpointing, noise_schedule=noise_schedule)
        self.diffusion_batch_mul = diffusion_batch_mul

    def initialize_weights(self) -> None:
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)  # as the official JAX ViT
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
            if m.weight is not None:
                nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------------------ token layout
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents -> (B, L, C*p*p) tokens in row-major order."""
        bsz, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(bsz, c, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 1, 3, 5)  # nchpwq -> nhwcpq; not einsum, which CUDA autocast runs in bf16/fp16
        return x.reshape(bsz, (h // p) * (w // p), c * p ** 2)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C*p*p) tokens -> (B, C, H, W) latents."""
        bsz = x.shape[0]
        p, c = self.patch_size, self.vae_embed_dim
        x = x.reshape(bsz, self.seq_h, self.seq_w, c, p, p)
        x = x.permute(0, 3, 1, 4, 2, 5)  # nhwcpq -> nchpwq, kept in float32 under autocast (see patchify)
        return x.reshape(bsz, c, self.seq_h * p, self.seq_w * p)

    def sample_orders(self, bsz: int, generator: torch.Generator | None = None,
                      device: torch.device | None = None) -> torch.Tensor:
        """One random permutation of the token positions per image, (B, L) long.

        Drawn from torch (``generator`` or the global one) so that seeding torch alone fixes a sample;
        upstream draws orders from numpy, which is why the equivalence vectors inject their orders.
        """
        gen_device = generator.device if generator is not None else "cpu"
        orders = torch.stack([torch.randperm(self.seq_len, generator=generator, device=gen_device)
                              for _ in range(bsz)])
        return orders.to(device if device is not None else self.fake_latent.device)

    @staticmethod
    def mask_by_order(mask_len: int, orders: torch.Tensor) -> torch.Tensor:
        """Boolean mask (B, L) that is True at the first ``mask_len`` positions of each order."""
        mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
        return mask.scatter(1, orders[:, :mask_len], True)

    def random_masking(self, x: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        """Training mask (B, L) float: a ratio drawn from the truncated Gaussian, positions by ``orders``."""
        bsz, seq_len, _ = x.shape
        # Inverse-CDF draw from torch's generator (upstream calls scipy's rvs, i.e. numpy's global
        # state): same distribution, and seeding torch alone makes training reproducible.
        mask_rate = float(self.mask_ratio_generator.ppf(torch.rand(1).item()))
        num_masked = int(np.ceil(seq_len * mask_rate))
        return self.mask_by_order(num_masked, orders).to(x.dtype)

    # ------------------------------------------------------------------------------ transformer
    def with_buffer(self, mask: torch.Tensor) -> torch.Tensor:
        """Prepend ``buffer_size`` always-known positions to a (B, L) mask."""
        return torch.cat([torch.zeros(mask.shape[0], self.buffer_size, dtype=mask.dtype, device=mask.device),
                          mask], dim=1)

    def encoder_input(self, x: torch.Tensor, class_embedding: torch.Tensor,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded tokens with the class embedding in the buffer, position embedding and norm:
        (B, buf+L, D), or with ``positions`` (B, n) (image tokens only, ``>= buffer_size``) those
        tokens alone, (B, n, D), without embedding the others."""
        if positions is not None:
            x = self.z_proj(gather_tokens(x, positions - self.buffer_size))
            return self.z_proj_ln(x + self.encoder_pos_embed_learned[0, positions])
        x = self.z_proj(x)
        bsz, _, embed_dim = x.shape
        x = torch.cat([torch.zeros(bsz, self.buffer_size, embed_dim, device=x.device, dtype=x.dtype), x], dim=1)
        if self.training:
            # Label dropout trains the unconditional class used by classifier-free guidance.
            drop = (torch.rand(bsz, device=x.device) < self.label_drop_prob).unsqueeze(-1).to(x.dtype)
            class_embedding = drop * self.fake_latent + (1 - drop) * class_embedding
        x[:, :self.buffer_size] = class_embedding.unsqueeze(1).to(x.dtype)
        return self.z_proj_ln(x + self.encoder_pos_embed_learned)

    # The block loop :meth:`run_blocks` runs; :meth:`compile_for_sampling` sets a compiled one on the instance.
    block_runner = staticmethod(run_blocks)

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, attention: AttentionStep | None = None, *,
                   start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks ``start .. stop - 1`` of ``blocks`` (``encoder_blocks`` or ``decoder_blocks``) over rows
        ``x``, with an attention step a technique may replace: :func:`models.runner.run_blocks`, the one
        block loop of every sampler (what :meth:`compile_for_sampling` compiles).

        The step's state is allocated here (:meth:`AttentionStep.prepare`), before the loop and outside
        compiled code. An empty range (LazyMAR's blocks after a similarity layer that is the last) returns
        ``x`` without a call: a graph of no operation is nothing to compile.
        """
        stop = len(blocks) if stop is None else stop
        if start >= stop:
            return x
        if attention is not None:
            attention.prepare(blocks, x)
        return self.block_runner(blocks, x, attention, start=start, stop=stop,
                                 checkpointed=self.grad_checkpointing and self.training)

    def known_positions(self, mask: torch.Tensor, n_known: int | None = None) -> torch.Tensor:
        """(B, buf + known) ascending positions of the buffer and the known tokens (mask == 0).

        With ``n_known`` (sampling: the schedule knows it) without a host synchronisation; without it
        (training) counted from the mask.
        """
        return positions(self.with_buffer(mask) == 0, None if n_known is None else self.buffer_size + n_known)

    def forward_mae_encoder(self, x: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor,
                            keep: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the known tokens (mask == 0) and the buffer: (B, L, Ct) -> (B, buf + known, D).

        ``keep``: :meth:`known_positions` of ``mask``, when the caller has them.
        """
        x = self.encoder_input(x, class_embedding)
        keep = self.known_positions(mask) if keep is None else keep
        x = gather_tokens(x, keep)
        return self.encoder_norm(self.run_blocks(self.encoder_blocks, x))

    def decoder_input(self, x: torch.Tensor, keep: torch.Tensor,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """Encoded tokens ``x`` (B, k, D) placed among mask tokens, position embedding added: (B, buf+L, Dd)
        with ``x`` at positions ``keep`` (B, k), or with ``positions`` (B, n) the rows of those positions
        alone, (B, n, Dd), ``x`` at the rows ``keep`` indexes."""
        x = self.decoder_embed(x)
        n = self.buffer_size + self.seq_len if positions is None else positions.shape[1]
        rows = scattered_tokens(self.mask_token.to(x.dtype).expand(x.shape[0], n, -1), keep, x)
        if positions is None:
            return rows + self.decoder_pos_embed_learned
        return rows + self.decoder_pos_embed_learned[0, positions]

    def decoder_output(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and the diffusion position embedding: (B, buf+L, Dd) -> (B, L, Dd) without the
        buffer, or, with ``positions`` (B, n) of the rows of ``x`` (image tokens only), (B, n, Dd)."""
        x = self.decoder_norm(x)
        if positions is None:
            return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned
        return x + self.diffusion_pos_embed_learned[0, positions - self.buffer_size]

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Decode all positions to per-token conditions (B, L, Dd)."""
        x = self.decoder_input(x, self.known_positions(mask) if keep is None else keep)
        return self.decoder_output(self.run_blocks(self.decoder_blocks, x))

    # ------------------------------------------------------------------------------ training
    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, _ = target.shape
        target = target.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)
        z = z.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)
        mask = mask.reshape(bsz * seq_len).repeat(self.diffusion_batch_mul)
        return self.diffloss(z=z, target=target, mask=mask)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss on VAE latents ``imgs`` (B, C, h, w) (already scaled) with class ``labels`` (B,)."""
        class_embedding = self.class_emb(labels)
        x = self.patchify(imgs)
        gt_latents = x.clone().detach()
        orders = self.sample_orders(x.shape[0], device=x.device)
        mask = self.random_masking(x, orders)
        x = self.forward_mae_encoder(x, mask, class_embedding)
        z = self.forward_mae_decoder(x, mask)
        return self.forward_loss(z=z, target=gt_latents, mask=mask)

    # ------------------------------------------------------------------------------ sampling
    def class_embeddings(self, bsz: int, labels: torch.Tensor | None, guided: bool) -> torch.Tensor:
        """Class embeddings (B, D), followed by B unconditional ones when guided."""
        cond = self.class_emb(labels) if labels is not None else self.fake_latent.repeat(bsz, 1)
        if guided:
            return torch.cat([cond, self.fake_latent.repeat(bsz, 1)], dim=0)
        return cond

    def transformer(self, tokens: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor,
                    n_known: int | None = None) -> torch.Tensor:
        """Plain MAR transformer pass: per-token conditions (B', L, Dd) for the current tokens and mask
        (``n_known`` known tokens per row, when the caller knows it: see :meth:`known_positions`)."""
        keep = self.known_positions(mask, n_known)
        return self.forward_mae_decoder(self.forward_mae_encoder(tokens, mask, class_embedding, keep), mask, keep)

    def compile_for_sampling(self, mode: str = "default", backend: str | Callable = "inductor") -> None:
        """Compile what every sampler runs with ``torch.compile``: the block runner (:meth:`run_blocks`,
        through which every technique runs the transformer) and the diffusion head's denoising step
        (:meth:`SimpleMLPAdaLN.forward_modulated`, 6400 calls per image at 64 x 100 steps, the head cache's
        included). Shapes change with the step's token count, so the graphs are dynamic.
        ``mode="reduce-overhead"`` also replays the compiled code as CUDA graphs on a GPU
        (``--cuda_graph``): the head's step is then one launch instead of ~30 small kernels.

        The random draws stay outside the compiled code, so the random stream is the eager one; the
        fused arithmetic rounds differently in the last bits (tests hold it to the vector tolerance).
        What the compiled code writes lives in tensors allocated before it runs (:meth:`run_blocks`,
        :class:`~models.diffloss.HeadStepCache`), so a second call with the same shapes reuses its graphs.
        Sampling only: training keeps the eager, checkpointable blocks. Undo with :meth:`eager_sampling`.
        ``backend``: torch.compile's (tests count compiled frames with their own).
        """
        if mode not in SAMPLING_COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose one of {SAMPLING_COMPILE_MODES}")
        self.eager_sampling()
        net = self.diffloss.net
        net.forward_modulated = _compiled(net.forward_modulated, mode, backend)
        self.block_runner = _compiled(run_blocks, mode, backend)

    def eager_sampling(self) -> None:
        """Back to the eager methods after :meth:`compile_for_sampling` (the instance attributes go)."""
        for obj, name in ((self.diffloss.net, "forward_modulated"), (self, "block_runner")):
            obj.__dict__.pop(name, None)

    @torch.no_grad()
    def sample_tokens(self, bsz: int, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                      labels: torch.Tensor | None = None, temperature: float = 1.0, progress: bool = False,
                      orders: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      accel: Any = None) -> torch.Tensor:
        """Generate token latents ``(bsz, vae_embed_dim, h, w)`` (scaled VAE space).

        Args:
            bsz: number of images.
            num_iter: masked decoding steps.
            cfg: classifier-free guidance scale; 1.0 disables guidance (no doubled batch).
            cfg_schedule: ``"linear"`` (ramp with the fraction generated) or ``"constant"``.
            labels: (bsz,) class labels; ``None`` samples unconditionally (``fake_latent``).
            temperature: diffusion noise temperature.
            progress: show a progress bar over steps.
            orders: (bsz, seq_len) generation orders; drawn at random when ``None``.
            generator: source of every random draw; ``None`` = torch's global generators, as upstream.
            accel: ``None`` (plain MAR) or an acceleration config: an object with a
                ``sampler(model, *, num_iter, guided)`` method returning the :class:`StepStrategy` (or
                :class:`LoopStrategy`) of one call, such as ``lazymar.preset("lazymar")``, any
                ``lazymar.AccelConfig`` or ``lazymar.CSpDConfig(draft=...)``. A preset
                name (``"lazymar"``) works once the ``lazymar`` package is imported (it names presets of
                that package, which this layer does not import).
        """
        self._check_sampling_args(bsz, num_iter, cfg, cfg_schedule, labels, temperature, orders)
        if self.fake_latent.dtype != torch.float32:
            raise TypeError(f"MAR samples with float32 weights (these are {self.fake_latent.dtype}); for bf16 or "
                            f"fp16 speed keep them float32 and sample under torch.autocast (util.precision, "
                            f"--precision in eval.py / sample.py)")
        guided = guidance_on(cfg)  # decided once, passed down to every part of the step
        sampler = step_strategy(self, accel, num_iter=num_iter, guided=guided)
        if isinstance(sampler, LoopStrategy):  # runs the whole generation itself (speculative decoding)
            tokens = sampler.generate(bsz, num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule, labels=labels,
                                      temperature=temperature, orders=orders, generator=generator,
                                      progress=progress)
            return self.unpatchify(tokens)
        device = self.fake_latent.device
        if orders is None:
            orders = self.sample_orders(bsz, generator, device)
        orders = sampler.arrange_orders(orders.to(device))
        class_embedding = self.class_embeddings(bsz, labels.to(device) if labels is not None else None, guided)

        mask = torch.ones(bsz, self.seq_len, dtype=torch.bool, device=device)
        tokens = torch.zeros(bsz, self.seq_len, self.token_embed_dim, device=device)
        plan = sampler.mask_lens()  # tokens left masked after each step; its length is the step count
        guidance_lens = sampler.guidance_lens()  # the masked count each step's guidance scale is read at
        steps = tqdm(plan, desc="MAR steps", leave=False) if progress else plan
        masked = self.seq_len
        for step, mask_len in enumerate(steps):
            # Which tokens stay masked after this step, and which are predicted now (at the last step:
            # all remaining). Known before the transformer runs, so techniques can plan with it.
            mask_next = self.mask_by_order(mask_len, orders)
            last = step == len(plan) - 1
            to_pred = mask if last else mask & ~mask_next
            n_pred = masked if last else masked - mask_len  # the same in every image
            scale = guidance_scale(cfg, cfg_schedule, guidance_lens[step], self.seq_len)

            # Per-token conditions of the tokens predicted now: (n, Dd), or (2n, Dd) with guidance.
            z = sampler.conditions(step, tokens, mask, to_pred, class_embedding)
            sampled = sampler.sample_head(step, z, temperature, scale, generator)  # (n, Ct)

            # Rows of ``sampled`` are the predicted tokens image by image, in position order.
            tokens = scattered_tokens(tokens, positions(to_pred, n_pred),
                                      sampled.reshape(bsz, n_pred, self.token_embed_dim))
            mask, masked = mask_next, mask_len
        return self.unpatchify(tokens)

    def _check_sampling_args(self, bsz: int, num_iter: int, cfg: float, cfg_schedule: str,
                             labels: torch.Tensor | None, temperature: float,
                             orders: torch.Tensor | None) -> None:
        if bsz < 1:
            raise ValueError(f"bsz must be >= 1, got {bsz}")
        check_sampling_settings(num_iter, cfg, cfg_schedule, temperature)
        # The value checks read the tensors on the host: once per call, before any work is queued. A fake
        # tensor (torch's FakeTensorMode: shapes and devices without data, how the tests sample on a CUDA
        # device that is not there) has no values to check, and reading them would raise.
        if labels is not None:
            if labels.shape != (bsz,):
                raise ValueError(f"labels must have shape ({bsz},), got {tuple(labels.shape)}")
            if labels.numel() and not is_fake(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"labels must be in [0, {self.num_classes}), got range "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
        if orders is not None:
            if orders.shape != (bsz, self.seq_len):
                raise ValueError(f"orders must have shape ({bsz}, {self.seq_len}), got {tuple(orders.shape)}")
            expected = torch.arange(self.seq_len, device=orders.device).expand(bsz, -1)
            if not is_fake(orders) and not torch.equal(orders.sort(dim=1).values, expected):
                raise ValueError("each row of orders must be a permutation of range(seq_len)")


def _compiled(fn: Callable, mode: str, backend: str | Callable) -> Callable:
    """``torch.compile(fn)`` for sampling.

    - ``fullgraph``: each call is one graph; a step that dynamo cannot trace is an error, not a frame left
      to eager whose inner calls then compile one by one (and fail their guards at the next call).
    - :data:`SAMPLING_RECOMPILE_LIMIT` graphs: every technique runs the blocks with its own attention
      step over its own block ranges, one graph each (dynamo's default of 8 would send the later ones
      back to eager, silently but for a warning).
    - no duck shaping: sizes that happen to be equal at the first call (the batch and a head count, a
      stride and an offset) are not assumed equal, which would take another graph when they differ.
    """
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, mode=mode, backend=backend)

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(recompile_limit=SAMPLING_RECOMPILE_LIMIT), \
                torch.fx.experimental._config.patch(use_duck_shape=False):
            return compiled(*args, **kwargs)

    return run


class Accel(Protocol):
    """What ``sample_tokens(accel=...)`` takes besides ``None``: a config that builds the step strategy
    of one call (``lazymar.AccelConfig``)."""

    def sampler(self, model: MAR, *, num_iter: int, guided: bool) -> "StepStrategy | LoopStrategy":
        """The strategy of one ``sample_tokens`` call (its cache state is fresh)."""


# Preset name -> config, for ``sample_tokens(accel="<name>")``: installed by the package that defines
# the names (``lazymar``, on import), since this layer does not import the ones above it.
_PRESET_NAMES: Callable[[str], Accel] | None = None


def register_preset_names(resolve: Callable[[str], Accel]) -> None:
    """Install the resolver of preset names passed as ``sample_tokens(accel=<name>)``."""
    global _PRESET_NAMES
    _PRESET_NAMES = resolve


def step_strategy(model: MAR, accel: Accel | str | None, *, num_iter: int,
                  guided: bool) -> "StepStrategy | LoopStrategy":
    """The strategy of ``model.sample_tokens(accel=accel)``: plain MAR for None, else the config's own."""
    if accel is None:
        return PlainSteps(model, num_iter, guided)
    if isinstance(accel, str):
        if _PRESET_NAMES is None:
            raise ValueError(f"accel={accel!r} names a preset of the lazymar package, which models/ does not "
                             f"import: pass its config, accel=lazymar.preset({accel!r}) (or import lazymar "
                             f"before passing names)")
        accel = _PRESET_NAMES(accel)
    if not callable(getattr(accel, "sampler", None)):
        raise TypeError(f"accel must be None, an acceleration config (lazymar.AccelConfig, lazymar.preset(name)) "
                        f"or a preset name, got {type(accel).__name__}")
    return accel.sampler(model, num_iter=num_iter, guided=guided)


class StepStrategy(Protocol):
    """How MAR steps are scheduled, compute their conditions and sample their tokens (plain, or an
    acceleration config)."""

    def mask_lens(self) -> list[int]:
        """Tokens left masked after each step; its length is the number of steps."""

    def guidance_lens(self) -> list[int]:
        """Per step, the masked count the linear guidance ramp is evaluated at (MAR: ``mask_lens``)."""

    def arrange_orders(self, orders: torch.Tensor) -> torch.Tensor:
        """The generation orders (B, L) the steps follow (MAR generates an order from its end)."""

    def conditions(self, step: int, tokens: torch.Tensor, mask: torch.Tensor, to_pred: torch.Tensor,
                   class_embedding: torch.Tensor) -> torch.Tensor:
        """Conditions of the tokens in ``to_pred`` (row-major), (n, D), or (2n, D) when guided."""

    def sample_head(self, step: int, z: torch.Tensor, temperature: float, cfg: float,
                    generator: torch.Generator | None) -> torch.Tensor:
        """Sampled latents (n, C) for conditions ``z``."""


@runtime_checkable
class LoopStrategy(Protocol):
    """A strategy that runs the whole generation instead of answering per-step hooks.

    For samplers whose loop is not MAR's one-step-at-a-time loop: continuous speculative decoding
    (:mod:`lazymar.cspd`) runs two models in turn, and its verification pass rewrites tokens drafted at
    earlier steps. :meth:`MAR.sample_tokens` checks the arguments, then hands the call over.
    """

    def generate(self, bsz: int, *, num_iter: int, cfg: float, cfg_schedule: str, labels: torch.Tensor | None,
                 temperature: float, orders: torch.Tensor | None, generator: torch.Generator | None,
                 progress: bool) -> torch.Tensor:
        """Token latents (bsz, L, C) in sequence order (``sample_tokens``'s arguments, already checked)."""


class PlainSteps:
    """The plain MAR step: the whole transformer on both guidance halves, then the full diffusion head."""

    def __init__(self, model: MAR, num_iter: int, guided: bool) -> None:
        self.model = model
        self.guided = guided
        self.plan = plain_mask_lens(num_iter, model.seq_len)

    def mask_lens(self) -> list[int]:
        return self.plan

    def guidance_lens(self) -> list[int]:
        return self.plan

    def arrange_orders(self, orders: torch.Tensor) -> torch.Tensor:
        return orders

    def conditions(self, step: int, tokens: torch.Tensor, mask: torch.Tensor, to_pred: torch.Tensor,
                   class_embedding: torch.Tensor) -> torch.Tensor:
        masked = self.model.seq_len if step == 0 else self.plan[step - 1]
        n_pred = masked if step == len(self.plan) - 1 else masked - self.plan[step]
        if self.guided:  # the conditional half first
            tokens, mask, to_pred = (torch.cat([t, t], dim=0) for t in (tokens, mask, to_pred))
        z = self.model.transformer(tokens, mask.float(), class_embedding, self.model.seq_len - masked)  # (B', L, D)
        return gather_rows(z, positions(to_pred, n_pred))

    def sample_head(self, step: int, z: torch.Tensor, temperature: float, cfg: float,
                    generator: torch.Generator | None) -> torch.Tensor:
        return self.model.diffloss.sample(z, temperature, cfg, guided=self.guided, generator=generator)


def _mar(**kwargs: Any) -> MAR:
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
    return MAR(**kwargs)


def mar_from_config(config: dict[str, Any]) -> MAR:
    """A MAR from constructor keywords as stored in checkpoints we export (``config``), with the
    factories' ``LayerNorm(eps=1e-6)``: the one builder for training, export and loading."""
    return _mar(**config)


def mar_base(**kwargs: Any) -> MAR:
    """MAR-B (208M): 12+12 blocks of width 768, 12 heads."""
    return _mar(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12, mlp_ratio=4, **kwargs)


def mar_large(**kwargs: Any) -> MAR:
    """MAR-L (479M): 16+16 blocks of width 1024, 16 heads."""
    return _mar(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16, mlp_ratio=4, **kwargs)


def mar_huge(**kwargs: Any) -> MAR:
    """MAR-H (943M): 20+20 blocks of width 1280, 16 heads."""
    return _mar(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16, mlp_ratio=4, **kwargs)


# Released model sizes, with the diffusion-head settings of the released checkpoints.
MAR_FACTORIES = {"mar_base": mar_base, "mar_large": mar_large, "mar_huge": mar_huge}
RELEASED_HEADS = {"mar_base": dict(diffloss_d=6, diffloss_w=1024),
                  "mar_large": dict(diffloss_d=8, diffloss_w=1280),
                  "mar_huge": dict(diffloss_d=12, diffloss_w=1536)}


def build_released(name: str, **kwargs: Any) -> MAR:
    """A released model size with its released head (``buffer_size=64``); ``kwargs`` override."""
    if name not in MAR_FACTORIES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MAR_FACTORIES)}")
    settings = dict(buffer_size=64, **RELEASED_HEADS[name])
    settings.update(kwargs)
    return MAR_FACTORIES[name](**settings)
