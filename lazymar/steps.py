"""An acceleration config as MAR's step strategy: the techniques plan every step in phases, the step
executes the plan.

``MAR.sample_tokens(accel=config)`` asks the config for an object with the methods of
:class:`models.mar.StepStrategy` (:meth:`lazymar.config.AccelConfig.sampler`). :class:`AccelSteps` builds,
per ``sample_tokens`` call, one object per enabled technique (each holds its own typed cache state, so
nothing leaks between calls) and plans the whole generation before the first step runs: the schedule,
the orders and the head's model function once, then each step's :class:`~lazymar.plan.StepPlan` in the
phases of :data:`~lazymar.plan.STEP_PHASES`, every field decided by at most one technique (a second
one is an error naming both, :func:`lazymar.technique.resolve`). A step then runs what its plan names:
the encoder and decoder of the techniques that claimed them (or one that runs the whole transformer),
every technique's ``complete`` on the decoder output, and the head calls through the model function.
:mod:`lazymar.flops` prices the same plans.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lazymar.plan import STEP_PHASES, HeadCall, Schedule, StepPlan
from lazymar.technique import Hidden, PlainMAR, StepInputs, Technique, resolve, splits_head
from models.indexing import gather_rows, positions

if TYPE_CHECKING:  # the config hands itself in (AccelConfig.sampler)
    from lazymar.config import AccelConfig


def decide(field: str, techniques: list[Technique], ask) -> tuple[Technique, Any] | None:
    """The technique that decides a generation-wide ``field`` (``ask(t)`` is its answer, None: it does
    not), and its answer; None when no technique does."""
    return resolve(field, [(t, a) for t in techniques if (a := ask(t)) is not None])


class AccelSteps:
    """A MAR step composed of the enabled techniques' hooks, with every step planned up front.

    ``num_iter`` is what the caller asked for; ``self.num_steps`` is the number of MAR steps actually
    run (GtR runs fewer), and ``self.plans[step]`` is what each of them does.
    """

    def __init__(self, model, config: AccelConfig, *, num_iter: int, guided: bool) -> None:
        self.model = model
        self.config = config
        self.guided = guided
        self.plain = PlainMAR(model)
        self.techniques = config.techniques(model)
        plain = Schedule.plain(num_iter, model.seq_len)
        chosen = decide("schedule", self.techniques, lambda t: t.schedule(plain))
        # The technique that lays out the steps also arranges the orders they follow.
        self.schedule_by, self.schedule = (None, plain) if chosen is None else chosen
        self.num_steps = self.schedule.num_steps
        head = decide("head_model", self.techniques, lambda t: t.head_model())
        self.head_runner, self.head_factory = (self.plain, None) if head is None else head
        self.plans: list[StepPlan] = []  # planned in order: a step's plan reads the one before it
        for step in range(self.num_steps):
            self.plans.append(self._plan_step(step))
        self.prev_pred: torch.Tensor | None = None  # (B, L) tokens predicted at the previous step
        self.bsz = 0

    def _plan_step(self, step: int) -> StepPlan:
        seq_len, config, sched = self.model.seq_len, self.config, self.schedule
        masked = seq_len if step == 0 else sched.mask_lens[step - 1]
        n_pred = masked if step == self.num_steps - 1 else masked - sched.mask_lens[step]
        n_prev = 0 if step == 0 else (seq_len if step == 1 else sched.mask_lens[step - 2]) - masked
        # LazyMAR's refresh steps (token and condition caches); without them every step is "full".
        refresh = step == 0 or not config.caches_transformer or config.is_refresh(step, self.num_steps)
        p = StepPlan(step=step, num_steps=self.num_steps, n_known=seq_len - masked, n_pred=n_pred, n_prev=n_prev,
                     guided=self.guided, refresh=refresh, reuses=sched.reused_by(step),
                     guidance_len=sched.guidance_lens[step], halves=2 if self.guided else 1, encoder=self.plain,
                     decoder=self.plain, head_runner=self.head_runner, head=[HeadCall(n_pred)])
        for phase in STEP_PHASES:
            claims: dict[str, list[tuple[Technique, Any]]] = {}
            for t in self.techniques:
                for field, value in getattr(t, f"plan_{phase.name}")(p).items():
                    if field not in phase.fields or field not in t.writes:
                        raise ValueError(f"{t.label} decides {field!r} in the {phase.name!r} phase, which does "
                                         f"not own it or which it does not declare in its `writes`")
                    claims.setdefault(field, []).append((t, value))
            for field, field_claims in claims.items():
                t, value = resolve(field, field_claims)
                setattr(p, field, value)
                p.decided_by[field] = t
            if phase.name == "guidance":
                self._follow_guidance(p)
        if len(p.head) > 1 and not splits_head(p.decided_by.get("head", self.plain)):
            by = p.decided_by.get("head", self.plain)
            raise ValueError(f"{by.label} plans {len(p.head)} head calls at step {step} but does not say which "
                             f"tokens each samples (it implements no split_head)")
        for call in p.head:  # the counts the split does not fix
            if call.steps is None:
                call.steps = p.head_steps
            call.max_timestep = p.max_timestep
        return p

    def _follow_guidance(self, p: StepPlan) -> None:
        """What the step's guidance implies for the phases after it: its rows, and a refresh of every
        cache where unconditional rows come back (a guided step after unguided ones: their cached
        values are missing or stale)."""
        p.halves = 2 if p.guided else 1
        p.new_rows = p.guided and p.step > 0 and not self.plans[p.step - 1].guided
        p.refresh = p.refresh or p.new_rows

    # ---------------------------------------------------------------------------------- schedule
    def mask_lens(self) -> list[int]:
        """Tokens left masked after each MAR step (its length is the number of steps)."""
        return list(self.schedule.mask_lens)

    def guidance_lens(self) -> list[int]:
        return list(self.schedule.guidance_lens)

    def arrange_orders(self, orders: torch.Tensor) -> torch.Tensor:
        return orders if self.schedule_by is None else self.schedule_by.arrange_orders(orders)

    # ---------------------------------------------------------------------------------- transformer
    def conditions(self, step: int, tokens: torch.Tensor, mask: torch.Tensor, to_pred: torch.Tensor,
                   class_embedding: torch.Tensor) -> torch.Tensor:
        p, model = self.plans[step], self.model
        B = tokens.shape[0]
        self.bsz = B
        both = p.halves == 2
        tokens, mask, to_pred_rows = (torch.cat([t, t]) if both else t for t in (tokens, mask.float(), to_pred))
        inp = StepInputs(tokens, mask, to_pred_rows, class_embedding[:p.rows(B)], self.prev_pred,
                         model.known_positions(mask, p.n_known))
        if p.transformer is not None:
            out = p.transformer.run_transformer(p, inp)
        else:
            enc = p.encoder.run_encoder(p, inp)
            out = Hidden(p.decoder.run_decoder(p, inp, model.decoder_input(enc, inp.keep)))
        for t in self.techniques:
            out = t.complete(p, out)
        self.prev_pred = to_pred
        pred = torch.cat([to_pred, to_pred]) if p.guided else to_pred
        if out.positions is None:
            return gather_rows(model.decoder_output(out.x), positions(pred, p.n_pred))  # (B' n, D)
        z = model.decoder_output(out.x, out.positions)
        return gather_rows(z, positions(pred.gather(1, out.positions - model.buffer_size), p.n_pred))

    # ---------------------------------------------------------------------------------- head
    def sample_head(self, step: int, z: torch.Tensor, temperature: float, cfg: float,
                    generator: torch.Generator | None) -> torch.Tensor:
        p, head = self.plans[step], self.model.diffloss

        def sample(call: HeadCall, cond: torch.Tensor) -> torch.Tensor:
            return head.sample(cond, temperature, cfg, guided=p.guided, generator=generator, num_steps=call.steps,
                               max_timestep=call.max_timestep, model_fn_factory=self.head_factory)

        if len(p.head) == 1:
            return sample(p.head[0], z)
        n = z.shape[0] // 2 if p.guided else z.shape[0]
        out = z.new_empty(n, head.in_channels)
        for call, rows in zip(p.head, p.decided_by["head"].split_head(p, z, cfg, self.bsz)):
            cond = z.index_select(0, torch.cat([rows, rows + n]) if p.guided else rows)
            out.index_copy_(0, rows, sample(call, cond))
        return out
