"""KL-regularised convolutional autoencoder (the LDM "KL-f16" tokenizer MAR uses).

``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`` is the released KL-16 VAE: 256x256 images to a
16x16x16 latent. Smaller ``ch_mult`` gives smaller strides (the demo tokenizer uses this class too).
Parameter names follow the released ``kl16.ckpt``; load it with ``util.checkpoint.load_vae_weights``
(upstream's ``ckpt_path=`` argument is gone: models do not read files).

MAR works on ``posterior.sample() * scale`` (0.2325 for KL-16) and decodes ``vae.decode(tokens / scale)``
to images in [-1, 1].
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

VAE_LATENT_SCALE = 0.2325  # KL-16 latent scale used by the released MAR models
KL16_CONFIG = dict(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))
GROUPNORM_GROUPS = 32
LOGVAR_RANGE = (-30.0, 20.0)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # swish


def Normalize(in_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUPNORM_GROUPS, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with the asymmetric (right/bottom) padding of the original model."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, with a 1x1 shortcut when the width changes."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).transpose(1, 2)  # (b, hw, c)
        k = k.reshape(b, c, hh * ww).transpose(1, 2)
        v = v.reshape(b, c, hh * ww).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, hw, c)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hh, ww))


class Encoder(nn.Module):
    """Image (B, 3, R, R) -> moments (B, 2*z_channels, R/2^(levels-1), ...).

    Args:
        ch: base width.
        ch_mult: width multiplier per resolution level; each level but the last halves the resolution.
        num_res_blocks: residual blocks per level.
        attn_resolutions: resolutions (assuming ``resolution`` input) that get attention after each block.
        resolution: nominal input resolution (only used to place attention).
        z_channels: latent channels; the output has twice as many (mean and log-variance).
    """

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.0, in_channels: int = 3,
                 resolution: int = 256, z_channels: int = 16) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, r, r) -> image (B, 3, r*2^(levels-1), ...). Arguments as :class:`Encoder`."""

    def __init__(self, *, ch: int = 128, out_ch: int = 3, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 resolution: int = 256, z_channels: int = 16) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """Posterior N(mean, exp(logvar)) over latents; ``moments`` is (B, 2C, h, w) = [mean; logvar]."""

    def __init__(self, moments: torch.Tensor, deterministic: bool = False) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, *LOGVAR_RANGE)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            noise = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype)
        else:
            noise = torch.randn(self.mean.shape, generator=generator, device=generator.device,
                                dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over latent dims: (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """KL autoencoder.

    Args:
        embed_dim: latent channels.
        ch_mult: width multipliers per level; stride is ``2 ** (len(ch_mult) - 1)``.
        use_variational: if False the posterior is deterministic (std 1 placeholder, as upstream).
        ch: base width (128 in KL-16; smaller for the demo tokenizer).
        num_res_blocks: residual blocks per level.
        resolution: nominal image resolution (places the encoder's attention at 16x16).
    """

    def __init__(self, embed_dim: int, ch_mult: Sequence[int], use_variational: bool = True, *,
                 ch: int = 128, num_res_blocks: int = 2, resolution: int = 256) -> None:
        super().__init__()
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, resolution=resolution,
                               z_channels=embed_dim)
        self.decoder = Decoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, resolution=resolution,
                               z_channels=embed_dim)
        self.use_variational = use_variational
        mult = 2 if use_variational else 1
        self.quant_conv = nn.Conv2d(2 * embed_dim, mult * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.embed_dim = embed_dim
        self.stride = 2 ** (len(ch_mult) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        moments = self.quant_conv(self.encoder(x))
        if not self.use_variational:
            moments = torch.cat((moments, torch.ones_like(moments)), 1)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
