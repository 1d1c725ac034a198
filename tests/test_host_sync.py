"""The plain and LazyMAR samplers make no host synchronisation per MAR step.

Token counts come from the schedule, so gathers and scatters use index tensors built from the orders;
``nonzero``, boolean indexing, ``masked_select`` and reading a tensor into Python (``.item()``, ``if t``)
would each make a GPU wait for the host. The counter sees every aten op the sampler issues.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lazymar  # noqa: F401  (registers accel=)
from conftest import build_tiny_mar

SYNCING = {"aten.nonzero", "aten.masked_select", "aten._local_scalar_dense", "aten.is_nonzero", "aten.equal",
           "aten.unique_consecutive", "aten._unique2"}


class SyncCounter(TorchDispatchMode):
    """Counts aten ops that copy a data-dependent result to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None)
        if name in SYNCING or bool_index:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def sync_ops(model, accel, num_iter: int, cfg: float) -> Counter[str]:
    with torch.no_grad(), SyncCounter() as counter:
        model.sample_tokens(2, num_iter=num_iter, cfg=cfg, accel=accel,
                            generator=torch.Generator().manual_seed(0))
    return counter.ops


@pytest.mark.parametrize("accel", [None, "lazymar"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_no_host_sync_in_the_step_loop(accel, cfg):
    model = build_tiny_mar(img_size=128, buffer_size=4, decoder_depth=5, num_sampling_steps="10")
    assert sync_ops(model, accel, num_iter=12, cfg=cfg) == Counter()


def test_counter_sees_nonzero_and_boolean_indexing():
    """The counter is not blind: the operations it must catch are caught, also from Tensor methods."""
    x, m = torch.randn(4, 3), torch.tensor([True, False, True, False])
    with SyncCounter() as counter:
        m.nonzero()
        torch.nonzero(m)
        x[m]
        x[m] = 0.0
        bool(m.any())
    assert counter.ops == Counter({"aten.nonzero": 2, "aten.index": 1, "aten.index_put_": 1,
                                   "aten._local_scalar_dense": 1})


def test_labels_check_is_once_per_call_not_per_step():
    """Checking user labels reads them once; the count does not grow with the number of MAR steps."""
    model = build_tiny_mar(img_size=128, buffer_size=4, num_sampling_steps="10")

    def count(num_iter):
        with torch.no_grad(), SyncCounter() as counter:
            model.sample_tokens(2, num_iter=num_iter, cfg=3.0, labels=torch.tensor([1, 2]), accel="lazymar",
                                generator=torch.Generator().manual_seed(0))
        return counter.ops

    assert count(4) == count(16)
