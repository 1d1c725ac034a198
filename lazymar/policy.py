"""Acceleration policies as MAR step strategies: the sampler decides, the blocks execute.

``MAR.sample_tokens(accel=...)`` asks :func:`make_sampler` for an object with the methods of
:class:`models.mar.StepStrategy`. :class:`AccelSteps` holds the typed cache state of one
``sample_tokens`` call (created fresh per call, so nothing leaks between calls) and, per step, plans
from pure schedule functions: the step schedule and orders (GtR), whether to refresh, which rows run
(condition cache), which tokens the transformer recomputes (LazyMAR token cache or MARche), and how
many diffusion steps each token gets (GtR, FTS) under which head (head cache).
"""
from __future__ import annotations

from typing import Any

import torch

from lazymar.condition_cache import ConditionCache
from lazymar.config import PRESETS, AccelConfig
from lazymar.gtr import (fts_scores, fts_select, head_steps_of, stage_of_tokens, stage_step_counts,
                         staged_mask_lens, staged_orders)
from lazymar.head_cache import head_cache_factory
from lazymar.indexing import positions
from lazymar.marche import MARcheCache, marche_decode
from lazymar.schedules import keep_count
from lazymar.token_cache import DecoderCache, EncoderCache, decode, encode, select_tokens, similarity_layer_of
from models.schedules import plain_mask_lens


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


def make_sampler(model, accel: Any, *, num_iter: int, cfg: float):
    """The step strategy of ``accel`` for one ``sample_tokens`` call."""
    return AccelSteps(model, resolve_accel(accel), num_iter=num_iter, guided=cfg != 1.0)


