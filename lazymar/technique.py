"""The hooks an acceleration technique can implement, and the plain MAR step that owns what none claims.

A technique is one object per ``sample_tokens`` call (its cache state lives in it, so nothing leaks
between calls). :class:`lazymar.policy.AccelSteps` asks every technique, in a fixed order, at each
point of a step; each hook's default does nothing, so a technique implements only what it changes:

- ``schedule`` / ``arrange_orders``: the step layout and the generation orders (GtR, ReCAP).
- ``plan``: write this step's decisions into the :class:`~lazymar.plan.StepPlan`: which guidance halves
  run, claim the encoder, the decoder or the whole transformer, set the head calls' step counts.
- ``run_encoder`` / ``run_decoder`` / ``run_transformer``: called on the technique the plan names.
- ``complete``: every technique sees the last decoder block's output (the condition cache rebuilds the
  unconditional half here).
- ``split_head``: which predicted tokens go to which head call, when a step has several.
- ``wrap_head``: wrap the head's model-function factory (the head cache).
- ``*_macs``: the multiply-adds of the parts the technique claimed, for the step it planned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lazymar.plan import (ModelShape, Schedule, StepPlan, block_macs, decoder_embed_macs, encoder_macs,
                          head_fixed_macs, head_step_macs)


@dataclass
class StepInputs:
    """What a step's transformer runs on: the rows that run (``R = halves * B``).

    Attributes:
        tokens: (R, L, C) current tokens; mask: (R, L) float, 1 = unknown; to_pred: (R, L) bool.
        class_embedding: (R, D); prev_pred: (B, L) bool, the tokens predicted at the previous step
            (None at the first step).
        keep: (R, buffer + known) ascending positions of the buffer and the known tokens
            (``MAR.known_positions``, from the plan's count: no host synchronisation).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    to_pred: torch.Tensor
    class_embedding: torch.Tensor
    prev_pred: torch.Tensor | None
    keep: torch.Tensor

    def prev_rows(self) -> torch.Tensor:
        """``prev_pred`` repeated over the guidance halves that run: (R, L) bool."""
        return self.prev_pred.repeat(self.tokens.shape[0] // self.prev_pred.shape[0], 1)


@dataclass
class Hidden:
    """The last decoder block's output (R, n, D) at ``positions`` (R, n) of buffer + sequence, or at
    every position (n = buffer + L) when ``positions`` is None."""

    x: torch.Tensor
    positions: torch.Tensor | None = None


class Technique:
    """Base class: every hook is a no-op, every claimed part is priced as plain MAR."""

    def __init__(self, model) -> None:
        self.model = model

    # ------------------------------------------------------------------------------ planning
    def schedule(self, sched: Schedule) -> Schedule:
        return sched

    def arrange_orders(self, orders: torch.Tensor) -> torch.Tensor:
        return orders

    def plan(self, p: StepPlan) -> None:
        pass

    # ------------------------------------------------------------------------------ execution
    def run_encoder(self, p: StepPlan, inp: StepInputs) -> torch.Tensor:
        return self.model.forward_mae_encoder(inp.tokens, inp.mask, inp.class_embedding, inp.keep)

    def run_decoder(self, p: StepPlan, inp: StepInputs, x: torch.Tensor) -> torch.Tensor:
        return self.model.run_blocks(self.model.decoder_blocks, x)

    def run_transformer(self, p: StepPlan, inp: StepInputs) -> Hidden:
        raise NotImplementedError(f"{type(self).__name__} does not run the whole transformer")

    def complete(self, p: StepPlan, out: Hidden) -> Hidden:
        return out

    def split_head(self, p: StepPlan, z: torch.Tensor, cfg: float, bsz: int) -> list[torch.Tensor] | None:
        """(n,) bool per head call of ``p.head``, or None when a step has one call (all tokens)."""
        return None

    def wrap_head(self, factory):
        return factory

    # ------------------------------------------------------------------------------ multiply-adds
    def encoder_macs(self, p: StepPlan, s: ModelShape, rows: int) -> int:
        """Plain encoder: ``z_proj`` over every token, blocks over the buffer and the known tokens."""
        n = s.buffer + p.n_known
        return rows * encoder_macs(s, s.seq_len, n, n)

    def decoder_macs(self, p: StepPlan, s: ModelShape, rows: int) -> int:
        """``decoder_embed`` of the encoder outputs plus every decoder block over all positions."""
        N = s.positions
        return rows * (decoder_embed_macs(s, s.buffer + p.n_known)
                       + s.dec_depth * block_macs(s.dec_dim, s.dec_hidden, N, N))

    def transformer_macs(self, p: StepPlan, s: ModelShape, rows: int) -> dict[str, int]:
        raise NotImplementedError

    def head_macs(self, p: StepPlan, s: ModelShape, tokens: int, steps: int) -> int:
        """A head call on ``tokens`` conditions (all images) with ``steps`` diffusion steps."""
        rows = 2 * tokens if p.guided else tokens
        return head_fixed_macs(s, rows, steps) + steps * head_step_macs(s, rows)


class PlainMAR(Technique):
    """Owns every part of a step no technique claims: exactly plain MAR."""
