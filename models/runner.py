"""One way to run MAR's transformer blocks: a block range over the rows that run, with an optional cache.

Every sampler (plain MAR, and each acceleration technique) runs blocks through :meth:`MAR.run_blocks`,
which is :func:`run_blocks` on one of the model's block stacks. What a technique changes is the
attention step of a block, and it changes it the way diffusers swaps attention processors: it passes an
:class:`AttentionStep` that receives the block's queries, keys and values and returns the attention
output of the rows that go on (by default plain self-attention over the rows themselves). The loop, the
projections and the MLPs stay here, so compiling this one function (``MAR.compile_for_sampling``)
compiles the transformer of every technique, and a fix to the loop lands once.

The caches are gpt-fast's ``KVCache`` made position-indexed: :class:`PositionBuffer` holds a value per
sequence position (buffer + image tokens); :class:`KVCache` holds one key and one value buffer per block. A
step writes the fresh keys/values of the rows it runs and reads those of the positions its queries attend
to (:class:`CachedAttention`): positions that did not run contribute what they cached when they last ran.
Positions are (R, n) long tensors of ascending indices into buffer + sequence, the same count in every
row (masked decoding plans its counts), so nothing here reads a tensor into Python.

What compiled code sees: :meth:`MAR.run_blocks` calls an attention step's :meth:`AttentionStep.prepare`
before the blocks run, outside compiled code, and the step allocates there every buffer it will write.
The compiled blocks then only index into tensors that exist, in objects whose layout is the same at every
call (dynamo guards on that layout: a cache whose buffers appear during the first call, or a step whose
fields alias by chance, would need another graph at every fresh call), and CUDA graphs
(``--cuda_graph``) never own a cache's memory.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.blocks import Block

class AttentionStep:
    """The attention step a technique passes to :func:`run_blocks` in place of plain self-attention."""

    def prepare(self, blocks: nn.ModuleList, x: torch.Tensor) -> None:
        """Allocate what the step writes while ``blocks`` run over rows ``x`` (R, n, D), before they run and
        outside compiled code (:meth:`MAR.run_blocks` calls it). Nothing by default."""

    def __call__(self, layer: int, block: Block, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention of ``block`` (the ``layer``-th of its stack) for rows ``x`` (R, n, D) with their
        per-head queries, keys and values (R, H, n, d): the rows that go on through the rest of the block
        (``x`` itself, or rows taken out or brought in) and their attention output before the projection
        (R, n', D)."""
        raise NotImplementedError


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a linear layer's output for float32 weights and input ``x``: autocast's where it is on
    for ``x``'s device (bf16/fp16 sampling), else ``x``'s. Keys, values and the head's features have it."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, attention: AttentionStep | None = None, *,
               start: int = 0, stop: int | None = None, checkpointed: bool = False) -> torch.Tensor:
    """Blocks ``start .. stop - 1`` of ``blocks`` over rows ``x`` (R, n, D) -> (R, n', D).

    Args:
        attention: the blocks' attention step, its state allocated (:meth:`AttentionStep.prepare`); None
            is plain self-attention over the rows themselves, i.e. ``block(x)``.
        checkpointed: recompute each block's activations in the backward pass (training).
    """
    for layer in range(start, len(blocks) if stop is None else stop):
        block = blocks[layer]
        if attention is None:
            x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
            continue
        q, k, v = block.qkv(x)
        x, out = attention(layer, block, x, q, k, v)
        x = block.finish(x, out)
    return x


