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

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lazymar.indexing import gather_heads, gather_tokens, positions, scatter_heads, scatter_tokens
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
    """Per-layer keys/values (R, H, P, d) and encoder outputs (R, P, D) of every position P = buffer + L."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    out: torch.Tensor | None = None

    def rows(self, n: int) -> "EncoderCache":
        """View of the first ``n`` rows (the conditional half); writes go through to this cache."""
        return EncoderCache([k[:n] for k in self.k], [v[:n] for v in self.v], self.out[:n])


@dataclass
class DecoderCache:
    """Keys/values (R, H, N, d) of the blocks after the similarity layer, its previous values V, and the
    last block's outputs (R, N, D), for all N = buffer + L positions."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    prev_v: torch.Tensor | None = None
    out: torch.Tensor | None = None

    def rows(self, n: int) -> "DecoderCache":
        return DecoderCache([k[:n] for k in self.k], [v[:n] for v in self.v], self.prev_v[:n], self.out[:n])


def encode(model, tokens: torch.Tensor, known: torch.Tensor, class_embedding: torch.Tensor,
           cache: EncoderCache, compute: torch.Tensor | None) -> torch.Tensor:
    """Encoder pass that computes only positions ``compute`` (None: all known) and caches as it goes.

    Args:
        model: the MAR.
        tokens: (R, L, C) current tokens; known: (R, buf + known) ascending positions of the buffer and
            the known tokens (``MAR.known_positions``).
        class_embedding: (R, D).
        cache: position-indexed cache, filled by a first call with ``compute=None``.
        compute: (R, n) ascending positions (buffer included) to compute, or None for every known one.

    Returns:
        (R, buffer + known, D) encoder outputs of the known positions in position order, as
        ``forward_mae_encoder`` returns them.
    """
    P = tokens.shape[1] + model.buffer_size
    x = gather_tokens(model.encoder_input(tokens, class_embedding), known if compute is None else compute)
    write_at = known if compute is None else compute
    for layer, block in enumerate(model.encoder_blocks):
        q, k, v = block.qkv(x)
        k_buf, v_buf = _buffer(cache.k, layer, k, P), _buffer(cache.v, layer, v, P)
        scatter_heads(k_buf, write_at, k)
        scatter_heads(v_buf, write_at, v)
        if compute is None:  # every known token is fresh: attend over them directly
            attn = block.attn.attend(q, k, v)
        else:
            attn = block.attn.attend(q, gather_heads(k_buf, known), gather_heads(v_buf, known))
        x = block.finish(x, attn)
    x = model.encoder_norm(x)
    if cache.out is None:
        cache.out = x.new_zeros(x.shape[0], P, x.shape[2])
    scatter_tokens(cache.out, write_at, x)
    return gather_tokens(cache.out, known)


def _buffer(bufs: list[torch.Tensor], layer: int, like: torch.Tensor, n_pos: int) -> torch.Tensor:
    """Layer ``layer``'s (R, H, n_pos, d) buffer, allocated on first use (a refresh step, all rows) with
    the activations' dtype and device, so keys/values are cached in the dtype they are computed in."""
    if len(bufs) == layer:
        bufs.append(like.new_zeros(like.shape[0], like.shape[1], n_pos, like.shape[3]))
    return bufs[layer]


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


