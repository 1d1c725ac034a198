"""Sampling on a CUDA device that is not there: device placement checked without a GPU.

``FakeTensorMode`` gives tensors a device and a shape but no data: on a CPU-only machine it accepts
``device="cuda"``, and it raises on an operation that mixes a CUDA tensor with a CPU one (a tensor left on
the host, which a user's GPU would only report at run time) or with a real tensor made outside the mode
(a constant kept across calls), and on any read of a value (a host synchronisation). Every preset samples
a fake-CUDA tiny MAR here, in float32 and under bf16 autocast, whose CUDA casting rules differ from the
CPU's (it runs ``einsum`` in bf16: the tokens' layout change used it, and returned bf16 tokens on a GPU).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

import lazymar
import lazymar.gtr
import models.diffloss
from conftest import build_tiny_mar
from lazymar import CSpDConfig

# 8x8 tokens, 12 MAR steps: every technique acts (the scaled LazyMAR's decoder drops tokens from step 4,
# MARche runs its cached steps, ReCAP its cheap ones), in few operations (each costs ~0.2 ms fake).
MODEL = dict(img_size=128, buffer_size=4, encoder_depth=1, decoder_depth=2, num_sampling_steps="4")
NUM_ITER = 12
# Functions that keep a tensor per device for the process: a fake one must not outlive its test (a real
# CUDA run after it in the same process would get it).
DEVICE_CACHES = (models.diffloss._frequencies, models.diffloss._timesteps_on, lazymar.gtr._stages_on)


@pytest.fixture(autouse=True)
def _no_fake_tensors_kept():
    for cache in DEVICE_CACHES:
        cache.cache_clear()
    yield
    for cache in DEVICE_CACHES:
        cache.cache_clear()


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype):
    """``torch.autocast("cuda", dtype)`` where CUDA is missing: the context manager disables itself there,
    so this sets the state its ``__enter__`` sets (the dispatcher applies CUDA autocast to fake CUDA
    tensors all the same)."""
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])
        torch.clear_autocast_cache()


def fake_cuda_sample(name: str | None, precision: str, conditional: bool = True) -> torch.Tensor:
    """Tokens of a fresh tiny MAR (and CSpD's draft) built and sampled on fake CUDA with preset ``name``,
    classes 1 and 2 (``conditional``) or unconditional."""
    with FakeTensorMode():
        with torch.device("cuda"):  # the weights made there (moving fake parameters is refused)
            target = build_tiny_mar(**MODEL)
            accel = name
            if name == "cspd":
                draft = build_tiny_mar(seed=1, encoder_embed_dim=16, decoder_embed_dim=16, diffloss_w=32, **MODEL)
                accel = CSpDConfig(draft=draft, ratio=0.2, num_draft=2)
        labels = torch.tensor([1, 2], device="cuda") if conditional else None
        autocast = cuda_autocast(torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            return target.sample_tokens(2, num_iter=NUM_ITER, cfg=3.0, labels=labels, accel=accel)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", [None, *lazymar.PRESETS])
def test_every_preset_samples_on_a_fake_cuda_device(name, precision):
    """Runs to the end on the device (no CPU tensor, no host read) and returns float32 tokens there."""
    tokens = fake_cuda_sample(name, precision)
    assert is_fake(tokens) and tokens.device.type == "cuda"
    assert tokens.shape == (2, 16, 8, 8) and tokens.dtype == torch.float32  # tokens carried in float32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cspd_samples_on_a_fake_cuda_device(precision):
    """Unconditional: CSpD checks the labels against the draft's classes on the host before anything runs.
    With fixed residual rounds (``cspd``'s default, issue 29 item 4) nothing after that reads the device:
    its acceptance counts stay on the device until read after the generation."""
    tokens = fake_cuda_sample("cspd", precision, conditional=False)
    assert is_fake(tokens) and tokens.device.type == "cuda" and tokens.shape == (2, 16, 8, 8)
