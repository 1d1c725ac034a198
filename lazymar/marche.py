"""MARche (arXiv 2506.12035): cache-aware attention with selective KV refresh in MAR's decoder.

Each MAR step splits the decoder's positions (buffer + tokens) into an **active** set, which is
recomputed (queries, keys, values, MLP) in every block, and a **cached** set, which only contributes
the keys/values cached when it was last active. Active queries attend to the two sets kept in
separate buffers; the two partial softmax attentions are merged exactly with their log-sum-exps
(:func:`merge_partials`), so the result equals attention over the concatenation. Fresh keys/values
(and each block's input, for tokens that join later) are written back to the cache.

Active set: the tokens generated now and (``include_prev``) those generated at the previous step,
whose inputs just changed. At block ``score_layer`` the attention of the tokens generated now to the
cached tokens is aggregated over heads and queries; the most-attended cached tokens join the active
set (their input at that block is the cached one) so that it holds ``active_fraction`` of the tokens.
Every ``refresh_every`` MAR steps everything is recomputed. With ``active_fraction = 1`` every token
is active from the first block on and nothing is cached: plain MAR up to the order of floating-point
sums (a test holds it to that).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.indexing import gather_tokens, positions
from models.runner import AttentionStep, KVCache, PositionBuffer
from lazymar.plan import ModelShape, StepPlan, block_macs, decoder_embed_macs
from lazymar.schedules import scaled_count
from lazymar.technique import StepInputs, Technique
from lazymar.token_cache import EncoderCache, incremental_encode, incremental_encoder_macs


@dataclass(frozen=True)
class MARcheConfig:
    """MARche settings. The paper fixes a 64-token active set on 256 tokens and a full refresh every 3
    steps; what it leaves open is a field here.

    Attributes:
        active_fraction: active set size as a fraction of the image tokens (64 / 256 = 0.25); 1.0 makes
            every position active, the buffer included.
        refresh_every: recompute everything every this many MAR steps (step % refresh_every == 0).
        score_layer: 0-based decoder block where cached tokens are scored and the active set grows
            (the paper's "2nd layer" = 1). Clamped to the decoder depth - 1.
        score_reduce: aggregation of the attention probabilities over heads and queries: ``"mean"`` or
            ``"max"``.
        include_prev: the tokens generated at the previous step are active (their input changed from
            the mask token to a value).
        cache_encoder: also cache the encoder (LazyMAR's incremental encoder: only the buffer and the
            tokens generated at the previous step are computed on cached steps).
    """

    active_fraction: float = 0.25
    refresh_every: int = 3
    score_layer: int = 1
    score_reduce: str = "mean"
    include_prev: bool = True
    cache_encoder: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.active_fraction <= 1.0:
            raise ValueError(f"active_fraction must be in [0, 1], got {self.active_fraction}")
        if self.refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {self.refresh_every}")
        if self.score_layer < 0:
            raise ValueError(f"score_layer must be >= 0, got {self.score_layer}")
        if self.score_reduce not in ("mean", "max"):
            raise ValueError(f"score_reduce must be 'mean' or 'max', got {self.score_reduce!r}")

    def active_count(self, seq_len: int, buffer_size: int) -> int:
        """Active positions on a partial step: ``active_fraction`` of the image tokens (rounded half up),
        or every position, buffer included, at ``active_fraction = 1``."""
        if self.active_fraction >= 1.0:
            return seq_len + buffer_size
        return scaled_count(self.active_fraction, seq_len)

    def is_refresh(self, step: int) -> bool:
        return step % self.refresh_every == 0


# ------------------------------------------------------------------------------------- attention
def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` (B, H, Nq, d) over one key set (B, H, Nk, d).

    Returns the normalised output (B, H, Nq, d), the log-sum-exp of the scores (B, H, Nq) and the
    scores themselves (B, H, Nq, Nk), which the caller can turn into probabilities once the total
    log-sum-exp is known. An empty key set gives output 0 and log-sum-exp -inf.
    """
    scores = (q * scale) @ k.transpose(-2, -1)
    if k.shape[-2] == 0:
        return torch.zeros_like(q), q.new_full(q.shape[:-1], float("-inf")), scores
    scores32 = scores.float()
    lse = torch.logsumexp(scores32, dim=-1)
    out = torch.exp(scores32 - lse.unsqueeze(-1)).to(v.dtype) @ v
    return out, lse, scores


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention over the union of two key sets from their normalised partial outputs.

    ``softmax([s_a, s_b]) @ [v_a; v_b] = w_a * out_a + w_b * out_b`` with
    ``w = exp(lse_part - lse_total)`` and ``lse_total = logaddexp(lse_a, lse_b)``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1).to(out_a.dtype)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1).to(out_b.dtype)
    return w_a * out_a + w_b * out_b, lse


