"""``--compile`` / ``--cuda_graph`` sampling: the compiled steps give the eager tokens (to the vector
tolerance: fused arithmetic rounds differently in the last bits) and draw the same random stream."""
from __future__ import annotations

import argparse

import pytest
import torch

import lazymar  # noqa: F401  (registers accel=)
from conftest import build_tiny_mar
from util.compile import add_compile_args, apply_compile, compile_mode


def tokens(model, accel, cfg=3.0):
    with torch.no_grad():
        return model.sample_tokens(2, num_iter=6, cfg=cfg, labels=torch.tensor([1, 2]), accel=accel,
                                   generator=torch.Generator(model.fake_latent.device).manual_seed(0))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("accel", [None, "lazymar"])
def test_compiled_sampling_equals_eager(accel):
    model = build_tiny_mar(img_size=128, buffer_size=4, num_sampling_steps="10")
    eager = tokens(model, accel)
    model.compile_for_sampling()
    try:
        compiled = tokens(model, accel)
        assert "forward_modulated" in vars(model.diffloss.net) and "run_blocks" in vars(model)
    finally:
        model.eager_sampling()
    assert relative(compiled, eager) < 1e-5
    assert torch.equal(tokens(model, accel), eager)  # eager_sampling restores the eager methods exactly


def parse(*flags: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_compile_args(p)
    return p.parse_args(list(flags))


def test_flags_to_modes():
    assert compile_mode(parse(), "cpu") is None
    assert compile_mode(parse("--compile"), "cpu") == "default"
    with pytest.raises(ValueError, match="--cuda_graph needs a CUDA device"):
        compile_mode(parse("--cuda_graph"), "cpu")
    with pytest.raises(ValueError, match="unknown compile mode"):
        build_tiny_mar().compile_for_sampling("fastest")
    model = build_tiny_mar()
    apply_compile(model, None)
    assert "run_blocks" not in vars(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_sampling_equals_eager():
    model = build_tiny_mar(img_size=128, buffer_size=4, num_sampling_steps="10").cuda()
    eager = tokens(model, "lazymar")
    model.compile_for_sampling(compile_mode(parse("--cuda_graph"), "cuda"))
    try:
        tokens(model, "lazymar")  # recording
        graphed = tokens(model, "lazymar")
    finally:
        model.eager_sampling()
    assert relative(graphed, eager) < 1e-5
