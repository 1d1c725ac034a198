"""LazyMAR token cache: stop recomputing tokens whose features barely change between MAR steps.

Encoder: a known token's input never changes once it is generated, so on a cached step only the
buffer (class) tokens and the tokens generated at the previous step are computed; every other known
token contributes the keys/values cached when it was last computed, and its encoder output is reused.

Decoder: the first ``similarity_layer`` blocks and that block's attention run on all tokens; the
cosine similarity of that block's values V with the previous step's (per token, averaged over heads)
picks the tokens that changed most, and only those (plus the tokens predicted now and at the previous
step) go through the rest of the decoder, attending over the cached keys/values of the others. A
token that is not recomputed keeps its last computed output.

Buffers are position-indexed, preallocated at the first refresh from the activations' shape and dtype,
and a refresh step is the same code with every token computed, so refreshing every step is exactly
plain MAR.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.indexing import gather_tokens, positions
from models.runner import AttentionStep, CachedAttention, KVCache, PositionBuffer, compute_dtype
from lazymar.plan import ModelShape, StepPlan, block_macs, decoder_embed_macs, encoder_macs
from lazymar.schedules import keep_count, piecewise_constant
from lazymar.technique import StepInputs, Technique

# The release's decoder retain ratios at 64 steps: (first step / 64, fraction of tokens kept).
RELEASED_RETAIN = ((0.0, 1.0), (20 / 64, 0.6), (21 / 64, 0.5), (25 / 64, 0.4), (30 / 64, 0.15),
                   (35 / 64, 0.12), (40 / 64, 0.05))


@dataclass(frozen=True)
class TokenCacheConfig:
    """Token cache settings (defaults: the LazyMAR release).

    Attributes:
        encoder: incremental encoder (compute only buffer + newly generated tokens on cached steps).
        decoder: selective decoder (recompute only the least similar tokens after ``similarity_layer``).
        similarity_layer: 0-based decoder block whose values V decide what to recompute; blocks before
            it and its attention always run on all tokens. Clamped to the decoder depth - 1. Release: 3.
        extra_tokens: tokens kept beyond those predicted now and at the previous step. Release: 15.
        retain: ``((start_progress, fraction), ...)``: lower bound on the fraction of the buffer+sequence
            tokens kept, by progress through the MAR steps. Lower = faster, less faithful.
        pinned_score: score given to the tokens predicted now and at the previous step before the
            ascending sort; the release uses 0 (similarities are near 1, so they sort first).
    """

    encoder: bool = True
    decoder: bool = True
    similarity_layer: int = 3
    extra_tokens: int = 15
    retain: tuple[tuple[float, float], ...] = RELEASED_RETAIN
    pinned_score: float = 0.0

    def __post_init__(self) -> None:
        if self.similarity_layer < 0:
            raise ValueError(f"similarity_layer must be >= 0, got {self.similarity_layer}")
        if self.extra_tokens < 0:
            raise ValueError(f"extra_tokens must be >= 0, got {self.extra_tokens}")
        starts = [s for s, _ in self.retain]
        if not self.retain or starts[0] != 0.0 or starts != sorted(starts):
            raise ValueError(f"retain must start at progress 0.0 and be sorted, got {self.retain}")
        if any(not 0.0 <= f <= 1.0 for _, f in self.retain):
            raise ValueError(f"retain fractions must be in [0, 1], got {self.retain}")

    def retain_at(self, step: int, num_iter: int) -> float:
        return piecewise_constant(step, num_iter, self.retain)


@dataclass
class EncoderCache:
    """Keys/values (R, H, P, d) and encoder outputs (R, P, D) of every position P = buffer + L."""

    kv: KVCache
    out: PositionBuffer

    @classmethod
    def of(cls, model) -> "EncoderCache":
        P = model.buffer_size + model.seq_len
        return cls(KVCache(P), PositionBuffer(P, dim=1))


@dataclass
class DecoderCache:
    """Keys/values (R, H, N, d) of the blocks after the similarity layer, that layer's values V of the
    previous step, and the last block's outputs (R, N, D), for all N = buffer + L positions."""

    kv: KVCache
    prev_v: PositionBuffer
    out: PositionBuffer

    @classmethod
    def of(cls, model) -> "DecoderCache":
        N = model.buffer_size + model.seq_len
        return cls(KVCache(N), PositionBuffer(N, dim=2), PositionBuffer(N, dim=1))