def heads_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H*d), the layout the block's projection takes."""
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)


# ------------------------------------------------------------------------------------- decoder
@dataclass
class MARcheCache:
    """Per decoder block, position-indexed over all N = buffer + L positions: keys/values (R, H, N, d)
    and block inputs (R, N, D); and the last block's outputs (R, N, D)."""

    kv: KVCache
    inputs: dict[int, PositionBuffer]
    out: PositionBuffer

    @classmethod
    def of(cls, model) -> "MARcheCache":
        N = model.buffer_size + model.seq_len
        return cls(KVCache(N), {layer: PositionBuffer(N, dim=1) for layer in range(len(model.decoder_blocks))},
                   PositionBuffer(N, dim=1))


def score_cached(scores: torch.Tensor, lse_total: torch.Tensor, query_rows: torch.Tensor,
                 reduce: str) -> torch.Tensor:
    """(R, Nc) attention mass of the chosen queries on each cached key, aggregated over heads and queries.

    Args:
        scores: (R, H, Nq, Nc) raw scores of the active queries on the cached keys.
        lse_total: (R, H, Nq) log-sum-exp over all keys (cached and active).
        query_rows: (R, g) indices into the Nq active queries (the tokens generated now).
    """
    R, H, _, Nc = scores.shape
    idx = query_rows[:, None, :, None].expand(R, H, -1, Nc)
    lse = lse_total.gather(2, query_rows[:, None, :].expand(R, H, -1))
    probs = torch.exp(scores.float().gather(2, idx) - lse.unsqueeze(-1))
    probs = probs.permute(0, 3, 1, 2).reshape(R, Nc, -1)  # (R, Nc, H*g)
    return probs.mean(dim=-1) if reduce == "mean" else probs.amax(dim=-1)


