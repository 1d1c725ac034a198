"""What one MAR step will do, decided before it runs: the plan every technique writes and the sampler
and the FLOPs count both read.

A :class:`Schedule` is the whole generation's step layout (how many tokens stay masked after each
step, and the masked count each step's guidance scale is read at). A :class:`StepPlan` is one step:
how many tokens are known, predicted now and at the previous step (the same in every image), which
guidance halves run through the transformer, which technique runs the encoder, the decoder or the
whole transformer, and which diffusion-head calls sample the predicted tokens. Techniques fill it in
through their ``plan_*`` hooks, one per phase (:mod:`lazymar.technique`); :mod:`lazymar.steps` executes it and
:mod:`lazymar.flops` prices it, so what is counted is what runs.

The multiply-add formulas of the plain parts live here too (:class:`ModelShape`, :func:`block_macs`,
:func:`encoder_macs`, :func:`head_step_macs`, :func:`head_fixed_macs`); a technique that runs a part
differently reports that part's multiply-adds itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from models.schedules import plain_mask_lens

if TYPE_CHECKING:
    from lazymar.technique import Technique

TIMESTEP_FREQ_DIM = 256  # sinusoidal features fed to the head's timestep MLP


@dataclass(frozen=True)
class ModelShape:
    """The sizes a multiply-add count needs from a MAR (a ``meta``-device model is enough)."""

    seq_len: int
    buffer: int
    token_dim: int
    enc_dim: int
    enc_hidden: int
    enc_depth: int
    dec_dim: int
    dec_hidden: int
    dec_depth: int
    head_width: int
    head_depth: int

    @classmethod
    def of(cls, model) -> "ModelShape":
        return cls(seq_len=model.seq_len, buffer=model.buffer_size, token_dim=model.token_embed_dim,
                   enc_dim=model.z_proj.out_features, enc_depth=len(model.encoder_blocks),
                   enc_hidden=model.encoder_blocks[0].mlp.fc1.out_features if len(model.encoder_blocks) else 0,
                   dec_dim=model.decoder_embed.out_features, dec_depth=len(model.decoder_blocks),
                   dec_hidden=model.decoder_blocks[0].mlp.fc1.out_features,
                   head_width=model.diffloss.net.model_channels, head_depth=model.diffloss.net.num_res_blocks)

    @property
    def positions(self) -> int:
        """Buffer + image tokens: the decoder's sequence length."""
        return self.buffer + self.seq_len


def block_macs(dim: int, hidden: int, n_q: int, n_k: int, n_rest: int | None = None) -> int:
    """One transformer block: qkv and attention for ``n_q`` queries over ``n_k`` keys, projection and
    MLP for ``n_rest`` tokens (default ``n_q``)."""
    n_rest = n_q if n_rest is None else n_rest
    return n_q * dim * 3 * dim + 2 * n_q * n_k * dim + n_rest * (dim * dim + 2 * dim * hidden)


def encoder_macs(s: ModelShape, n_embedded: int, n_queries: int, n_keys: int) -> int:
    """One row's encoder: ``z_proj`` of ``n_embedded`` tokens, every block for ``n_queries`` queries over
    ``n_keys`` keys."""
    return n_embedded * s.token_dim * s.enc_dim + s.enc_depth * block_macs(s.enc_dim, s.enc_hidden, n_queries, n_keys)


def decoder_embed_macs(s: ModelShape, n_encoded: int) -> int:
    """One row's ``decoder_embed`` of ``n_encoded`` encoder outputs."""
    return n_encoded * s.enc_dim * s.dec_dim


def head_step_macs(s: ModelShape, rows: int) -> int:
    """One full pass of the head's MLP (input projection, residual blocks, final layer) over ``rows``."""
    W, C = s.head_width, s.token_dim
    return rows * (C * W + s.head_depth * 5 * W * W + 2 * W * W + W * 2 * C)


def head_fixed_macs(s: ModelShape, rows: int, steps: int) -> int:
    """What every head call pays whatever its model function: ``cond_embed`` once per MAR step and the
    timestep embedding once per diffusion step (one row, shared by every token)."""
    W = s.head_width
    return rows * s.dec_dim * W + steps * (TIMESTEP_FREQ_DIM * W + W * W)


