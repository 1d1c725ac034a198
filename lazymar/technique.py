"""The hooks an acceleration technique can implement, and the plain MAR step that owns what none claims.

A technique is one object per ``sample_tokens`` call (its cache state lives in it, so nothing leaks
between calls). :class:`lazymar.steps.AccelSteps` plans a generation in phases and asks every technique
in each; a hook's default decides nothing, so a technique implements only what it changes:

- once per generation: ``schedule`` (the step layout, with ``arrange_orders`` for the orders it
  follows: GtR, ReCAP) and ``head_model`` (the head's model function: the head cache);
- per step, in the phases of :data:`lazymar.plan.STEP_PHASES`, in this order: ``plan_guidance``
  (whether the step is guided: interval guidance), ``plan_rows`` (which guidance halves run), ``plan_transformer`` (who runs the encoder, the decoder or the whole
  transformer), ``plan_head_calls`` (how the predicted tokens split among head calls) and
  ``plan_head_steps`` (their diffusion step counts). Each returns the fields it decides; a later
  phase reads what an earlier one decided.

Every field has one owner: a technique declares the fields it may decide (``writes``), and two enabled
techniques that would decide the same one are rejected, at config time (:func:`check_composition`) and
again at plan time, with both named, unless one of them declares that it yields that field to the
other (``defers``: GtR's stage-aware head step counts yield to DiSA's annealing).

Execution hooks: ``run_encoder`` / ``run_decoder`` / ``run_transformer`` on the technique the plan
names; ``complete`` sees the last decoder block's output (the condition cache rebuilds the unconditional
half); ``split_head`` gives the rows of each head call, on the technique that planned several. Pricing:
``*_macs``, the multiply-adds of the parts a technique claimed, for the step it planned.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lazymar.plan import (FIELD_MEANING, ModelShape, Schedule, StepPlan, block_macs, decoder_embed_macs,
                          encoder_macs, head_fixed_macs, head_step_macs)


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


# The plan fields that change which random numbers a generation draws, or in which order: the step
# schedule and orders (GtR, ReCAP), how the predicted tokens split among head calls (GtR's stages),
# the head's step counts (DiSA, GtR, ReCAP: each diffusion step draws noise) and whether a step is guided
# (interval guidance: a guided head step draws noise for both halves). A technique that decides none
# of them draws exactly what plain MAR draws from the same generator, so its images have plain twins.
DRAW_FIELDS = frozenset({"schedule", "head", "head_steps", "guided"})


class Technique:
    """Base class: every hook decides nothing, every claimed part is priced as plain MAR.

    Attributes:
        label: the technique's name in messages.
        writes: the plan fields it may decide (:data:`lazymar.plan.FIELD_MEANING`).
        defers: of those, the ones it yields to another technique that decides them too.
    """

    label: ClassVar[str] = "plain MAR"
    writes: ClassVar[frozenset[str]] = frozenset()
    defers: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model) -> None:
        self.model = model

    @classmethod
    def draws_as_plain(cls) -> bool:
        """Whether this technique leaves the random draws of plain MAR unchanged (it decides none of
        :data:`DRAW_FIELDS`): then an image it samples has a plain twin (same labels, seed and batch), and
        the distance between the two measures the technique's approximation alone."""
        return not cls.writes & DRAW_FIELDS

    # ------------------------------------------------------------------------------ planning
    def schedule(self, sched: Schedule) -> Schedule | None:
        """The step layout this technique needs (None: the plain one suits it); may record what it
        needs from ``sched``."""
        return None

    def arrange_orders(self, orders: torch.Tensor) -> torch.Tensor:
        """The generation orders (B, L) the technique's schedule follows (asked of the technique whose
        ``schedule`` the generation runs)."""
        return orders

    def head_model(self):
        """The head's model-function factory (``DiffLoss.sample``'s ``model_fn_factory``; None: the
        technique keeps the plain one)."""
        return None

    def plan_guidance(self, p: StepPlan) -> dict[str, Any]:
        return {}

    def plan_rows(self, p: StepPlan) -> dict[str, Any]:
        return {}

    def plan_transformer(self, p: StepPlan) -> dict[str, Any]:
        return {}

    def plan_head_calls(self, p: StepPlan) -> dict[str, Any]:
        return {}

    def plan_head_steps(self, p: StepPlan) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------------------ execution
    def run_encoder(self, p: StepPlan, inp: StepInputs) -> torch.Tensor:
        return self.model.forward_mae_encoder(inp.tokens, inp.mask, inp.class_embedding, inp.keep)

    def run_decoder(self, p: StepPlan, inp: StepInputs, x: torch.Tensor) -> torch.Tensor:
        return self.model.run_blocks(self.model.decoder_blocks, x)

    def run_transformer(self, p: StepPlan, inp: StepInputs) -> Hidden:
        raise NotImplementedError(f"{type(self).__name__} does not run the whole transformer")

    def complete(self, p: StepPlan, out: Hidden) -> Hidden:
        return out

    def split_head(self, p: StepPlan, z: torch.Tensor, cfg: float, bsz: int) -> list[torch.Tensor]:
        """The rows of ``z``'s conditional half (ascending, long) that each head call of ``p.head``
        samples, on the technique that planned several calls."""
        raise NotImplementedError(f"{self.label} plans no split of the head calls")

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


def splits_head(t: Technique) -> bool:
    return type(t).split_head is not Technique.split_head


def resolve(field: str, claims: list[tuple[Technique, Any]]) -> tuple[Technique, Any] | None:
    """The one claim on ``field`` that stands among ``claims`` ((technique, value) pairs), None when there
    are none: a technique that ``defers`` the field yields to one that does not; two that do not, or
    two that both defer, are a conflict."""
    if len(claims) > 1:
        claims = [c for c in claims if field not in c[0].defers] or claims
    if len(claims) > 1:
        a, b = claims[0][0], claims[1][0]
        raise ValueError(f"{a.label} and {b.label} both decide {FIELD_MEANING[field]} ({field!r}): "
                         f"use one of them")
    return claims[0] if claims else None


def check_composition(classes: Iterable[type[Technique]]) -> None:
    """Raise ``ValueError`` naming two techniques of ``classes`` that would decide the same field."""
    classes = list(classes)
    for field in FIELD_MEANING:
        resolve(field, [(cls, None) for cls in classes if field in cls.writes])