class CacheAwareAttention(AttentionStep):
    """MARche's attention step.

    On a refresh step (``active=None``) every position runs and attends to every other, and the cache
    is filled. Otherwise the active positions run: their queries attend to the cached set's keys/values
    and to their own fresh ones, the two partial attentions merged exactly. At ``score_layer`` the
    cached tokens the generated tokens attend to most join the active set (their input is the cached
    one) up to ``active_count``. Fresh inputs, keys and values are written back; ``active`` ends as the
    positions that ran the last block.

    Args:
        cache: MARche's cache (rows: those of the refresh that filled it).
        active: (R, nb) positions active from the first block, or None (refresh).
        generated: (R, g) indices into ``active`` of the tokens generated now.
        active_count: the active set size from ``score_layer`` on (at least ``nb``).
        score_layer / score_reduce: where and how cached tokens are scored.
    """

    def __init__(self, cache: MARcheCache, active: torch.Tensor | None, generated: torch.Tensor | None,
                 active_count: int, score_layer: int, score_reduce: str) -> None:
        self.cache, self.active, self.generated = cache, active, generated
        self.active_count, self.score_layer, self.score_reduce = active_count, score_layer, score_reduce
        if active is not None:
            # The split changes only at the score layer: computed once here, updated there.
            R, N = active.shape[0], cache.out.num_positions
            self.is_active = torch.zeros(R, N, dtype=torch.bool, device=active.device).scatter_(1, active, True)
            self.cached = positions(~self.is_active, N - active.shape[1])

    def prepare(self, blocks, x: torch.Tensor) -> None:
        self.cache.kv.allocate(blocks, x)
        for buf in self.cache.inputs.values():  # each block's input (R, N, D)
            buf.allocate(x.shape, x.dtype, x.device)

    def __call__(self, layer: int, block, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache, act = self.cache, self.active
        if act is None:  # refresh: plain attention, filling every buffer
            cache.inputs[layer].write(None, x)
            cache.kv.update(layer, None, k, v)
            return x, block.attn.attend(q, k, v)
        scale = block.attn.scale
        out, lse, s_c = self.attend(layer, q, k, v, scale)
        extra = self.active_count - act.shape[1]
        if layer == self.score_layer and extra > 0 and self.cached.shape[1] > 0:
            score = score_cached(s_c, lse, self.generated, self.score_reduce)
            chosen = self.cached.gather(1, score.topk(min(extra, self.cached.shape[1]), dim=1).indices)
            x_new = cache.inputs[layer].read(chosen)
            q_n, k_n, v_n = block.qkv(x_new)
            act, x = torch.cat([act, chosen], 1), torch.cat([x, x_new], 1)
            q, k, v = torch.cat([q, q_n], 2), torch.cat([k, k_n], 2), torch.cat([v, v_n], 2)
            # The chosen tokens move from the cached to the active set: attend again over the new split.
            self.is_active.scatter_(1, chosen, True)
            self.cached = positions(~self.is_active, self.is_active.shape[1] - act.shape[1])
            self.active = act
            out, _, _ = self.attend(layer, q, k, v, scale)
        cache.inputs[layer].write(act, x)
        cache.kv.update(layer, act, k, v)
        return x, heads_to_tokens(out)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention over the cached set and the active set, merged; with the cached set's scores."""
        k_c, v_c = self.cache.kv.read(layer, self.cached)
        out_c, lse_c, s_c = partial_attention(q, k_c, v_c, scale)
        out_a, lse_a, _ = partial_attention(q, k, v, scale)
        out, lse = merge_partials(out_c, lse_c, out_a, lse_a)
        return out, lse, s_c


def marche_decode(model, x: torch.Tensor, cache: MARcheCache, config: MARcheConfig,
                  base: torch.Tensor | None, generated: torch.Tensor | None, active_count: int) -> torch.Tensor:
    """Decoder blocks with cache-aware attention; returns the last block's outputs (R, N, D).

    Args:
        x: (R, N, D) decoder input.
        cache: filled by a first call with ``base=None``.
        base: (R, nb) positions active from the first block, or None to compute every position
            (a refresh step, which fills the cache).
        generated: (R, g) indices into ``base`` of the tokens generated now (their attention scores the
            cached tokens); ignored on refresh.
        active_count: the active set size from ``score_layer`` on (at least ``nb``).
    """
    blocks = model.decoder_blocks
    attention = CacheAwareAttention(cache, base, generated, active_count,
                                    min(config.score_layer, len(blocks) - 1), config.score_reduce)
    x = gather_tokens(x, base)
    x = model.run_blocks(blocks, x, attention)
    cache.out.write(attention.active, x)
    return cache.out.read(rows=x.shape[0])


def marche_decoder_macs(s: ModelShape, n_base: int, n_active: int, score_layer: int) -> int:
    """Decoder block MACs of a partial MARche step (one row): ``n_base`` active queries up to
    ``score_layer``, where the active set grows to ``n_active`` (the newcomers' qkv and a second
    attention pass), then ``n_active``; every query attends over all positions (cached and active)."""
    N, D, Hd = s.positions, s.dec_dim, s.dec_hidden
    macs = score_layer * block_macs(D, Hd, n_base, N)
    if n_active > n_base:
        macs += (n_base * D * 3 * D + 2 * n_base * N * D  # first pass, which scores the cached tokens
                 + (n_active - n_base) * D * 3 * D + 2 * n_active * N * D + n_active * (D * D + 2 * D * Hd))
    else:
        macs += block_macs(D, Hd, n_base, N)
    return macs + (s.dec_depth - score_layer - 1) * block_macs(D, Hd, n_active, N)


class MARche(Technique):
    """MARche as a step technique: claims the decoder (and, with ``cache_encoder``, the encoder).

    A step recomputes everything on MARche's refresh steps and whenever the condition cache records the
    guidance residual (so that the unconditional rows' keys/values never go stale); other steps run the
    active set only.
    """

    label = "MARche"
    writes = frozenset({"encoder", "decoder"})

    def __init__(self, model, config: MARcheConfig, accel=None) -> None:
        super().__init__(model)
        self.config = config
        self.cache = MARcheCache.of(model)
        self.encoder_cache = EncoderCache.of(model)
        self.active_count = config.active_count(model.seq_len, model.buffer_size)
        self.full: dict[int, bool] = {}

    def plan_transformer(self, p: StepPlan) -> dict:
        # Reads the rows phase: a step where the condition cache records the guidance residual runs the
        # unconditional half, whose cached keys/values are as old as the last such step.
        # A step that runs rows the cache does not hold (interval guidance) recomputes everything too.
        self.full[p.step] = p.step == 0 or self.config.is_refresh(p.step) or p.uncond_refresh or p.new_rows
        return {"decoder": self, "encoder": self} if self.config.cache_encoder else {"decoder": self}

    def encoder_full(self, p: StepPlan) -> bool:
        # With every position active nothing is cached, the encoder included.
        return self.full[p.step] or self.active_count >= self.model.seq_len + self.model.buffer_size

    def run_encoder(self, p: StepPlan, inp: StepInputs) -> torch.Tensor:
        return incremental_encode(self.model, p, inp, self.encoder_cache, full=self.encoder_full(p))

    def run_decoder(self, p: StepPlan, inp: StepInputs, x: torch.Tensor) -> torch.Tensor:
        model, (R, N, _) = self.model, x.shape
        if self.full[p.step]:
            return marche_decode(model, x, self.cache, self.config, None, None, self.active_count)
        gen = positions(model.with_buffer(inp.to_pred), p.n_pred)  # (R, g): generated now, first in the active set
        base = gen
        if self.config.include_prev:
            prev = positions(model.with_buffer(inp.prev_rows() & ~inp.to_pred), p.n_prev)
            base = torch.cat([gen, prev], dim=1)
        generated = torch.arange(gen.shape[1], device=x.device).expand(R, -1)
        active = max(self.active_count, base.shape[1])
        if active >= N:  # the active set is everything: active from the first block on
            inactive = ~torch.zeros(R, N, dtype=torch.bool, device=x.device).scatter_(1, base, True)
            base = torch.cat([base, positions(inactive, N - base.shape[1])], dim=1)
        return marche_decode(model, x, self.cache, self.config, base, generated, active)

    def encoder_macs(self, p: StepPlan, s: ModelShape, rows: int) -> int:
        return incremental_encoder_macs(p, s, rows, full=self.encoder_full(p))

    def decoder_macs(self, p: StepPlan, s: ModelShape, rows: int) -> int:
        if self.full[p.step]:
            return super().decoder_macs(p, s, rows)
        n_base = p.n_pred + (p.n_prev if self.config.include_prev else 0)
        n_active = min(s.positions, max(self.active_count, n_base))
        if n_active >= s.positions:  # every position is active from the first block on
            n_base = n_active
        score_layer = min(self.config.score_layer, s.dec_depth - 1)
        return rows * (decoder_embed_macs(s, s.buffer + p.n_known)
                       + marche_decoder_macs(s, n_base, n_active, score_layer))
