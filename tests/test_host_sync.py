"""Sampling makes no host synchronisation per MAR step, with every preset and with CSpD.

Token counts come from the plan, so gathers and scatters use index tensors built from the orders;
``nonzero``, boolean indexing, ``masked_select``, reading a tensor into Python (``.item()``, ``if t``,
``.tolist()``) or copying it to the host (``.cpu()``, ``.numpy()``) would each make a GPU wait for the
host. The counter sees every aten op the sampler issues, and the Tensor methods that read data without
an aten op on a CPU tensor. Random draws come from a generator on the sampling device, as they must on a
GPU (a CPU generator's noise is a blocking copy per head step).
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lazymar
from conftest import build_tiny_mar

# aten ops whose result size or value must be read on the host.
SYNCING = {"aten.nonzero", "aten.masked_select", "aten._local_scalar_dense", "aten.is_nonzero", "aten.equal",
           "aten.unique_consecutive", "aten._unique2", "aten.unique_dim", "aten.bincount", "aten.allclose"}
# Tensor methods that hand data to Python; on a CPU tensor some issue no aten op at all.
READS = ("tolist", "item", "cpu", "numpy")
# A tensor made from Python data inside the call: on an accelerator a blocking copy to the device.
HOST_DATA = "aten.lift_fresh"

# 8x8 tokens, 5 decoder blocks, 22 head steps and 24 MAR steps: LazyMAR's decoder drops tokens (from step
# 20) and its head cache reuses (every other head step); every other technique acts too.
MODEL = dict(img_size=128, buffer_size=4, decoder_depth=5, num_sampling_steps="22")
NUM_ITER = 24


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops and Tensor reads that copy a data-dependent result to the host (and, with
    ``host_data``, tensors made from Python data)."""

    def __init__(self, host_data: bool = False) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.host_data = host_data
        self.saved: dict[str, object] = {}

    def __enter__(self):
        for name in READS:
            self.saved[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _counting(self, name, original):
        def method(tensor, *args, **kwargs):
            self.ops[f"Tensor.{name}"] += 1
            return original(tensor, *args, **kwargs)
        return method

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None)
        # repeat_interleave with a tensor of repeats must read their sum, unless given it.
        repeats = func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
        if name in SYNCING or bool_index or repeats or (self.host_data and name == HOST_DATA):
            self.ops[name] += 1
        return func(*args, **kwargs)


def sample(model, accel, cfg: float, num_iter: int = NUM_ITER) -> torch.Tensor:
    device = model.fake_latent.device
    with torch.no_grad():
        return model.sample_tokens(2, num_iter=num_iter, cfg=cfg, accel=accel,
                                   generator=torch.Generator(device).manual_seed(0))


def sync_ops(model, accel, cfg: float, host_data: bool = False) -> Counter[str]:
    with SyncCounter(host_data) as counter:
        sample(model, accel, cfg)
    return counter.ops


@pytest.fixture(scope="module")
def model():
    return build_tiny_mar(**MODEL)


@pytest.mark.parametrize("accel", [None, *lazymar.PRESETS])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_no_host_sync(model, accel, cfg):
    assert sync_ops(model, accel, cfg) == Counter()


@pytest.mark.parametrize("accel", [None, "lazymar", "gtr+disa+lazymar", "marche+lazymar", "recap+lazymar"])
def test_no_host_data_once_warm(model, accel):
    """Constants a generation needs on the device (timestep tables, GtR's stage map) are made once per
    process: a second identical call builds no tensor from Python data (a copy to the device per head call
    would wait for the GPU at every MAR step)."""
    sample(model, accel, 3.0)
    assert sync_ops(model, accel, 3.0, host_data=True) == Counter()


@pytest.fixture(scope="module")
def draft():
    """A narrower MAR of the same token grid and head steps: a draft for CSpD."""
    return build_tiny_mar(seed=1, **MODEL, encoder_embed_dim=16, decoder_embed_dim=16, diffloss_w=32)


@pytest.mark.parametrize("head_cache", [None, "lazymar-head"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cspd_no_host_sync(model, draft, cfg, head_cache):
    """CSpD decides every draft and runs its residual rounds on the device (a fixed number of rounds, the
    updates past the release's stop masked); the acceptance counts are read when the statistics are
    read, after the generation. A second call builds no tensor from Python data either."""
    log = lazymar.StatsLog()
    # Random weights: drafts far from the target's tokens; Ti 1e6 keeps 30 of 120 (measured).
    # 8 residual rounds instead of 100: the same code, 3 s less of the counter's per-op dispatch.
    accel = lazymar.cspd_preset("cspd", draft, inner_temperature=1e6, residual_rounds=8, on_stats=log,
                                draft_accel=head_cache, target_accel=head_cache)
    sample(model, accel, cfg)
    assert sync_ops(model, accel, cfg, host_data=True) == Counter()
    stats = log.last
    # Both outcomes happened: some drafts kept, some replaced by residual samples after residual rounds.
    assert 0 < stats.accepted < stats.verified and all(v.residual_rounds >= 1 for v in stats.verifications)


def test_cspd_release_reads_once_per_residual_round(model, draft):
    """The release's rounds stop by a host read (``residual_exit="early"``, kept in ``cspd-release`` so that
    its random stream, and the released vectors, reproduce): one read before each round it runs and one
    that stops it, at most ``residual_rounds`` per verification, and nothing else."""
    log = lazymar.StatsLog()
    accel = lazymar.cspd_preset("cspd-release", draft, inner_temperature=1e6, on_stats=log)
    ops = sync_ops(model, accel, 3.0)
    rounds = [v.residual_rounds for v in log.last.verifications]
    assert ops == Counter({"aten._local_scalar_dense": sum(min(r + 1, accel.residual_rounds) for r in rounds)})
    assert max(rounds) >= 1


def test_counter_sees_what_it_must():
    """The counter is not blind: the operations it must catch are caught, also from Tensor methods."""
    x, m = torch.randn(4, 3), torch.tensor([True, False, True, False])
    with SyncCounter(host_data=True) as counter:
        m.nonzero()
        torch.nonzero(m)
        x[m]
        x[m] = 0.0
        bool(m.any())
        x.tolist()
        x[0, 0].item()
        x.cpu()
        x.numpy()
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0]))
        torch.bincount(torch.tensor([0, 1, 1]))
        torch.unique(x, dim=0)
        torch.allclose(x, x)
    ops = dict(counter.ops)
    assert ops.pop("aten.lift_fresh") >= 2  # the torch.tensor calls
    assert ops.pop("aten._local_scalar_dense") >= 2  # bool(), .item() (allclose may read its result too)
    assert ops == {"aten.nonzero": 2, "aten.index": 1, "aten.index_put_": 1, "Tensor.tolist": 1, "Tensor.item": 1,
                   "Tensor.cpu": 1, "Tensor.numpy": 1, "aten.repeat_interleave": 1, "aten.bincount": 1,
                   "aten.unique_dim": 1, "aten.allclose": 1}


def test_labels_check_is_once_per_call_not_per_step(model):
    """Checking user labels reads them once; the count does not grow with the number of MAR steps."""

    def count(num_iter):
        with torch.no_grad(), SyncCounter() as counter:
            model.sample_tokens(2, num_iter=num_iter, cfg=3.0, labels=torch.tensor([1, 2]), accel="lazymar",
                                generator=torch.Generator().manual_seed(0))
        return counter.ops

    assert count(4) == count(16)
