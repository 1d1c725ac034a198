"""MAR's per-token diffusion head ("Diffusion Loss"): an adaLN residual MLP plus its diffusion process.

Each token's continuous latent is sampled by a small MLP denoiser conditioned on the transformer's
output ``z`` for that token. Parameter names follow the released checkpoints
(``diffloss.net.time_embed.mlp.0``, ``res_blocks.i.adaLN_modulation.1``, ``final_layer.linear`` ...).

Sampling does the same arithmetic as upstream with the work that cannot change the result hoisted:
``cond_embed(z)`` is computed once per MAR step instead of once per diffusion step, and with guidance
only the conditional half of ``x`` is carried (upstream evolves an unconditional copy that it throws
away at the end; its random draws are still made so that the random stream matches). The adaLN
modulations (two thirds of the head's weights) depend on the timestep and the condition but not on
``x``, so :class:`Modulations` computes them for a window of diffusion steps in one matrix product:
with the few tokens of a MAR step, a per-step product streams those weights from memory for a handful
of rows, 100 times per MAR step; this is what bounds the head's speed on a CPU at small batches.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.diffusion import GaussianDiffusion, TrajectoryTrace
from models.schedules import guidance_on

TIMESTEP_FREQ_DIM = 256
TIMESTEP_MAX_PERIOD = 10000
# Memory for the adaLN modulations of one window of diffusion steps (see :class:`Modulations`): MAR-B's
# head at batch 1 with guidance fits its 100 steps in one window; large batches get shorter windows.
MODULATION_WINDOW_BYTES = 128 << 20


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (original, 0..999) timestep followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = TIMESTEP_FREQ_DIM) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = TIMESTEP_MAX_PERIOD) -> torch.Tensor:
        args = t[:, None].float() * _frequencies(dim // 2, max_period, t.device)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


@lru_cache(maxsize=64)
def _frequencies(half: int, max_period: int, device: torch.device) -> torch.Tensor:
    """The sinusoids' frequencies, computed on the CPU as upstream does and moved to ``device`` once per
    process (not a copy to the GPU per head call)."""
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(device)


class ResBlock(nn.Module):
    """Residual MLP block with adaLN: ``x + gate * mlp(modulate(ln(x), shift, scale))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels, bias=True),
            nn.SiLU(),
            nn.Linear(channels, channels, bias=True),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels, bias=True))

    def modulation(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(shift, scale, gate) from the embedded timestep + condition ``y``."""
        return self.adaLN_modulation(y).chunk(3, dim=-1)

    def branch(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The MLP output before gating."""
        return self.mlp(modulate(self.in_ln(x), shift, scale))

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The block given its modulation."""
        return x + gate * self.branch(x, shift, scale)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, *self.modulation(y))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map to ``out_channels`` (eps and variance values)."""

    def __init__(self, model_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels, bias=True))

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The layer given its modulation."""
        return self.linear(modulate(self.norm_final(x), shift, scale))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, *self.adaLN_modulation(y).chunk(2, dim=-1))


class SimpleMLPAdaLN(nn.Module):
    """The denoiser: ``final(blocks(input_proj(x), y))`` with ``y = time_embed(t) + cond_embed(c)``.

    Args:
        in_channels: token latent channels (16 for KL-16).
        model_channels: MLP width (``diffloss_w``).
        out_channels: ``2 * in_channels`` (eps and learned-range variance values).
        z_channels: width of the transformer condition.
        num_res_blocks: depth (``diffloss_d``).
        grad_checkpointing: trade compute for memory in training.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero.
        for block in self.res_blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def forward_embedded(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Denoiser output for noisy tokens ``x`` (n, C) given the embedded ``y`` (n or 1, W)."""
        x = self.input_proj(x)
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)

    def forward_modulated(self, x: torch.Tensor, mod: "StepModulation", cache: "HeadStepCache | None" = None, *,
                          fill: bool = False, reuse_mlp: bool = False) -> torch.Tensor:
        """Denoiser output for noisy tokens ``x`` (n, C) given one step's precomputed modulations: the
        same arithmetic as :meth:`forward_embedded` (sampling; see :class:`Modulations`). The one head
        step of every sampler (what ``MAR.compile_for_sampling`` compiles).

        Args:
            cache: what diffusion steps of one head call share (LazyMAR's head cache). With ``fill`` this
                step records into it; without, the blocks it holds a whole residual of add that residual
                (no modulation, no MLP), and with ``reuse_mlp`` the others gate its MLP outputs instead of
                recomputing them.
        """
        h = self.input_proj(x)
        for j, block in enumerate(self.res_blocks):
            if cache is not None and not fill and j in cache.residual_blocks:
                h = h + cache.residual[j]
                continue
            shift, scale, gate = mod.blocks[j]
            m = cache.mlp[j] if reuse_mlp else block.branch(h, shift, scale)
            h_next = h + gate * m
            if fill:
                cache.mlp[j].copy_(m.narrow(0, 0, cache.rows))
                if j in cache.residual_blocks:
                    cache.residual[j].copy_((h_next - h).narrow(0, 0, cache.rows))
            h = h_next
        return self.final_layer.modulated(h, *mod.final)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Upstream signature: noisy tokens (n, C), original timesteps (n,), conditions (n, D)."""
        return self.forward_embedded(x, self.time_embed(t) + self.cond_embed(c))


@dataclass
class StepModulation:
    """The adaLN outputs of one diffusion step: ``(shift, scale, gate)`` per residual block (None for a
    block the caller skips) and ``(shift, scale)`` of the final layer, each (rows, W)."""

    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]
    final: tuple[torch.Tensor, torch.Tensor]


class HeadStepCache:
    """What the diffusion steps of one head call share, filled by one step and read by the later ones
    (:meth:`SimpleMLPAdaLN.forward_modulated`; LazyMAR's head cache decides when, ``lazymar.head_cache``).

    Its tensors are allocated here, before the first (possibly compiled) step: a step writes into them
    rather than keeping its own outputs, which under CUDA graphs belong to the graph and are overwritten
    by its next replay.

    Args:
        net: the denoiser.
        rows: how many rows (the first ones) are recorded: the rows the reading steps run.
        residual_blocks: blocks whose whole residual ``out - in`` is recorded and reused as is.
        like: a tensor of the head's features ((rows', W), e.g. the embedded conditions) for the dtype
            and device.

    Attributes:
        mlp: (depth, rows, W) per block, its MLP output before gating.
        residual: (depth, rows, W) per ``residual_blocks`` block, its residual (the others' rows unused).
    """

    def __init__(self, net: SimpleMLPAdaLN, rows: int, residual_blocks: Collection[int],
                 like: torch.Tensor) -> None:
        self.rows = rows
        self.residual_blocks = tuple(j for j in range(net.num_res_blocks) if j in residual_blocks)
        shape = (net.num_res_blocks, rows, net.model_channels)
        self.mlp = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.residual = torch.zeros(shape, dtype=like.dtype, device=like.device)


class Modulations:
    """adaLN modulations of one head call's diffusion steps, computed a window of steps at a time.

    A modulation is ``Linear(SiLU(time_embed(t) + cond))``: it does not depend on the noisy tokens, so
    the steps of a window share one matrix product over (steps x rows) inputs. Same multiply-adds as
    step by step (each step's timestep embedding and modulations are computed once), but the weights are
    read once per window instead of once per step. Windows hold at most ``budget_bytes``.

    Args:
        net: the denoiser.
        timesteps: original timestep of each respaced step index (``GaussianDiffusion.timestep_map``).
        cond: (rows, W) embedded conditions (``cond_embed(z)``).
        steps: the step indices that will be asked for, in the order the loop visits them.
        blocks: residual blocks whose modulation is needed (None: all); the final layer's always is.
        budget_bytes: memory for one window.
    """

    def __init__(self, net: SimpleMLPAdaLN, timesteps: Sequence[int], cond: torch.Tensor, steps: Sequence[int],
                 blocks: Collection[int] | None = None, budget_bytes: int = MODULATION_WINDOW_BYTES) -> None:
        self.net, self.cond, self.timesteps = net, cond, timesteps
        self.order = list(steps)
        self.order_timesteps = tuple(timesteps[i] for i in self.order)  # original timestep of each, in order
        self.where = {i: k for k, i in enumerate(self.order)}
        self.blocks = [j for j in range(len(net.res_blocks)) if blocks is None or j in blocks]
        per_step = cond.shape[0] * net.model_channels * (3 * len(self.blocks) + 2) * cond.element_size()
        self.window = max(1, budget_bytes // max(1, per_step))  # a call may have no tokens
        self.start = -1
        self.mods: list[StepModulation] = []

    def __call__(self, i: int) -> StepModulation:
        k = self.where[i]
        if not self.start <= k < self.start + len(self.mods):
            self._compute(k)
        return self.mods[k - self.start]

    def _compute(self, k: int) -> None:
        net, steps = self.net, self.order[k:k + self.window]
        t = _timesteps_on(self.order_timesteps, self.cond.device)[k:k + self.window]
        y = F.silu(net.time_embed(t)[:, None, :] + self.cond[None])  # (S, rows, W)
        per_block: list[tuple[torch.Tensor, ...] | None] = [None] * len(net.res_blocks)
        for j in self.blocks:
            per_block[j] = net.res_blocks[j].adaLN_modulation[1](y).chunk(3, dim=-1)
        final = net.final_layer.adaLN_modulation[1](y).chunk(2, dim=-1)
        self.mods = [StepModulation([None if m is None else (m[0][s], m[1][s], m[2][s]) for m in per_block],
                                    (final[0][s], final[1][s])) for s in range(len(steps))]
        self.start = k


@lru_cache(maxsize=1024)
def _timesteps_on(timesteps: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``timesteps`` as a tensor on ``device``, made once per process: a tensor built from Python data
    for every head call would be a blocking copy to the GPU at every MAR step."""
    return torch.tensor(timesteps, device=device)


@lru_cache(maxsize=256)
def respaced_diffusion(num_sampling_steps: int | str, noise_schedule: str = "cosine",
                       max_timestep: int | None = None) -> GaussianDiffusion:
    """The sampling process for a step count; cached because schedules are rebuilt from float64 math."""
    return GaussianDiffusion(num_sampling_steps, noise_schedule=noise_schedule, max_timestep=max_timestep)


class DiffLoss(nn.Module):
    """Diffusion loss (training) and per-token sampler (inference) on top of :class:`SimpleMLPAdaLN`.

    Args:
        target_channels: token latent channels.
        z_channels: width of the transformer condition.
        depth: number of residual blocks.
        width: MLP width.
        num_sampling_steps: respaced sampling steps (``'100'`` or ``100``).
        grad_checkpointing: checkpoint the residual blocks in training.
        noise_schedule: ``"cosine"`` (upstream, the released models) or ``"linear"`` (our demo model).
    """

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: int | str, grad_checkpointing: bool = False,
                 noise_schedule: str = "cosine") -> None:
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(in_channels=target_channels, model_channels=width,
                                  out_channels=target_channels * 2, z_channels=z_channels,
                                  num_res_blocks=depth, grad_checkpointing=grad_checkpointing)
        self.noise_schedule = noise_schedule
        self.train_diffusion = GaussianDiffusion(None, noise_schedule=noise_schedule)
        self.set_sampling_steps(num_sampling_steps)
        # Training-only knob, off by default (= the upstream objective, same random draws). The first
        # sampling step (t = 999 of the cosine schedule) multiplies the head's eps error by ~316, so a
        # short training run must predict eps there far more precisely than uniform t (0.1% of the
        # tokens at t = 999) teaches it; this fraction of the tokens instead draws t from the last
        # ``high_t_window`` steps. Our demo model trains with it (see demo/TRAINING.md).
        self.high_t_fraction = 0.0
        self.high_t_window = 10

    def set_sampling_steps(self, num_sampling_steps: int | str) -> None:
        """Sample with this many respaced diffusion steps from now on (the weights do not depend on it)."""
        self.num_sampling_steps = int(num_sampling_steps)
        self.gen_diffusion = respaced_diffusion(self.num_sampling_steps, self.noise_schedule)

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean diffusion loss of tokens ``target`` (n, C) under conditions ``z`` (n, D), over ``mask``."""
        T = self.train_diffusion.num_timesteps
        t = torch.randint(0, T, (target.shape[0],), device=target.device)
        if self.high_t_fraction > 0:
            high = torch.rand(t.shape, device=t.device) < self.high_t_fraction
            t = torch.where(high, torch.randint(T - self.high_t_window, T, t.shape, device=t.device), t)
        loss = self.train_diffusion.training_losses(self.net, target, t, c=z)
        if mask is not None:
            loss = (loss * mask).sum() / mask.sum()
        return loss.mean()

    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0, *, guided: bool | None = None,
               generator: torch.Generator | None = None, num_steps: int | None = None,
               max_timestep: int | None = None, model_fn_factory=None, noise: torch.Tensor | None = None,
               step_noise: torch.Tensor | None = None, trace: TrajectoryTrace | None = None) -> torch.Tensor:
        """Sample one latent per condition.

        Args:
            z: conditions (n, D), or (2n, D) with guidance: conditional half first.
            temperature: scale of the injected noise.
            cfg: guidance scale of this call.
            guided: whether ``z`` has the unconditional half, as the sampler decided for the whole run
                (``None``: ``guidance_on(cfg)``, upstream's rule for a lone call).
            generator: source of every random draw; ``None`` uses the global generators exactly as
                upstream (initial noise on the CPU generator, step noise on the device's).
            num_steps: respaced diffusion steps; ``None`` uses ``num_sampling_steps``.
            max_timestep: clamp the respaced timesteps to at most this one (see
                :class:`~models.diffusion.GaussianDiffusion`); ``None`` does not clamp.
            model_fn_factory: ``(head, cond, cfg, n, diffusion, guided) -> model_fn`` replacing :meth:`guided_model_fn`
                (the diffusion-head cache plugs in here; the loop stays the same).
            noise: (n, C) starting noise to use instead of drawing it.
            step_noise: (n, S, C) noise to inject at respaced step ``i`` (``step_noise[:, i]``, S = the
                process's step count) instead of drawing it each step. With ``noise``, nothing is drawn:
                speculative decoding gives draft and target the same trajectory noise this way.
            trace: records the trajectory's statistics (:class:`~models.diffusion.TrajectoryTrace`).

        Returns:
            (n, C) sampled latents of the conditional half.
        """
        guided = guidance_on(cfg) if guided is None else guided
        n = z.shape[0] // 2 if guided else z.shape[0]
        diffusion = self.sampling_diffusion(num_steps, max_timestep)
        if noise is None:
            noise = _randn((n, self.in_channels), generator, z.device, initial=True)
        # Each step draws noise for the whole (doubled) batch, as upstream does; only our half is used.
        draw_rows = 2 * n if guided else n
        if step_noise is not None and step_noise.shape != (n, diffusion.num_timesteps, self.in_channels):
            raise ValueError(f"step_noise must have shape ({n}, {diffusion.num_timesteps}, {self.in_channels}) "
                             f"(tokens, diffusion steps, channels), got {tuple(step_noise.shape)}")

        def noise_fn(shape: tuple[int, ...], i: int) -> torch.Tensor:
            if step_noise is not None:
                return step_noise[:, i]
            return _randn((draw_rows, *shape[1:]), generator, z.device)[: shape[0]]

        cond = self.net.cond_embed(z)  # (n or 2n, W): independent of the diffusion step
        factory = model_fn_factory or DiffLoss.guided_model_fn
        model_fn = factory(self, cond, cfg, n, diffusion, guided)
        return diffusion.p_sample_loop(model_fn, noise, noise_fn=noise_fn, temperature=temperature, trace=trace)

    def sampling_diffusion(self, num_steps: int | None = None, max_timestep: int | None = None) -> GaussianDiffusion:
        """The respaced process :meth:`sample` runs for these settings (``None``: the model's own)."""
        if num_steps is None and max_timestep is None:
            return self.gen_diffusion
        steps = self.num_sampling_steps if num_steps is None else int(num_steps)
        return respaced_diffusion(steps, self.noise_schedule, max_timestep)

    def modulations(self, diffusion: GaussianDiffusion, cond: torch.Tensor, steps: Sequence[int] | None = None,
                    blocks: Collection[int] | None = None) -> Modulations:
        """The :class:`Modulations` of ``steps`` (None: every step, in the loop's order t = T-1 .. 0)."""
        if steps is None:
            steps = range(diffusion.num_timesteps - 1, -1, -1)
        return Modulations(self.net, diffusion.timestep_map, cond, steps, blocks)

    def split_output(self, out: torch.Tensor, cfg: float, n: int, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output -> (eps, variance values) of the conditional half, guidance applied."""
        C = self.in_channels
        eps, var_values = out[:, :C], out[:, C:]
        if guided:
            cond_eps, uncond_eps = eps[:n], eps[n:]
            eps = uncond_eps + cfg * (cond_eps - uncond_eps)
        return eps, var_values[:n]

    @staticmethod
    def guided_model_fn(head: "DiffLoss", cond: torch.Tensor, cfg: float, n: int, diffusion: GaussianDiffusion,
                        guided: bool):
        """Plain model function: both guidance halves every step (one without guidance)."""
        mods = head.modulations(diffusion, cond)

        def model_fn(x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            x_in = torch.cat([x, x], dim=0) if guided else x
            return head.split_output(head.net.forward_modulated(x_in, mods(i)), cfg, n, guided)

        return model_fn


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
           initial: bool = False) -> torch.Tensor:
    """Standard normal draw from ``generator`` or, when ``None``, from the global generator upstream uses.

    Upstream draws the initial noise on the CPU and moves it; step noise is drawn on the device.
    """
    if generator is not None:
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    if initial:
        return torch.randn(shape).to(device)
    return torch.randn(shape, device=device)