class PositionBuffer:
    """A tensor indexed by sequence position along ``dim``: (R, P, D) tokens (``dim=1``) or (R, H, P, d)
    per-head keys/values (``dim=2``).

    Allocated (zeros) by :meth:`allocate`, or in eager code by the first write (its rows, dtype and
    device); later writes and reads may cover fewer rows (the first ``R``: the conditional half, when the
    condition cache runs it alone). A write over more rows than allocated reallocates (zeros, the old
    rows kept): a step that brings rows back (a guided step after unguided ones) recomputes and writes
    every position of them, which is the caller's duty (``StepPlan.new_rows`` forces a refresh).
    """

    def __init__(self, num_positions: int, dim: int) -> None:
        self.num_positions = num_positions
        self.dim = dim
        self.data: torch.Tensor | None = None

    def allocate(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        """Zeros for values of ``shape`` (its size along ``dim`` replaced by every position), unless
        allocated already for at least its rows."""
        if self.data is None or shape[0] > self.data.shape[0]:
            shape = list(shape)
            shape[self.dim] = self.num_positions
            old, self.data = self.data, torch.zeros(shape, dtype=dtype, device=device)
            if old is not None:
                self.data[:old.shape[0]] = old

    def write(self, positions: torch.Tensor | None, x: torch.Tensor) -> None:
        """Store ``x`` at ``positions`` (R, n) of its rows; ``None``: ``x`` covers every position."""
        if self.data is None and torch.compiler.is_compiling():
            raise RuntimeError("a buffer written by compiled blocks must be allocated before they run "
                               "(AttentionStep.prepare)")
        self.allocate(x.shape, x.dtype, x.device)
        buf = self.rows(x.shape[0])
        if positions is None:
            buf.copy_(x)
        else:
            buf.scatter_(self.dim, _index(positions, buf.shape, self.dim), x.to(buf.dtype))

    def read(self, positions: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
        """The values at ``positions`` (R, n), or at every position of the first ``rows`` rows."""
        if positions is None:
            return self.data if rows is None else self.rows(rows)
        buf = self.rows(positions.shape[0])
        return buf.gather(self.dim, _index(positions, buf.shape, self.dim))

    def rows(self, rows: int) -> torch.Tensor:
        """The first ``rows`` rows. ``narrow`` rather than ``[:rows]``: compiled with dynamic shapes, a
        slice's size is ``min(rows, allocated)``, which dynamo settles by fixing both sizes (a graph
        per batch size); ``narrow`` asks only that they fit."""
        return self.data.narrow(0, 0, rows)


def _index(positions: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """(R, n) positions as a gather/scatter index along ``dim`` (1: tokens, 2: heads) of a tensor whose
    other sizes are ``shape``'s."""
    if dim == 1:
        return positions.unsqueeze(-1).expand(-1, -1, shape[-1])
    return positions[:, None, :, None].expand(shape[0], shape[1], -1, shape[3])


class KVCache:
    """Per-block keys and values (R, H, P, d) of every position P of one block stack, allocated for every
    block at once (:meth:`allocate`) before the blocks run."""

    def __init__(self, num_positions: int) -> None:
        self.num_positions = num_positions
        self.k: list[PositionBuffer] = []
        self.v: list[PositionBuffer] = []

    def allocate(self, blocks: nn.ModuleList, x: torch.Tensor) -> None:
        """Zeros for every block of ``blocks`` running over rows ``x`` (R, n, D), in the dtype their keys
        and values have (:func:`compute_dtype`); nothing when allocated for at least these rows."""
        attn = blocks[0].attn
        shape = (x.shape[0], attn.num_heads, self.num_positions, attn.head_dim)  # (R, H, P, d)
        if not self.k:
            self.k, self.v = ([PositionBuffer(self.num_positions, dim=2) for _ in blocks] for _ in range(2))
        for buf in (*self.k, *self.v):
            buf.allocate(shape, compute_dtype(x), x.device)

    def update(self, layer: int, positions: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store block ``layer``'s fresh keys/values (R, H, n, d) at ``positions`` (None: every position)."""
        self.k[layer].write(positions, k)
        self.v[layer].write(positions, v)

    def read(self, layer: int, positions: torch.Tensor | None = None,
             rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``layer``'s keys/values at ``positions`` (R, n), or at every position of ``rows`` rows."""
        return self.k[layer].read(positions, rows), self.v[layer].read(positions, rows)


class CachedAttention(AttentionStep):
    """Attention through a :class:`KVCache`: the rows that run write their fresh keys/values at their
    ``positions``, then their queries attend to the cached keys/values at ``keys``.

    Args:
        cache: the stack's cache.
        positions: (R, n) positions of the rows that run; None: every position.
        keys: (R, m) positions the queries attend to, in this order; None: every position.
        write_only: the rows attend to their own fresh keys/values and the cache is only written (a step
            that recomputes everything it attends to); ``keys`` is then not read.
    """

    def __init__(self, cache: KVCache, positions: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                 *, write_only: bool = False) -> None:
        # Written only, ``keys`` is not read: not kept, so that no field aliases another (dynamo would guard
        # on the aliasing).
        self.cache, self.positions, self.write_only = cache, positions, write_only
        self.keys = None if write_only else keys

    def prepare(self, blocks: nn.ModuleList, x: torch.Tensor) -> None:
        self.cache.allocate(blocks, x)

    def __call__(self, layer: int, block: Block, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.update(layer, self.positions, k, v)
        if not self.write_only:
            k, v = self.cache.read(layer, self.keys, rows=x.shape[0])
        return x, block.attn.attend(q, k, v)
