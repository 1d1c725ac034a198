"""ReCAP, reused context-aware prediction (arXiv 2505.19089): cheap MAR steps that run only the tokens
being predicted, against the cached keys/values of everything else.

When few tokens change between steps, the features of the context (every other position) barely
move. ReCAP groups the steps: a **full** step runs the whole transformer and keeps every block's keys
and values; the next ``cheap_steps`` steps of its group run only the group's tokens (those predicted
anywhere in the group: the ones sampled so far as known tokens, the rest as mask tokens) through the
encoder and the decoder, attending to the full step's cached keys/values of the buffer and of every
position outside the group. The first ``full_fraction`` of the steps are plain full steps. Cheap
steps also sample with fewer head steps (``fast_ratio`` of the model's).

As released (the vectors hold us to it): steps keep MAR's cosine schedule; within a group the tokens
are predicted in ascending position order, not in the generation order (here: the orders are
rearranged so that MAR's own masking yields that); the last step's guidance scale is read at
0 tokens masked (MAR reads it at 1); the buffer's keys/values are cached too (``cache_buffer``).

Composition: ReCAP chooses what the transformer recomputes, as LazyMAR's token cache and MARche do,
and arranges its own orders, as GtR does: those combinations are rejected. The condition cache
composes (a cheap step runs the rows its full step ran, and rebuilds the unconditional half from the
residual at the group's positions), and so does the head cache. DiSA and ReCAP both set head step
counts; that combination is rejected rather than given an arbitrary rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lazymar.indexing import gather_heads, gather_tokens, positions
from lazymar.plan import HeadCall, ModelShape, Schedule, StepPlan, block_macs, decoder_embed_macs, encoder_macs
from lazymar.schedules import scaled_count
from lazymar.technique import Hidden, StepInputs, Technique


@dataclass(frozen=True)
class ReCAPConfig:
    """ReCAP settings (defaults: the release's scripts, ``pre_full_iters = num_iter / 2``,
    ``num_cache_iters = 1``, with the fast head at half the steps as the release effectively runs).

    Attributes:
        full_fraction: fraction of the steps at the start that are plain full steps (rounded half up).
        pre_full_iters: the same as an absolute step count (the release's argument); overrides
            ``full_fraction`` when set.
        cheap_steps: cheap steps after each full step once the plain ones are done (``num_cache_iters``).
        fast_ratio: head steps of the cheap steps as a fraction of the model's ``num_sampling_steps``
            (truncated, at least 1). The release asks for 0.4 in its scripts but always runs 0.5.
    """

    full_fraction: float = 0.5
    pre_full_iters: int | None = None
    cheap_steps: int = 1
    fast_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.full_fraction <= 1.0:
            raise ValueError(f"full_fraction must be in [0, 1], got {self.full_fraction}")
        if self.pre_full_iters is not None and self.pre_full_iters < 0:
            raise ValueError(f"pre_full_iters must be None or >= 0, got {self.pre_full_iters}")
        if self.cheap_steps < 0:
            raise ValueError(f"cheap_steps must be >= 0, got {self.cheap_steps}")
        if not 0.0 < self.fast_ratio <= 1.0:
            raise ValueError(f"fast_ratio must be in (0, 1], got {self.fast_ratio}")

    def plain_steps(self, num_iter: int) -> int:
        if self.pre_full_iters is not None:
            return self.pre_full_iters
        return scaled_count(self.full_fraction, num_iter)

    def fast_steps(self, num_sampling_steps: int) -> int:
        return max(1, int(num_sampling_steps * self.fast_ratio))


def recap_groups(num_iter: int, config: ReCAPConfig) -> list[tuple[int, int]]:
    """``[(first step, size), ...]``: single full steps up to ``plain_steps``, then groups of one full
    and ``cheap_steps`` cheap steps, the last one cut at ``num_iter``."""
    groups, step, plain = [], 0, config.plain_steps(num_iter)
    while step < num_iter:
        size = min(1 + (config.cheap_steps if step >= plain else 0), num_iter - step)
        groups.append((step, size))
        step += size
    return groups


@dataclass
class ReCAPContext:
    """What a full step leaves for its group's cheap steps (rows: those the full step ran).

    Attributes:
        enc_k / enc_v: per encoder block, keys/values (R, H, buffer + known, d) in position order.
        dec_k / dec_v: per decoder block, keys/values (R, H, N - n, d) of the buffer and every position
            outside the group, in position order.
        group: (B, n) ascending image positions of the group's tokens.
    """

    enc_k: list[torch.Tensor] = field(default_factory=list)
    enc_v: list[torch.Tensor] = field(default_factory=list)
    dec_k: list[torch.Tensor] = field(default_factory=list)
    dec_v: list[torch.Tensor] = field(default_factory=list)
    group: torch.Tensor | None = None


class ReCAP(Technique):
    """ReCAP as a step technique: its schedule and orders, full steps that keep keys/values, cheap steps."""

    def __init__(self, model, config: ReCAPConfig) -> None:
        super().__init__(model)
        self.config = config
        self.groups: list[tuple[int, int]] = []
        self.group_of: dict[int, tuple[int, int]] = {}  # step -> its group
        self.group_end: dict[int, int] = {}  # first step -> tokens left masked after the group
        self.halves: dict[int, int] = {}  # first step -> rows its full step runs
        self.known_at_start: dict[int, int] = {}  # first step -> tokens known at its full step
        self.orders: torch.Tensor | None = None
        self.context = ReCAPContext()

    def schedule(self, sched: Schedule) -> Schedule:
        self.groups = recap_groups(sched.num_steps, self.config)
        for start, size in self.groups:
            end = start + size - 1
            self.group_end[start] = 0 if end == sched.num_steps - 1 else sched.mask_lens[end]
            for step in range(start, start + size):
                self.group_of[step] = (start, size)
        # The release reads the last step's guidance at 0 masked tokens.
        return Schedule(sched.num_iter, sched.mask_lens, sched.guidance_lens[:-1] + (0,))

    def arrange_orders(self, orders: torch.Tensor) -> torch.Tensor:
        """Within each group, the smallest positions are generated first: MAR generates an order from its
        end, so each group's segment of the order is sorted descending."""
        seq_len = orders.shape[1]
        arranged = orders.clone()
        masked = seq_len
        for start, size in self.groups:
            end = self.group_end[start]
            arranged[:, end:masked] = orders[:, end:masked].sort(dim=1, descending=True).values
            masked = end
        self.orders = arranged
        return arranged

    def plan(self, p: StepPlan) -> None:
        start, size = self.group_of[p.step]
        if size == 1:
            return
        if p.step == start:  # the full step: plain, keeping keys/values
            self.halves[start] = p.halves
            self.known_at_start[start] = p.n_known
            p.encoder = p.decoder = self
            return
        p.transformer = self
        p.halves = self.halves[start]
        p.uncond_refresh = False
        fast = self.config.fast_steps(self.model.diffloss.num_sampling_steps)
        p.head = [HeadCall(p.n_pred, fast)]

    # ------------------------------------------------------------------------------ full step
    def run_encoder(self, p: StepPlan, inp: StepInputs) -> torch.Tensor:
        model, ctx = self.model, self.context
        x = model.encoder_input(inp.tokens, inp.class_embedding)
        x = gather_tokens(x, inp.keep)  # (R, buf + known, D)
        ctx.enc_k.clear()
        ctx.enc_v.clear()
        for block in model.encoder_blocks:
            q, k, v = block.qkv(x)
            ctx.enc_k.append(k)
            ctx.enc_v.append(v)
            x = block.finish(x, block.attn.attend(q, k, v))
        return model.encoder_norm(x)

    def run_decoder(self, p: StepPlan, inp: StepInputs, x: torch.Tensor) -> torch.Tensor:
        model, ctx = self.model, self.context
        B = self.orders.shape[0]
        masked = inp.mask[:B] > 0
        group = masked & ~model.mask_by_order(self.group_end[p.step], self.orders)
        ctx.group = positions(group)  # (B, n)
        outside = positions(~model.with_buffer(group)).repeat(x.shape[0] // B, 1)  # (R, N - n)
        ctx.dec_k.clear()
        ctx.dec_v.clear()
        for block in model.decoder_blocks:
            q, k, v = block.qkv(x)
            ctx.dec_k.append(gather_heads(k, outside))
            ctx.dec_v.append(gather_heads(v, outside))
            x = block.finish(x, block.attn.attend(q, k, v))
        return x

    # ------------------------------------------------------------------------------ cheap step
    def run_transformer(self, p: StepPlan, inp: StepInputs) -> Hidden:
        """The group's tokens over the cached context: (R, n, D) at the group's positions."""
        model, ctx = self.model, self.context
        R, buf = inp.tokens.shape[0], model.buffer_size
        group = ctx.group.repeat(R // ctx.group.shape[0], 1)  # (R, n)
        # Tokens sampled earlier in the group: its first slots, since it goes in ascending position order.
        n_local = p.n_known - self.known_at_start[self.group_of[p.step][0]]
        local = group[:, :n_local]
        x = model.z_proj(gather_tokens(inp.tokens, local))
        x = model.z_proj_ln(x + model.encoder_pos_embed_learned[0, buf + local])
        for layer, block in enumerate(model.encoder_blocks):
            q, k, v = block.qkv(x)
            k = torch.cat([ctx.enc_k[layer], k], dim=2)
            v = torch.cat([ctx.enc_v[layer], v], dim=2)
            x = block.finish(x, block.attn.attend(q, k, v))
        x = model.decoder_embed(model.encoder_norm(x))
        y = model.mask_token.to(x.dtype).expand(R, group.shape[1], -1).clone()
        y[:, :n_local] = x
        y = y + model.decoder_pos_embed_learned[0, buf + group]
        for layer, block in enumerate(model.decoder_blocks):
            q, k, v = block.qkv(y)
            k = torch.cat([ctx.dec_k[layer], k], dim=2)
            v = torch.cat([ctx.dec_v[layer], v], dim=2)
            y = block.finish(y, block.attn.attend(q, k, v))
        return Hidden(y, buf + group)

    def transformer_macs(self, p: StepPlan, s: ModelShape, rows: int) -> dict[str, int]:
        start, _ = self.group_of[p.step]
        known = self.known_at_start[start]
        n_local = p.n_known - known
        n_group = s.seq_len - known - self.group_end[start]
        enc = encoder_macs(s, n_local, n_local, s.buffer + known + n_local)
        dec = decoder_embed_macs(s, n_local) + s.dec_depth * block_macs(s.dec_dim, s.dec_hidden, n_group, s.positions)
        return {"encoder": rows * enc, "decoder": rows * dec}
