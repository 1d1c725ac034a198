"""Acceleration policies as MAR step strategies: the techniques plan, the step executes the plan.

``MAR.sample_tokens(accel=...)`` asks :func:`make_sampler` for an object with the methods of
:class:`models.mar.StepStrategy`. :class:`AccelSteps` builds, per ``sample_tokens`` call, one object per
enabled technique (each holds its own typed cache state, so nothing leaks between calls) and asks them
in a fixed order, through the hooks of :class:`lazymar.technique.Technique`: first for the schedule and
the orders, then for each step's :class:`~lazymar.plan.StepPlan`, all before the first step runs. A
step then runs what its plan names: the encoder and decoder of the techniques that claimed them (or
one that runs the whole transformer), every technique's ``complete`` on the decoder output, and the
head calls through the wrapped model function. :mod:`lazymar.flops` prices the same plans.

Order: GtR and ReCAP (schedule and orders), the condition cache (which guidance halves run), the token
cache and MARche (what the transformer recomputes), ReCAP's per-step plan (after the condition cache,
whose rows its cheap steps reuse), DiSA (head step counts, after GtR's), the head cache (the model
function).
"""
from __future__ import annotations

from typing import Any

import torch

from lazymar.condition_cache import ConditionCacheTechnique
from lazymar.config import PRESETS, AccelConfig
from lazymar.cspd import CSpD, CSpDConfig
from lazymar.disa import DiSA
from lazymar.gtr import GtR
from lazymar.head_cache import HeadCacheTechnique
from lazymar.indexing import positions
from lazymar.marche import MARche
from lazymar.plan import HeadCall, Schedule, StepPlan
from lazymar.recap import ReCAP
from lazymar.technique import Hidden, PlainMAR, StepInputs, Technique
from lazymar.token_cache import TokenCache
from models.indexing import gather_rows


def resolve_accel(accel: Any) -> AccelConfig:
    """A preset name or a config object -> config; raises a clear error for anything else."""
    if isinstance(accel, str):
        if accel not in PRESETS:
            raise ValueError(f"unknown acceleration preset {accel!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[accel]
    if isinstance(accel, AccelConfig):
        return accel
    raise TypeError(f"accel must be None, a preset name ({sorted(PRESETS)}) or an AccelConfig, "
                    f"got {type(accel).__name__}")


def make_sampler(model, accel: Any, *, num_iter: int, cfg: float) -> "AccelSteps | CSpD":
    """The step strategy of ``accel`` for one ``sample_tokens`` call (for a :class:`CSpDConfig`, the
    speculative sampler, which runs its own loop over two models: :mod:`lazymar.cspd`)."""
    if isinstance(accel, CSpDConfig):
        return CSpD(model, accel)
    return AccelSteps(model, resolve_accel(accel), num_iter=num_iter, guided=cfg != 1.0)


def techniques_of(model, config: AccelConfig) -> list[Technique]:
    """One object per enabled technique, in the order the step asks them."""
    out: list[Technique] = []
    if config.gtr is not None:
        out.append(GtR(model, config.gtr))
    if config.condition_cache is not None:
        out.append(ConditionCacheTechnique(model))
    if config.token_cache is not None:
        out.append(TokenCache(model, config.token_cache, config.schedule_length))
    if config.marche is not None:
        out.append(MARche(model, config.marche))
    if config.recap is not None:
        out.append(ReCAP(model, config.recap))
    if config.disa is not None:
        out.append(DiSA(model, config.disa))
    if config.head_cache is not None:
        out.append(HeadCacheTechnique(model, config.head_cache))
    return out


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
        self.techniques = techniques_of(model, config)
        schedule = Schedule.plain(num_iter, model.seq_len)
        for t in self.techniques:
            schedule = t.schedule(schedule)
        self.schedule = schedule
        self.num_steps = schedule.num_steps
        self.plans = self._plan_steps()
        self.head_factory = None  # the head's model-function factory, wrapped by every technique once
        for t in self.techniques:
            self.head_factory = t.wrap_head(self.head_factory)
        self.prev_pred: torch.Tensor | None = None  # (B, L) tokens predicted at the previous step
        self.bsz = 0

    def _plan_steps(self) -> list[StepPlan]:
        seq_len, config = self.model.seq_len, self.config
        plans, masked, prev = [], seq_len, 0
        for step, mask_len in enumerate(self.schedule.mask_lens):
            n_pred = masked if step == self.num_steps - 1 else masked - mask_len
            # LazyMAR's refresh steps (token and condition caches); without them every step is "full".
            refresh = step == 0 or not config.caches_transformer or config.is_refresh(step, self.num_steps)
            p = StepPlan(step=step, num_steps=self.num_steps, n_known=seq_len - masked, n_pred=n_pred,
                         n_prev=prev, guided=self.guided, refresh=refresh, halves=2 if self.guided else 1,
                         encoder=self.plain, decoder=self.plain, head_runner=self.plain,
                         head=[HeadCall(n_pred)])
            for t in self.techniques:
                t.plan(p)
            plans.append(p)
            masked, prev = mask_len, n_pred
        return plans

    # ---------------------------------------------------------------------------------- schedule
    def mask_lens(self) -> list[int]:
        """Tokens left masked after each MAR step (its length is the number of steps)."""
        return list(self.schedule.mask_lens)

    def guidance_lens(self) -> list[int]:
        return list(self.schedule.guidance_lens)

    def arrange_orders(self, orders: torch.Tensor) -> torch.Tensor:
        for t in self.techniques:
            orders = t.arrange_orders(orders)
        return orders

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
            out = Hidden(p.decoder.run_decoder(p, inp, model.decoder_input(enc, inp.mask, inp.keep)))
        for t in self.techniques:
            out = t.complete(p, out)
        self.prev_pred = to_pred
        pred = torch.cat([to_pred, to_pred]) if p.guided else to_pred
        if out.positions is None:
            z = model.decoder_output(out.x)  # (B', L, D)
            return gather_rows(z, positions(pred, p.n_pred))
        image_positions = out.positions - model.buffer_size
        z = model.decoder_norm(out.x) + model.diffusion_pos_embed_learned[0, image_positions]
        return gather_rows(z, positions(pred.gather(1, image_positions), p.n_pred))

    # ---------------------------------------------------------------------------------- head
    def sample_head(self, step: int, z: torch.Tensor, temperature: float, cfg: float,
                    generator: torch.Generator | None) -> torch.Tensor:
        p, head = self.plans[step], self.model.diffloss

        def sample(call: HeadCall, cond: torch.Tensor) -> torch.Tensor:
            return head.sample(cond, temperature, cfg, generator=generator, num_steps=call.steps,
                               max_timestep=call.max_timestep, model_fn_factory=self.head_factory)

        if len(p.head) == 1:
            return sample(p.head[0], z)
        masks = next(m for m in (t.split_head(p, z, cfg, self.bsz) for t in self.techniques) if m is not None)
        guided = cfg != 1.0
        out = z.new_empty(z.shape[0] // 2 if guided else z.shape[0], head.in_channels)
        for call, chosen in zip(p.head, masks):
            out[chosen] = sample(call, z[torch.cat([chosen, chosen]) if guided else chosen])
        return out
