"""``--compile`` / ``--cuda_graph`` sampling: every preset runs its transformer and its head through the
compiled code, the compiled steps give the eager tokens (to the vector tolerance: fused arithmetic
rounds differently in the last bits) and draw the same random stream."""
from __future__ import annotations

import argparse
from collections import Counter

import pytest
import torch

import lazymar
from conftest import build_tiny_mar
from util.compile import add_compile_args, apply_compile, compile_mode


def tokens(model, accel, cfg=3.0, num_iter=6):
    with torch.no_grad():
        return model.sample_tokens(2, num_iter=num_iter, cfg=cfg, labels=torch.tensor([1, 2]), accel=accel,
                                   generator=torch.Generator(model.fake_latent.device).manual_seed(0))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graphs as they are and counts each run, by what
    the graph computes: the head's step (its input projection) or transformer blocks (their qkv)."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.graphs: Counter[str] = Counter()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        code = gm.code
        kind = "head" if "input_proj" in code else "transformer" if "qkv" in code else "other"
        self.graphs[kind] += 1

        def run(*args):
            self.runs[kind] += 1
            return gm.forward(*args)

        return run


@pytest.fixture(scope="module")
def compiled():
    """A model whose sampling is compiled with the counting backend (graphs are shared by the presets)."""
    torch._dynamo.reset()
    model = build_tiny_mar(img_size=128, buffer_size=4, decoder_depth=5, num_sampling_steps="22")
    backend = CountingBackend()
    model.compile_for_sampling(backend=backend)
    yield model, backend
    model.eager_sampling()
    torch._dynamo.reset()


@pytest.mark.parametrize("accel", [None, *lazymar.PRESETS])
def test_every_preset_runs_compiled_frames(compiled, accel):
    """Compiled frames ran for the transformer and for the head, not only outputs that match (which a
    silent fallback to eager would give too); the captured graphs compute what eager does."""
    model, backend = compiled
    backend.runs.clear()
    out = tokens(model, accel, num_iter=8)
    assert backend.runs["transformer"] > 0 and backend.runs["head"] > 0, dict(backend.runs)
    model.eager_sampling()
    try:
        eager = tokens(model, accel, num_iter=8)
    finally:
        model.compile_for_sampling(backend=backend)
    assert relative(out, eager) < 1e-5


@pytest.mark.parametrize("accel", [None, "lazymar", "gtr+disa+lazymar"])
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
@pytest.mark.parametrize("accel", ["lazymar", "gtr+disa+lazymar"])
def test_cuda_graph_sampling_equals_eager(accel):
    model = build_tiny_mar(img_size=128, buffer_size=4, num_sampling_steps="10").cuda()
    eager = tokens(model, accel)
    model.compile_for_sampling(compile_mode(parse("--cuda_graph"), "cuda"))
    try:
        tokens(model, accel)  # recording
        graphed = tokens(model, accel)
    finally:
        model.eager_sampling()
    assert relative(graphed, eager) < 1e-5
