"""Acceleration policies as MAR step strategies: the sampler decides, the blocks execute.

``MAR.sample_tokens(accel=...)`` asks :func:`make_sampler` for an object with the two methods of
:class:`models.mar.StepStrategy`. :class:`LazyMARSteps` holds the typed cache state of one
``sample_tokens`` call (created fresh per call, so nothing leaks between calls) and, per step, plans
whether to refresh, which rows run, and which tokens to recompute, from pure schedule functions.
"""
from __future__ import annotations

from typing import Any

import torch

from lazymar.condition_cache import ConditionCache
from lazymar.config import PRESETS, LazyMARConfig
from lazymar.head_cache import head_cache_factory
from lazymar.indexing import positions
from lazymar.schedules import keep_count
from lazymar.token_cache import DecoderCache, EncoderCache, decode, encode, select_tokens, similarity_layer_of


def resolve_accel(accel: Any) -> LazyMARConfig:
    """A preset name or a config object -> config; raises a clear error for anything else."""
    if isinstance(accel, str):
        if accel not in PRESETS:
            raise ValueError(f"unknown acceleration preset {accel!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[accel]
    if isinstance(accel, LazyMARConfig):
        return accel
    raise TypeError(f"accel must be None, a preset name ({sorted(PRESETS)}) or a LazyMARConfig, "
                    f"got {type(accel).__name__}")


def make_sampler(model, accel: Any, *, num_iter: int, cfg: float):
    """The step strategy of ``accel`` for one ``sample_tokens`` call."""
    return LazyMARSteps(model, resolve_accel(accel), num_iter=num_iter, guided=cfg != 1.0)


class LazyMARSteps:
    """LazyMAR's MAR step: token cache, condition cache and head cache, each optional."""

    def __init__(self, model, config: LazyMARConfig, *, num_iter: int, guided: bool) -> None:
        self.model = model
        self.config = config
        self.num_iter = num_iter
        self.token_cache = config.token_cache
        # Without guidance there is no unconditional half: the condition cache has nothing to do.
        self.condition_cache = ConditionCache() if (config.condition_cache is not None and guided) else None
        self.encoder_cache = EncoderCache()
        self.decoder_cache = DecoderCache()
        self.similarity_layer = similarity_layer_of(model, config.token_cache) if config.token_cache else 0
        self.prev_pred: torch.Tensor | None = None  # (B, L) tokens predicted at the previous step
        self.head_factory = head_cache_factory(config.head_cache) if config.head_cache else None

    # ---------------------------------------------------------------------------------- transformer
    def conditions(self, step: int, tokens: torch.Tensor, mask: torch.Tensor, to_pred: torch.Tensor,
                   class_embedding: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        guided = class_embedding.shape[0] != B
        refresh = step == 0 or not self.config.caches_transformer or self.config.is_refresh(step, self.num_iter)
        # Rows that run now: both guidance halves on refresh steps, the conditional one when the
        # condition cache rebuilds the other.
        rows = 2 * B if guided and (refresh or self.condition_cache is None) else B
        run_tokens, run_mask, run_pred = (torch.cat([t, t]) if rows == 2 * B else t
                                          for t in (tokens, mask.float(), to_pred))
        out = self._transformer(step, run_tokens, run_mask, run_pred, class_embedding[:rows], refresh)
        if self.condition_cache is not None:
            if refresh:
                self.condition_cache.store(out)
            else:
                out = self.condition_cache.complete(out)
        self.prev_pred = to_pred
        z = self.model.decoder_output(out)  # (B', L, D)
        pred = torch.cat([to_pred, to_pred]) if guided else to_pred
        return z[pred.nonzero(as_tuple=True)]

    def _transformer(self, step: int, tokens: torch.Tensor, mask: torch.Tensor, to_pred: torch.Tensor,
                     class_embedding: torch.Tensor, refresh: bool) -> torch.Tensor:
        """Last decoder block's outputs (R, N, D) for the R rows that run."""
        model, tc, R = self.model, self.token_cache, tokens.shape[0]
        if tc is not None and tc.encoder:
            cache = self.encoder_cache if refresh else self.encoder_cache.rows(R)
            compute = None if refresh else self._encoder_positions(R)
            enc = encode(model, tokens, mask, class_embedding, cache, compute)
        else:
            enc = model.forward_mae_encoder(tokens, mask, class_embedding)
        x = model.decoder_input(enc, mask)
        if tc is None or not tc.decoder:
            return model.run_blocks(model.decoder_blocks, x)
        cache = self.decoder_cache if refresh else self.decoder_cache.rows(R)
        choose = None if refresh else self._token_chooser(step, to_pred, cache)
        return decode(model, x, cache, self.similarity_layer, choose)

    def _encoder_positions(self, rows: int) -> torch.Tensor:
        """Buffer positions and the tokens generated at the previous step: (R, buf + n) ascending."""
        prev = self.prev_pred.repeat(rows // self.prev_pred.shape[0], 1)
        return positions(~self.model.with_buffer(~prev))

    def _token_chooser(self, step: int, to_pred: torch.Tensor, cache: DecoderCache):
        tc, model = self.token_cache, self.model
        prev = self.prev_pred.repeat(to_pred.shape[0] // self.prev_pred.shape[0], 1)
        n_tokens = model.seq_len + model.buffer_size
        retain = tc.retain_at(step, self.config.schedule_length(self.num_iter))
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
        return self.model.diffloss.sample(z, temperature, cfg, generator=generator,
                                          model_fn_factory=self.head_factory)