class AccelSteps:
    """A MAR step with any composition of LazyMAR's caches, GtR's schedules and MARche's attention.

    ``num_iter`` is what the caller asked for; ``self.num_steps`` is the number of MAR steps actually
    run (GtR runs fewer), and every step schedule here is laid out over it.
    """

    def __init__(self, model, config: AccelConfig, *, num_iter: int, guided: bool) -> None:
        self.model = model
        self.config = config
        self.gtr = config.gtr
        self.marche = config.marche
        seq_len = model.seq_len
        if self.gtr is not None and self.gtr.transformer:
            self.stage = stage_of_tokens(model.seq_h, model.seq_w, self.gtr.num_stages)
            sizes = [int((self.stage == k).sum()) for k in range(self.gtr.num_stages)]
            steps = stage_step_counts(num_iter, self.gtr, sizes)
            self.plan = staged_mask_lens(sizes, steps)
            self.generation_steps = sum(steps[:-1]) if self.gtr.has_reconstruction else len(self.plan)
        else:
            self.stage = None
            self.plan = plain_mask_lens(num_iter, seq_len)
            # Without staged orders, reconstruction is the steps that start with at most half the
            # tokens masked (GtR's reconstruction stage is the odd half for any K > 1).
            before = [seq_len] + self.plan[:-1]
            recon = (self.gtr is not None and self.gtr.has_reconstruction)
            self.generation_steps = sum(1 for m in before if not (recon and m <= seq_len // 2))
        self.num_steps = len(self.plan)
        self.bsz = 0
        self.token_cache = config.token_cache
        # Without guidance there is no unconditional half: the condition cache has nothing to do.
        self.condition_cache = ConditionCache() if (config.condition_cache is not None and guided) else None
        self.encoder_cache = EncoderCache()
        self.decoder_cache = DecoderCache()
        self.similarity_layer = similarity_layer_of(model, config.token_cache) if config.token_cache else 0
        self.prev_pred: torch.Tensor | None = None  # (B, L) tokens predicted at the previous step
        self.head_factory = head_cache_factory(config.head_cache) if config.head_cache else None
        self.marche_cache = MARcheCache()
        self.active_count = self.marche.active_count(seq_len, model.buffer_size) if self.marche else 0

    # ---------------------------------------------------------------------------------- schedule
    def mask_lens(self) -> list[int]:
        """Tokens left masked after each MAR step (its length is the number of steps)."""
        return self.plan

    def arrange_orders(self, orders: torch.Tensor) -> torch.Tensor:
        """GtR: stage by stage, random within a stage; otherwise the orders as given."""
        return orders if self.stage is None else staged_orders(orders, self.stage)

    # ---------------------------------------------------------------------------------- transformer
    def conditions(self, step: int, tokens: torch.Tensor, mask: torch.Tensor, to_pred: torch.Tensor,
                   class_embedding: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        self.bsz = B
        guided = class_embedding.shape[0] != B
        # LazyMAR's refresh steps (token and condition caches); without them every step is "full".
        refresh = step == 0 or not self.config.caches_transformer or self.config.is_refresh(step, self.num_steps)
        # MARche recomputes everything on its own refresh steps, and whenever the condition cache
        # refreshes (so that the unconditional rows' keys/values never go stale).
        marche_full = self.marche is not None and (
            step == 0 or self.marche.is_refresh(step) or (self.condition_cache is not None and refresh))
        # Rows that run now: both guidance halves on refresh steps, the conditional one when the
        # condition cache rebuilds the other.
        rows = 2 * B if guided and (refresh or self.condition_cache is None) else B
        run_tokens, run_mask, run_pred = (torch.cat([t, t]) if rows == 2 * B else t
                                          for t in (tokens, mask.float(), to_pred))
        if self.marche is not None:  # with every position active nothing is cached, the encoder included
            enc_full = marche_full or self.active_count >= self.model.seq_len + self.model.buffer_size
        else:
            enc_full = refresh
        enc = self._encoder(run_tokens, run_mask, class_embedding[:rows], enc_full)
        x = self.model.decoder_input(enc, run_mask)
        if self.marche is not None:
            out = self._marche_decoder(x, run_pred, marche_full)
        else:
            out = self._decoder(step, x, run_pred, refresh)
        if self.condition_cache is not None:
            if refresh:
                self.condition_cache.store(out)
            else:
                out = self.condition_cache.complete(out)
        self.prev_pred = to_pred
        z = self.model.decoder_output(out)  # (B', L, D)
        pred = torch.cat([to_pred, to_pred]) if guided else to_pred
        return z[pred.nonzero(as_tuple=True)]

    def _encoder(self, tokens: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor,
                 full: bool) -> torch.Tensor:
        """Encoder outputs of the known tokens; incremental (LazyMAR) when a cache asks for it."""
        model, R = self.model, tokens.shape[0]
        incremental = ((self.token_cache is not None and self.token_cache.encoder)
                       or (self.marche is not None and self.marche.cache_encoder))
        if not incremental:
            return model.forward_mae_encoder(tokens, mask, class_embedding)
        # The first call allocates the buffers for all rows; later ones write the rows that run (with
        # the condition cache, a MARche refresh can run the conditional half alone).
        cache = self.encoder_cache if self.encoder_cache.out is None else self.encoder_cache.rows(R)
        compute = None if full else self._encoder_positions(R)
        return encode(model, tokens, mask, class_embedding, cache, compute)

    def _decoder(self, step: int, x: torch.Tensor, to_pred: torch.Tensor, refresh: bool) -> torch.Tensor:
        """Last decoder block's outputs (R, N, D): plain, or LazyMAR's selective decoder."""
        tc, R = self.token_cache, x.shape[0]
        if tc is None or not tc.decoder:
            return self.model.run_blocks(self.model.decoder_blocks, x)
        cache = self.decoder_cache if refresh else self.decoder_cache.rows(R)
        choose = None if refresh else self._token_chooser(step, to_pred, cache)
        return decode(self.model, x, cache, self.similarity_layer, choose)

    def _marche_decoder(self, x: torch.Tensor, to_pred: torch.Tensor, full: bool) -> torch.Tensor:
        """Last decoder block's outputs (R, N, D) with MARche's cache-aware attention."""
        R = x.shape[0]
        if full:  # the first call allocates the buffers for all rows; later ones write the rows that run
            cache = self.marche_cache if self.marche_cache.out is None else self.marche_cache.rows(R)
            return marche_decode(self.model, x, cache, self.marche, None, None, self.active_count)
        model = self.model
        gen = positions(model.with_buffer(to_pred))  # (R, g): generated now, first in the active set
        base = gen
        if self.marche.include_prev:
            prev = self.prev_pred.repeat(R // self.prev_pred.shape[0], 1)
            base = torch.cat([gen, positions(model.with_buffer(prev & ~to_pred))], dim=1)
        generated = torch.arange(gen.shape[1], device=x.device).expand(R, -1)
        active = max(self.active_count, base.shape[1])
        if active >= x.shape[1]:  # the active set is everything: active from the first block on
            rest = positions(~torch.zeros(R, x.shape[1], dtype=torch.bool, device=x.device).scatter_(1, base, True))
            base = torch.cat([base, rest], dim=1)
        return marche_decode(model, x, self.marche_cache.rows(R), self.marche, base, generated, active)

    def _encoder_positions(self, rows: int) -> torch.Tensor:
        """Buffer positions and the tokens generated at the previous step: (R, buf + n) ascending."""
        prev = self.prev_pred.repeat(rows // self.prev_pred.shape[0], 1)
        return positions(~self.model.with_buffer(~prev))

    def _token_chooser(self, step: int, to_pred: torch.Tensor, cache: DecoderCache):
        tc, model = self.token_cache, self.model
        prev = self.prev_pred.repeat(to_pred.shape[0] // self.prev_pred.shape[0], 1)
        n_tokens = model.seq_len + model.buffer_size
        retain = tc.retain_at(step, self.config.schedule_length(self.num_steps))
        count = keep_count(n_tokens, retain, int(to_pred[0].sum()),
                           int(prev[0].sum()), tc.extra_tokens)
        if count >= n_tokens:
            return None  # everything is recomputed: skip the similarity bookkeeping
        pinned = model.with_buffer(to_pred | prev)

        def choose(v: torch.Tensor) -> torch.Tensor:
            return select_tokens(v, cache.prev_v, pinned, count, tc.pinned_score)

        return choose

    # ---------------------------------------------------------------------------------- head
    def sample_head(self, step: int, z: torch.Tensor, temperature: float, cfg: float,
                    generator: torch.Generator | None) -> torch.Tensor:
        head, gtr = self.model.diffloss, self.gtr
        if gtr is None or not gtr.diffusion:
            return head.sample(z, temperature, cfg, generator=generator, model_fn_factory=self.head_factory)
        steps = head_steps_of(step, self.generation_steps, gtr)
        recon = gtr.has_reconstruction and step >= self.generation_steps
        if not (recon and gtr.fts):
            return head.sample(z, temperature, cfg, generator=generator, num_steps=steps,
                               model_fn_factory=self.head_factory)
        # FTS: the most detailed tokens of each image get more diffusion steps.
        guided = cfg != 1.0
        n = z.shape[0] // 2 if guided else z.shape[0]
        scored = z[:n]
        if guided and gtr.fts_source == "guided":
            scored = z[n:] + cfg * (z[:n] - z[n:])
        detailed = fts_select(fts_scores(scored), self.bsz, gtr.fts_fraction)
        out = z.new_empty(n, head.in_channels)
        for chosen, k in ((detailed, gtr.fts_steps), (~detailed, steps)):
            if not bool(chosen.any()):
                continue
            rows = torch.cat([chosen, chosen]) if guided else chosen
            out[chosen] = head.sample(z[rows], temperature, cfg, generator=generator, num_steps=k,
                                      model_fn_factory=self.head_factory)
        return out
