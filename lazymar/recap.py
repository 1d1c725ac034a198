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
and lays out its own schedule and orders, as GtR does: those combinations are rejected. The condition
cache composes (a cheap step reuses its full step's context, ``Schedule.reuses``, so it runs the rows
that step ran and rebuilds the unconditional half from the residual at the group's positions), and so
does the head cache. DiSA and ReCAP both set head step counts; that combination is rejected rather
than given an arbitrary rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.indexing import gather_tokens, positions
from models.runner import CachedAttention, KVCache
from lazymar.plan import ModelShape, Schedule, StepPlan, block_macs, decoder_embed_macs, encoder_macs
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
        encoder / decoder: every block's keys/values, position-indexed over buffer + sequence.
        keep: (R, buffer + known) the positions the full step's encoder ran (its known tokens).
        outside: (R, N - n) the buffer and every position outside the group, ascending.
        group: (B, n) ascending image positions of the group's tokens.
    """

    encoder: KVCache
    decoder: KVCache
    keep: torch.Tensor | None = None
    outside: torch.Tensor | None = None
    group: torch.Tensor | None = None

    @classmethod
    def of(cls, model) -> "ReCAPContext":
        N = model.buffer_size + model.seq_len
        return cls(KVCache(N), KVCache(N))


class ReCAP(Technique):
    """ReCAP as a step technique: its schedule and orders, full steps that keep keys/values, cheap steps."""

    label = "ReCAP"
    writes = frozenset({"schedule", "encoder", "decoder", "transformer", "head_steps"})

    def __init__(self, model, config: ReCAPConfig, accel=None) -> None:
        super().__init__(model)
        self.config = config
        self.groups: list[tuple[int, int]] = []
        self.group_of: dict[int, tuple[int, int]] = {}  # step -> its group
        self.group_end: dict[int, int] = {}  # first step -> tokens left masked after the group
        self.known_at_start: dict[int, int] = {}  # first step -> tokens known at its full step
        self.orders: torch.Tensor | None = None
        self.context = ReCAPContext.of(model)

    def schedule(self, sched: Schedule) -> Schedule:
        self.groups = recap_groups(sched.num_steps, self.config)
        for start, size in self.groups:
            end = start + size - 1
            self.group_end[start] = 0 if end == sched.num_steps - 1 else sched.mask_lens[end]
            for step in range(start, start + size):
                self.group_of[step] = (start, size)
        # A cheap step runs over its group's full step's context; the release reads the last step's
        # guidance at 0 masked tokens.
        reuses = tuple(None if self.group_of[s][0] == s else self.group_of[s][0] for s in range(sched.num_steps))
        return Schedule(sched.num_iter, sched.mask_lens, sched.guidance_lens[:-1] + (0,), reuses)

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

    def plan_transformer(self, p: StepPlan) -> dict:
        start, size = self.group_of[p.step]
        if size == 1:
            return {}
        if p.reuses is None:  # the full step: plain, keeping keys/values
            self.known_at_start[start] = p.n_known
            return {"encoder": self, "decoder": self}
        return {"transformer": self}

    def plan_head_steps(self, p: StepPlan) -> dict:
        if p.reuses is None:
            return {}
        return {"head_steps": self.config.fast_steps(self.model.diffloss.num_sampling_steps)}

    # ------------------------------------------------------------------------------ full step
    def run_encoder(self, p: StepPlan, inp: StepInputs) -> torch.Tensor:
        model = self.model
        self.context = ctx = ReCAPContext.of(model)  # the rows may differ from the last group's
        ctx.keep = inp.keep
        x = gather_tokens(model.encoder_input(inp.tokens, inp.class_embedding), inp.keep)  # (R, buf + known, D)
        x = model.run_blocks(model.encoder_blocks, x, CachedAttention(ctx.encoder, inp.keep, write_only=True))
        return model.encoder_norm(x)

    def run_decoder(self, p: StepPlan, inp: StepInputs, x: torch.Tensor) -> torch.Tensor:
        model, ctx = self.model, self.context
        B = self.orders.shape[0]
        end = self.group_end[p.step]
        group = (inp.mask[:B] > 0) & ~model.mask_by_order(end, self.orders)
        n_group = model.seq_len - p.n_known - end
        ctx.group = positions(group, n_group)  # (B, n)
        outside = positions(~model.with_buffer(group), x.shape[1] - n_group)
        ctx.outside = outside.repeat(x.shape[0] // B, 1)  # (R, N - n)
        return model.run_blocks(model.decoder_blocks, x, CachedAttention(ctx.decoder))

    # ------------------------------------------------------------------------------ cheap step
    def run_transformer(self, p: StepPlan, inp: StepInputs) -> Hidden:
        """The group's tokens over the cached context: (R, n, D) at the group's positions."""
        model, ctx = self.model, self.context
        R, buf = inp.tokens.shape[0], model.buffer_size
        group = buf + ctx.group.repeat(R // ctx.group.shape[0], 1)  # (R, n) positions in buffer + sequence
        # Tokens sampled earlier in the group: its first slots, since it goes in ascending position order.
        n_local = p.n_known - self.known_at_start[self.group_of[p.step][0]]
        local = group[:, :n_local]
        x = model.encoder_input(inp.tokens, inp.class_embedding, local)  # (R, n_local, D)
        # Each block: the context's keys/values first, then the group's own.
        keys = torch.cat([ctx.keep, local], dim=1)
        x = model.run_blocks(model.encoder_blocks, x, CachedAttention(ctx.encoder, local, keys))
        filled = torch.arange(n_local, device=x.device).expand(R, -1)
        y = model.decoder_input(model.encoder_norm(x), filled, group)  # (R, n, Dd)
        keys = torch.cat([ctx.outside, group], dim=1)
        y = model.run_blocks(model.decoder_blocks, y, CachedAttention(ctx.decoder, group, keys))
        return Hidden(y, group)

    def transformer_macs(self, p: StepPlan, s: ModelShape, rows: int) -> dict[str, int]:
        start, _ = self.group_of[p.step]
        known = self.known_at_start[start]
        n_local = p.n_known - known
        n_group = s.seq_len - known - self.group_end[start]
        enc = encoder_macs(s, n_local, n_local, s.buffer + known + n_local)
        dec = decoder_embed_macs(s, n_local) + s.dec_depth * block_macs(s.dec_dim, s.dec_hidden, n_group, s.positions)
        return {"encoder": rows * enc, "decoder": rows * dec}
