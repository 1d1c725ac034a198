"""Process-group setup shared by the scripts that run under ``torchrun`` (eval.py, train.py).

One process per device: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` come from torchrun's environment, a
CUDA process takes GPU ``LOCAL_RANK`` (NCCL), a CPU one joins a gloo group. Without torchrun
(``WORLD_SIZE`` unset) nothing is initialised and the collectives below are no-ops.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from util.device import best_device

TIMEOUT_MIN = 30  # a collective waits this long for the slowest rank (e.g. rank 0 writing metrics)


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)`` of this process, joining the process group when there are several.

    Args:
        device: ``None`` takes this rank's GPU if there is one, else the CPU; ``"cuda"`` without an index
            takes this rank's GPU (or the current one in a single process).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = best_device(local_rank)
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=TIMEOUT_MIN),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return rank, world, dev


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def raise_everywhere(problem: BaseException | None, world: int) -> None:
    """Raise rank 0's ``problem`` (if any) on every rank, so that none waits at a collective for a rank
    that stopped."""
    if world > 1:
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise problem


def raise_if_any(problem: BaseException | None, world: int, device: torch.device) -> None:
    """A collective that every rank calls at the same point (e.g. after each batch): if any rank's
    ``problem`` is set, raise on every rank, its own problem on a rank that has one, elsewhere a
    ``RuntimeError`` naming the first failing rank and its error. So the ranks stop together instead of
    sampling on and then waiting :data:`TIMEOUT_MIN` minutes at a collective for a rank that stopped.
    One all-reduce of a flag (on ``device``: NCCL reduces CUDA tensors), and a gather of the messages
    only when a rank failed."""
    if world > 1:
        failed = torch.tensor([0.0 if problem is None else 1.0], device=device)
        dist.all_reduce(failed)
        if failed.item() > 0:
            messages = gather(None if problem is None else f"{type(problem).__name__}: {problem}", world)
            if problem is None:
                first = next(r for r, m in enumerate(messages) if m is not None)
                raise RuntimeError(f"rank {first} of {world} failed, so this one stops too: {messages[first]}")
    if problem is not None:
        raise problem


def gather(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leave the process group (at the end of a run, or when it stops)."""
    if is_distributed():
        dist.destroy_process_group()