@dataclass(frozen=True)
class Schedule:
    """A generation's step layout.

    Attributes:
        num_iter: the step count the caller asked for.
        mask_lens: tokens left masked after each step run; its length is the number of steps run.
        guidance_lens: per step, the masked count the linear guidance ramp is read at.
        reuses: per step, the earlier step whose transformer context (keys/values) it runs over instead
            of recomputing it (ReCAP's cheap steps), or None.
    """

    num_iter: int
    mask_lens: tuple[int, ...]
    guidance_lens: tuple[int, ...]
    reuses: tuple[int | None, ...] | None = None

    @classmethod
    def plain(cls, num_iter: int, seq_len: int) -> "Schedule":
        lens = tuple(plain_mask_lens(num_iter, seq_len))
        return cls(num_iter, lens, lens)

    @property
    def num_steps(self) -> int:
        return len(self.mask_lens)

    def reused_by(self, step: int) -> int | None:
        return None if self.reuses is None else self.reuses[step]


@dataclass
class HeadCall:
    """One ``DiffLoss.sample`` call of a step: ``tokens`` per image with ``steps`` respaced diffusion steps
    (``None``: the model's own) clamped at ``max_timestep`` (``None``: not clamped). ``detail`` marks
    the call that samples the tokens a selector picked (GtR's FTS), whose step count the selector
    fixes; the step counts of the others are the plan's ``head_steps``."""

    tokens: int
    steps: int | None = None
    max_timestep: int | None = None
    detail: bool = False


@dataclass(frozen=True)
class Phase:
    """One phase of planning a step: the :class:`StepPlan` fields it decides, and what they mean."""

    name: str
    fields: tuple[str, ...]
    meaning: str


# The phases of a step's plan, in the order they run; each field is decided in exactly one of them, and a
# phase may read what the earlier ones decided (the condition cache's rows are read by MARche and ReCAP;
# every later phase reads whether the step is guided).
STEP_PHASES = (
    Phase("guidance", ("guided",), "whether the step runs classifier-free guidance (its unconditional half)"),
    Phase("rows", ("halves", "uncond_refresh"), "which guidance halves run through the transformer"),
    Phase("transformer", ("encoder", "decoder", "transformer"),
          "who runs the encoder, the decoder or the whole transformer"),
    Phase("head_calls", ("head",), "how the predicted tokens are split among head calls"),
    Phase("head_steps", ("head_steps", "max_timestep"), "the head calls' diffusion step counts"),
)
# Decided once per generation: the step layout with the orders it follows, the head's model function.
RUN_FIELDS = {"schedule": "the step schedule and the generation orders",
              "head_model": "the diffusion head's model function"}
FIELD_MEANING = {**RUN_FIELDS, **{f: ph.meaning for ph in STEP_PHASES for f in ph.fields}}


@dataclass
class StepPlan:
    """Everything decided about one MAR step before it runs (counts are per image).

    The first group of attributes follows from the schedule; the others are decided by the techniques
    in the :data:`STEP_PHASES` (defaults: plain MAR), and ``decided_by`` names who decided what.

    Attributes:
        step / num_steps: index of the step and number of steps run.
        n_known: tokens known before the step; n_pred: predicted now; n_prev: predicted at the
            previous step (0 at the first).
        guidance_len: the masked count the step's guidance scale is read at (``Schedule.guidance_lens``).
        guided: classifier-free guidance runs this step (the batch has an unconditional half); decided
            in the first phase (interval guidance), the run's guidance by default.
        refresh: LazyMAR's transformer caches refresh (every step when they are off).
        new_rows: the step runs rows no earlier step ran since they were last run (a guided step after
            unguided ones): every cache recomputes them, so ``refresh`` is set too.
        reuses: the earlier step whose transformer context this step runs over (``Schedule.reuses``).
        halves: guidance halves that run through the transformer (1 = the conditional one).
        uncond_refresh: the condition cache records the guidance residual this step.
        encoder / decoder: the techniques that run the encoder and the decoder blocks.
        transformer: a technique that runs the whole transformer itself (then encoder/decoder are unused).
        head: the head calls that sample the predicted tokens, in the order they draw noise.
        head_steps / max_timestep: diffusion steps (None: the model's own) and timestep clamp of the
            head calls whose steps the split does not fix (already applied to ``head``).
        head_runner: the technique whose model function the head runs (its multiply-adds too).
    """

    step: int
    num_steps: int
    n_known: int
    n_pred: int
    n_prev: int
    guided: bool
    refresh: bool
    encoder: "Technique"
    decoder: "Technique"
    head_runner: "Technique"
    reuses: int | None = None
    guidance_len: int = 0
    new_rows: bool = False
    halves: int = 1
    transformer: "Technique | None" = None
    uncond_refresh: bool = False
    head: list[HeadCall] = field(default_factory=list)
    head_steps: int | None = None
    max_timestep: int | None = None
    decided_by: dict[str, "Technique"] = field(default_factory=dict)

    def rows(self, bsz: int) -> int:
        """Rows that run through the transformer for ``bsz`` images."""
        return self.halves * bsz
