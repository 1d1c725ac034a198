"""LazyMAR diffusion-head cache: reuse work across the denoising steps of one MAR step.

Within one MAR step the head denoises the same tokens under the same conditions for 100 steps, and its
internal features drift slowly. On a refresh head step the full head runs on both guidance halves and
stores, for the conditional half: the guidance residual of eps (``cond - uncond``), every residual
block's MLP output, and for ``residual_blocks`` the block's whole residual (``out - in``). On the other
head steps only the conditional half runs: ``residual_blocks`` add their stored residual; the other
blocks recompute their adaLN modulation for the new timestep and apply it to the stored MLP output
(``x + gate * mlp``), except during the first ``mlp_warmup`` of the steps where the MLP is recomputed;
the final layer always runs, and ``eps_uncond = eps_cond - residual``.

It plugs into :meth:`models.diffloss.DiffLoss.sample` as a model-function factory, so the diffusion
loop, and with it the random stream, is the plain one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lazymar.plan import ModelShape, StepPlan, head_fixed_macs, head_step_macs
from lazymar.schedules import head_mlp_recompute, is_head_refresh_step
from lazymar.technique import Technique
from models.diffloss import HeadStepCache


@dataclass(frozen=True)
class HeadCacheConfig:
    """Diffusion-head cache settings (defaults: the LazyMAR release at 100 head steps).

    Attributes:
        interval: refresh every ``interval * num_steps`` head steps (and at the first). Release: 7/100.
        mlp_warmup: fraction of head steps after the first during which cached steps still recompute
            the MLPs of the blocks not in ``residual_blocks``. Release: ``t > 90`` = 9/100.
        residual_blocks: 0-based residual blocks whose whole residual is reused on cached steps (no
            modulation, no MLP). Release: (1, 2, 3, 4); indices beyond the head depth are ignored.
        guidance: reuse the guidance residual of eps on cached steps (run the conditional half only).
            Without guidance (cfg 1) it has no effect.
    """

    interval: float = 0.07
    mlp_warmup: float = 0.09
    residual_blocks: tuple[int, ...] = (1, 2, 3, 4)
    guidance: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.interval <= 1.0:
            raise ValueError(f"interval must be in (0, 1], got {self.interval}")
        if not 0.0 <= self.mlp_warmup <= 1.0:
            raise ValueError(f"mlp_warmup must be in [0, 1], got {self.mlp_warmup}")
        if any(b < 0 for b in self.residual_blocks):
            raise ValueError(f"residual_blocks must be >= 0, got {self.residual_blocks}")


def head_cache_factory(config: HeadCacheConfig):
    """A ``model_fn_factory`` for :meth:`DiffLoss.sample` that applies the head cache."""

    def factory(head, cond: torch.Tensor, cfg: float, n: int, diffusion, guided: bool):
        net, C = head.net, head.in_channels
        T = diffusion.num_timesteps
        reuse_guidance = guided and config.guidance
        # Rows that run on cached steps: the conditional half when the guidance residual is reused.
        cached_rows = n if reuse_guidance else cond.shape[0]
        cache = HeadStepCache(net, cached_rows, config.residual_blocks, cond)
        eps_residual: list[torch.Tensor] = []  # cond - uncond eps of the last refresh step
        # Modulations as the steps need them: refresh steps for every row and block, cached steps for
        # their rows and the blocks that do not reuse their whole residual.
        steps = range(T - 1, -1, -1)
        refreshes = [i for i in steps if is_head_refresh_step(i, T, config.interval)]
        live = [j for j in range(len(net.res_blocks)) if j not in config.residual_blocks]
        full_mods = head.modulations(diffusion, cond, refreshes)
        cached_mods = head.modulations(diffusion, cond[:cached_rows], [i for i in steps if i not in refreshes], live)

        def refresh(x: torch.Tensor, mod):
            out = net.forward_modulated(torch.cat([x, x], dim=0) if guided else x, mod, cache, fill=True)
            if guided:
                eps_residual[:] = [out[:n, :C] - out[n:, :C]]
            return head.split_output(out, cfg, n, guided)

        def cached(x: torch.Tensor, mod, recompute_mlp: bool):
            x_in = x if cached_rows == n else torch.cat([x, x], dim=0)
            out = net.forward_modulated(x_in, mod, cache, reuse_mlp=not recompute_mlp)
            if not reuse_guidance:
                return head.split_output(out, cfg, n, guided)
            eps_cond = out[:, :C]
            eps_uncond = eps_cond - eps_residual[0]
            return eps_uncond + cfg * (eps_cond - eps_uncond), out[:, C:]

        def model_fn(x: torch.Tensor, i: int):
            if is_head_refresh_step(i, T, config.interval):
                return refresh(x, full_mods(i))
            return cached(x, cached_mods(i), head_mlp_recompute(i, T, config.mlp_warmup))

        return model_fn

    return factory


class HeadCache(Technique):
    """Runs every head call of every step through :func:`head_cache_factory`."""

    label = "LazyMAR's head cache"
    writes = frozenset({"head_model"})

    def __init__(self, model, config: HeadCacheConfig, accel=None) -> None:
        super().__init__(model)
        self.config = config
        self.factory = head_cache_factory(config)

    def head_model(self):
        return self.factory

    def head_macs(self, p: StepPlan, s: ModelShape, tokens: int, steps: int) -> int:
        """Refresh head steps run the full head on both halves; the others the conditional half (with
        ``guidance``), the final layer, and per block either the stored residual, or the modulation
        with the stored or (during ``mlp_warmup``) recomputed MLP."""
        W, C, cfg = s.head_width, s.token_dim, self.config
        rows = 2 * tokens if p.guided else tokens
        cached_rows = tokens if (p.guided and cfg.guidance) else rows
        live = sum(1 for j in range(s.head_depth) if j not in cfg.residual_blocks)
        macs = head_fixed_macs(s, rows, steps)
        for i in range(steps):
            if is_head_refresh_step(i, steps, cfg.interval):
                macs += head_step_macs(s, rows)
                continue
            mlp = 2 * W * W if head_mlp_recompute(i, steps, cfg.mlp_warmup) else 0
            macs += cached_rows * (C * W + 2 * W * W + W * 2 * C + live * (3 * W * W + mlp))
        return macs