def decode(model, x: torch.Tensor, cache: DecoderCache, similarity_layer: int,
           choose: "callable | None") -> torch.Tensor:
    """Decoder blocks with selective recomputation; returns the last block's outputs (R, N, D).

    Args:
        x: (R, N, D) decoder input (``model.decoder_input``).
        cache: decoder cache (rows matching ``x``), filled by a first call with ``choose=None``.
        similarity_layer: block whose values choose the tokens.
        choose: ``(v) -> (R, n) positions`` to recompute after the similarity layer's attention, or
            None to recompute all (refresh). Called with this step's values before ``prev_v`` is updated.
    """
    blocks = model.decoder_blocks
    N = x.shape[1]
    for block in blocks[:similarity_layer]:
        x = block(x)
    block = blocks[similarity_layer]
    q, k, v = block.qkv(x)
    attn = block.attn.attend(q, k, v)
    kept = None if choose is None else choose(v)
    if cache.prev_v is None:
        cache.prev_v = torch.empty_like(v)
    cache.prev_v.copy_(v)
    x = block.finish(gather_tokens(x, kept), gather_tokens(attn, kept))
    for layer, block in enumerate(blocks[similarity_layer + 1:]):
        q, k, v = block.qkv(x)
        k_buf, v_buf = _buffer(cache.k, layer, k, N), _buffer(cache.v, layer, v, N)
        scatter_heads(k_buf, kept, k)
        scatter_heads(v_buf, kept, v)
        attn = block.attn.attend(q, k, v) if kept is None else block.attn.attend(q, k_buf, v_buf)
        x = block.finish(x, attn)
    if cache.out is None:
        cache.out = torch.empty_like(x)
    scatter_tokens(cache.out, kept, x)
    return cache.out


class TokenCache(Technique):
    """The token cache as a step technique: claims the encoder (``encoder``) and the decoder
    (``decoder``); refresh steps (``StepPlan.refresh``) recompute everything and refill the buffers.

    Args:
        model: the MAR.
        config: token cache settings.
        schedule_length: ``num_steps -> step count`` the retain table is laid out for.
    """

    def __init__(self, model, config: TokenCacheConfig, schedule_length) -> None:
        super().__init__(model)
        self.config = config
        self.schedule_length = schedule_length
        self.similarity_layer = similarity_layer_of(model, config)
        self.encoder_cache = EncoderCache()
        self.decoder_cache = DecoderCache()
        self.kept: dict[int, int | None] = {}  # step -> tokens the decoder recomputes (None: all)

    def plan(self, p: StepPlan) -> None:
        N = self.model.seq_len + self.model.buffer_size
        if self.config.encoder:
            p.encoder = self
        if self.config.decoder:
            p.decoder = self
            kept = None
            if not p.refresh:
                retain = self.config.retain_at(p.step, self.schedule_length(p.num_steps))
                count = keep_count(N, retain, p.n_pred, p.n_prev, self.config.extra_tokens)
                kept = None if count >= N else count
            self.kept[p.step] = kept

    def run_encoder(self, p: StepPlan, inp: StepInputs) -> torch.Tensor:
        return incremental_encode(self.model, p, inp, self.encoder_cache, full=p.refresh)

    def run_decoder(self, p: StepPlan, inp: StepInputs, x: torch.Tensor) -> torch.Tensor:
        R = x.shape[0]
        cache = self.decoder_cache if p.refresh else self.decoder_cache.rows(R)
        count = self.kept[p.step]
        if count is None:  # everything is recomputed: skip the similarity bookkeeping
            return decode(self.model, x, cache, self.similarity_layer, None)
        pinned = self.model.with_buffer(inp.to_pred | inp.prev_rows())

        def choose(v: torch.Tensor) -> torch.Tensor:
            return select_tokens(v, cache.prev_v, pinned, count, self.config.pinned_score)

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
    rows = cache if cache.out is None else cache.rows(inp.tokens.shape[0])
    compute = None
    if not full:
        compute = positions(~model.with_buffer(~inp.prev_rows()), model.buffer_size + p.n_prev)  # ascending
    return encode(model, inp.tokens, inp.keep, inp.class_embedding, rows, compute)


def incremental_encoder_macs(p: StepPlan, s: ModelShape, rows: int, *, full: bool) -> int:
    """Multiply-adds of :func:`incremental_encode`: ``z_proj`` over every token (the input is embedded
    whole, then gathered), blocks for the computed queries over every known key."""
    n_keys = s.buffer + p.n_known
    return rows * encoder_macs(s, s.seq_len, n_keys if full else s.buffer + p.n_prev, n_keys)
