"""One way to run MAR's transformer blocks: a block range over the rows that run, with an optional cache.

Every sampler (plain MAR, and each acceleration technique) runs blocks through :meth:`MAR.run_blocks`,
which is :func:`run_blocks` on one of the model's block stacks. What a technique changes is the
attention step of a block, and it changes it the way diffusers swaps attention processors: it passes an
``attention`` callable that receives the block's queries, keys and values and returns the attention
output of the rows that go on (by default plain self-attention over the rows themselves). The loop, the
projections and the MLPs stay here, so compiling this one function (``MAR.compile_for_sampling``)
compiles the transformer of every technique, and a fix to the loop lands once.

The caches are gpt-fast's ``KVCache`` made position-indexed: :class:`PositionBuffer` holds a value per
sequence position (buffer + image tokens), allocated at its first write from the activations' shape,
dtype and device; :class:`KVCache` holds one key and one value buffer per block. A step writes the
fresh keys/values of the rows it runs and reads those of the positions its queries attend to
(:class:`CachedAttention`): positions that did not run contribute what they cached when they last ran.
Positions are (R, n) long tensors of ascending indices into buffer + sequence, the same count in every
row (masked decoding plans its counts), so nothing here reads a tensor into Python.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.blocks import Block

# ``(layer, block, x, q, k, v) -> (x, out)``: the attention of ``block`` (the ``layer``-th of its stack)
# for rows ``x`` (R, n, D) with their per-head queries, keys and values (R, H, n, d). Returns the rows
# that go on through the rest of the block (``x`` itself, or rows taken out or brought in) and their
# attention output before the projection (R, n', D).
Attention = Callable[[int, Block, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor]]


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, attention: Attention | None = None, *,
               start: int = 0, stop: int | None = None, checkpointed: bool = False) -> torch.Tensor:
    """Blocks ``start .. stop - 1`` of ``blocks`` over rows ``x`` (R, n, D) -> (R, n', D).

    Args:
        attention: the blocks' attention step (see :data:`Attention`); None is plain self-attention
            over the rows themselves, i.e. ``block(x)``.
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

    Allocated (zeros, the rows, dtype and device of its first write) when first written; later writes
    and reads may cover fewer rows (the first ``R``: the conditional half, when the condition cache runs
    it alone), never more.
    """

    def __init__(self, num_positions: int, dim: int) -> None:
        self.num_positions = num_positions
        self.dim = dim
        self.data: torch.Tensor | None = None

    def write(self, positions: torch.Tensor | None, x: torch.Tensor) -> None:
        """Store ``x`` at ``positions`` (R, n) of its rows; ``None``: ``x`` covers every position."""
        if self.data is None:
            shape = list(x.shape)
            shape[self.dim] = self.num_positions
            self.data = x.new_zeros(shape)
        elif x.shape[0] > self.data.shape[0]:
            raise ValueError(f"{x.shape[0]} rows written to a buffer allocated for {self.data.shape[0]}")
        buf = self.data[:x.shape[0]]
        if positions is None:
            buf.copy_(x)
        else:
            buf.scatter_(self.dim, _index(positions, buf.shape, self.dim), x.to(buf.dtype))

    def read(self, positions: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
        """The values at ``positions`` (R, n), or at every position of the first ``rows`` rows."""
        if positions is None:
            return self.data[:rows]
        buf = self.data[:positions.shape[0]]
        return buf.gather(self.dim, _index(positions, buf.shape, self.dim))


def _index(positions: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """(R, n) positions as a gather/scatter index along ``dim`` (1: tokens, 2: heads) of a tensor whose
    other sizes are ``shape``'s."""
    if dim == 1:
        return positions.unsqueeze(-1).expand(-1, -1, shape[-1])
    return positions[:, None, :, None].expand(shape[0], shape[1], -1, shape[3])


class KVCache:
    """Per-block keys and values (R, H, P, d) of every position P of one block stack."""

    def __init__(self, num_positions: int) -> None:
        self.num_positions = num_positions
        self.k: dict[int, PositionBuffer] = {}
        self.v: dict[int, PositionBuffer] = {}

    def update(self, layer: int, positions: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store block ``layer``'s fresh keys/values (R, H, n, d) at ``positions`` (None: every position)."""
        if layer not in self.k:
            self.k[layer] = PositionBuffer(self.num_positions, dim=2)
            self.v[layer] = PositionBuffer(self.num_positions, dim=2)
        self.k[layer].write(positions, k)
        self.v[layer].write(positions, v)

    def read(self, layer: int, positions: torch.Tensor | None = None,
             rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``layer``'s keys/values at ``positions`` (R, n), or at every position of ``rows`` rows."""
        return self.k[layer].read(positions, rows), self.v[layer].read(positions, rows)


class CachedAttention:
    """Attention through a :class:`KVCache`: the rows that run write their fresh keys/values at their
    ``positions``, then their queries attend to the cached keys/values at ``keys``.

    Args:
        cache: the stack's cache.
        positions: (R, n) positions of the rows that run; None: every position.
        keys: (R, m) positions the queries attend to, in this order; None: every position. When it is
            ``positions`` itself (the same object), the rows attend to their own fresh keys/values and the
            cache is only written (a step that recomputes everything it attends to).
    """

    def __init__(self, cache: KVCache, positions: torch.Tensor | None = None,
                 keys: torch.Tensor | None = None) -> None:
        self.cache, self.positions, self.keys = cache, positions, keys

    def __call__(self, layer: int, block: Block, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.update(layer, self.positions, k, v)
        if self.keys is not self.positions:
            k, v = self.cache.read(layer, self.keys, rows=x.shape[0])
        return x, block.attn.attend(q, k, v)