def encode(model, tokens: torch.Tensor, known: torch.Tensor, class_embedding: torch.Tensor,
           cache: EncoderCache, compute: torch.Tensor | None) -> torch.Tensor:
    """Encoder pass that computes only positions ``compute`` (None: all known) and caches as it goes.

    Args:
        model: the MAR.
        tokens: (R, L, C) current tokens; known: (R, buf + known) ascending positions of the buffer and
            the known tokens (``MAR.known_positions``).
        class_embedding: (R, D).
        cache: position-indexed cache, filled by a first call with ``compute=None``.
        compute: (R, n) ascending positions (buffer included) to compute, or None for every known one
            (then the known tokens attend to each other directly).

    Returns:
        (R, buffer + known, D) encoder outputs of the known positions in position order, as
        ``forward_mae_encoder`` returns them.
    """
    write_at = known if compute is None else compute
    x = gather_tokens(model.encoder_input(tokens, class_embedding), write_at)
    attention = CachedAttention(cache.kv, write_at, known, write_only=compute is None)
    x = model.run_blocks(model.encoder_blocks, x, attention)
    cache.out.write(write_at, model.encoder_norm(x))
    return cache.out.read(known)


def similarity_layer_of(model, config: TokenCacheConfig) -> int:
    return min(config.similarity_layer, len(model.decoder_blocks) - 1)


def select_tokens(v: torch.Tensor, prev_v: torch.Tensor, pinned: torch.Tensor, count: int,
                  pinned_score: float) -> torch.Tensor:
    """The ``count`` tokens whose values changed most, pinned tokens first: (R, count) ascending positions.

    Args:
        v, prev_v: (R, H, N, d) values of this and the previous step.
        pinned: (R, N) bool, tokens predicted now or at the previous step.
    """
    score = F.cosine_similarity(v.float(), prev_v.float(), dim=-1).mean(dim=1)  # (R, N)
    score = score.masked_fill(pinned, pinned_score)
    return score.argsort(dim=1, stable=True)[:, :count].sort(dim=1).values


class SimilarityAttention(AttentionStep):
    """The similarity layer's attention step: every position attends to every other, then only the
    positions ``choose`` picks from this step's values V go on (``kept``; None: all of them), and V is
    kept for the next step's comparison."""

    def __init__(self, prev_v: PositionBuffer, choose: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.prev_v, self.choose = prev_v, choose
        self.kept: torch.Tensor | None = None

    def prepare(self, blocks, x: torch.Tensor) -> None:
        attn = blocks[0].attn
        self.prev_v.allocate((x.shape[0], attn.num_heads, x.shape[1], attn.head_dim), compute_dtype(x), x.device)

    def __call__(self, layer: int, block, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = block.attn.attend(q, k, v)
        self.kept = None if self.choose is None else self.choose(v)
        self.prev_v.write(None, v)
        return gather_tokens(x, self.kept), gather_tokens(out, self.kept)


def decode(model, x: torch.Tensor, cache: DecoderCache, similarity_layer: int,
           choose: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Decoder blocks with selective recomputation; returns the last block's outputs (R, N, D).

    Args:
        x: (R, N, D) decoder input (``model.decoder_input``).
        cache: decoder cache, filled by a first call with ``choose=None``.
        similarity_layer: block whose values choose the tokens.
        choose: ``(v) -> (R, n) positions`` to recompute after the similarity layer's attention, or
            None to recompute all (refresh). Called with this step's values before ``prev_v`` is updated.
    """
    blocks = model.decoder_blocks
    x = model.run_blocks(blocks, x, stop=similarity_layer)
    similarity = SimilarityAttention(cache.prev_v, choose)
    x = model.run_blocks(blocks, x, similarity, start=similarity_layer, stop=similarity_layer + 1)
    # The kept tokens attend to every position: the others contribute their cached keys/values.
    x = model.run_blocks(blocks, x, CachedAttention(cache.kv, similarity.kept), start=similarity_layer + 1)
    cache.out.write(similarity.kept, x)
    return cache.out.read(rows=x.shape[0])


class TokenCache(Technique):
    """The token cache as a step technique: claims the encoder (``encoder``) and the decoder
    (``decoder``); refresh steps (``StepPlan.refresh``) recompute everything and refill the buffers.

    Args:
        model: the MAR.
        config: token cache settings.
        accel: the acceleration config, whose ``schedule_length`` lays out the retain table.
    """

    label = "LazyMAR's token cache"
    writes = frozenset({"encoder", "decoder"})

    def __init__(self, model, config: TokenCacheConfig, accel) -> None:
        super().__init__(model)
        self.config = config
        self.schedule_length = accel.schedule_length
        self.similarity_layer = similarity_layer_of(model, config)
        self.encoder_cache = EncoderCache.of(model)
        self.decoder_cache = DecoderCache.of(model)
        self.kept: dict[int, int | None] = {}  # step -> tokens the decoder recomputes (None: all)

    def plan_transformer(self, p: StepPlan) -> dict:
        N = self.model.seq_len + self.model.buffer_size
        claims = {"encoder": self} if self.config.encoder else {}
        if self.config.decoder:
            claims["decoder"] = self
            kept = None
            if not p.refresh:
                retain = self.config.retain_at(p.step, self.schedule_length(p.num_steps))
                count = keep_count(N, retain, p.n_pred, p.n_prev, self.config.extra_tokens)
                kept = None if count >= N else count
            self.kept[p.step] = kept
        return claims

    def run_encoder(self, p: StepPlan, inp: StepInputs) -> torch.Tensor:
        return incremental_encode(self.model, p, inp, self.encoder_cache, full=p.refresh)

    def run_decoder(self, p: StepPlan, inp: StepInputs, x: torch.Tensor) -> torch.Tensor:
        cache = self.decoder_cache
        count = self.kept[p.step]
        if count is None:  # everything is recomputed: skip the similarity bookkeeping
            return decode(self.model, x, cache, self.similarity_layer, None)
        pinned = self.model.with_buffer(inp.to_pred | inp.prev_rows())

        def choose(v: torch.Tensor) -> torch.Tensor:
            return select_tokens(v, cache.prev_v.read(rows=v.shape[0]), pinned, count, self.config.pinned_score)

        return decode(self.model, x, cache, self.similarity_layer, choose)

    def encoder_macs(self, p: StepPlan, s: ModelShape, rows: int) -> int:
        return incremental_encoder_macs(p, s, rows, full=p.refresh)

    def decoder_macs(self, p: StepPlan, s: ModelShape, rows: int) -> int:
        kept = self.kept[p.step] if self.config.decoder else None
        if kept is None:
            return super().decoder_macs(p, s, rows)
        N, D, Hd, sim = s.positions, s.dec_dim, s.dec_hidden, self.similarity_layer
        return rows * (decoder_embed_macs(s, s.buffer + p.n_known)
                       + sim * block_macs(D, Hd, N, N) + block_macs(D, Hd, N, N, kept)
                       + (s.dec_depth - sim - 1) * block_macs(D, Hd, kept, N))


def incremental_encode(model, p: StepPlan, inp: StepInputs, cache: EncoderCache, *, full: bool) -> torch.Tensor:
    """The incremental encoder of one step: everything when ``full``, else the buffer and the tokens
    generated at the previous step over the cached keys/values of the other known tokens. The first call
    allocates the buffers for all rows; later ones write the rows that run (the conditional half alone
    when the condition cache rebuilds the other)."""
    compute = None
    if not full:
        compute = positions(~model.with_buffer(~inp.prev_rows()), model.buffer_size + p.n_prev)  # ascending
    return encode(model, inp.tokens, inp.keep, inp.class_embedding, cache, compute)


def incremental_encoder_macs(p: StepPlan, s: ModelShape, rows: int, *, full: bool) -> int:
    """Multiply-adds of :func:`incremental_encode`: ``z_proj`` over every token (the input is embedded
    whole, then gathered), blocks for the computed queries over every known key."""
    n_keys = s.buffer + p.n_known
    return rows * encoder_macs(s, s.seq_len, n_keys if full else s.buffer + p.n_prev, n_keys)
