"""``--compile`` / ``--cuda_graph`` sampling: every preset runs its transformer and its head through the
compiled code, batch after batch, without compiling again what it compiled; the compiled steps give the
eager tokens (exactly with a backend that runs the captured graphs as they are, to the vector tolerance
with inductor: fused arithmetic rounds differently in the last bits) and draw the same random stream."""
from __future__ import annotations

import argparse
from collections import Counter

import pytest
import torch

import lazymar
from conftest import build_tiny_mar
from lazymar import CSpDConfig
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


# 8x8 tokens, 2 decoder blocks: LazyMAR's similarity layer is the last block, so the blocks after it are
# an empty range, and at 24 steps its decoder drops tokens (steps 20-22). Batches of 2, 1, then 2 again:
# the second call of a shape must find every graph it needs compiled.
RESAMPLE_MODEL = dict(img_size=128, buffer_size=4, encoder_depth=1, decoder_depth=2, num_sampling_steps="10")
RESAMPLE_ITER = 24
RESAMPLE_BATCHES = (2, 1, 2)


def resample(model, accel, bsz: int) -> torch.Tensor:
    with torch.no_grad():
        return model.sample_tokens(bsz, num_iter=RESAMPLE_ITER, cfg=3.0, labels=torch.arange(1, bsz + 1),
                                   accel=accel, generator=torch.Generator().manual_seed(bsz))


def resample_accel(name: str | None):
    """A fresh target, the ``accel`` of ``name`` and the models it samples with (CSpD's draft too)."""
    target = build_tiny_mar(**RESAMPLE_MODEL)
    if name != "cspd":
        return target, name, [target]
    draft = build_tiny_mar(seed=1, encoder_embed_dim=16, decoder_embed_dim=16, diffloss_w=32, **RESAMPLE_MODEL)
    return target, CSpDConfig(draft=draft, ratio=0.2, num_draft=2), [target, draft]


@pytest.fixture(scope="module")
def backend():
    """One counting backend for the module's presets, as one process compiling several would share one
    (dynamo keeps a function's graphs per backend); dynamo's caches emptied before and after."""
    torch._dynamo.reset()
    yield CountingBackend()
    torch._dynamo.reset()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", [None, *lazymar.PRESETS, "cspd"])
def test_compiled_model_samples_again_at_other_batch_sizes_without_recompiling(backend, name):
    """A fresh compiled model samples as a script does, batch after batch (2, 1, then 2 again): every call
    runs compiled frames (not a silent fallback to eager, whose outputs would match too), the captured
    graphs are only the two compiled functions (no frame inside them compiled on its own), the second call
    of a shape compiles nothing (each call's fresh technique state passes the guards), and the tokens are
    the eager ones, bit for bit."""
    target, accel, models = resample_accel(name)
    eager = {bsz: resample(target, accel, bsz) for bsz in set(RESAMPLE_BATCHES)}
    for model in models:
        model.compile_for_sampling(backend=backend)
    try:
        for call, bsz in enumerate(RESAMPLE_BATCHES):
            graphs = sum(backend.graphs.values())
            backend.runs.clear()
            out = resample(target, accel, bsz)
            assert backend.runs["transformer"] > 0 and backend.runs["head"] > 0, (call, dict(backend.runs))
            assert set(backend.graphs) <= {"transformer", "head"}, dict(backend.graphs)
            if bsz in RESAMPLE_BATCHES[:call]:
                assert sum(backend.graphs.values()) == graphs, f"call {call} (batch {bsz}) compiled again"
            assert torch.equal(out, eager[bsz]), (call, bsz, relative(out, eager[bsz]))
    finally:
        for model in models:
            model.eager_sampling()


@pytest.mark.parametrize("accel", [None, "lazymar", "gtr+disa+lazymar"])
def test_compiled_sampling_equals_eager(accel):
    model = build_tiny_mar(img_size=128, buffer_size=4, num_sampling_steps="10")
    eager = tokens(model, accel)
    model.compile_for_sampling()
    try:
        compiled = tokens(model, accel)
        assert "forward_modulated" in vars(model.diffloss.net) and "block_runner" in vars(model)
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
    assert "block_runner" not in vars(model)


@pytest.mark.gpu
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


@pytest.mark.usefixtures("one_thread")
def test_eval_compile_lazymar_generates_every_batch_like_eager(backend, tmp_path, monkeypatch):
    """``eval.py --compile --lazy_mar`` on the demo model, as the seed paper's users run it: three batches
    (5, 5 and 2 images) in one process, every one through compiled frames, the second batch of 5 compiling
    nothing, and every image the eager run's, byte for byte. The graphs run as captured (the counting
    backend in place of inductor: what dynamo does is the same, without a C++ compiler)."""
    import eval as eval_script
    from models.mar import MAR

    compile_for_sampling, sample_tokens = MAR.compile_for_sampling, MAR.sample_tokens
    calls = []

    def counted(self, bsz, *args, **kwargs):
        graphs = sum(backend.graphs.values())
        backend.runs.clear()
        out = sample_tokens(self, bsz, *args, **kwargs)
        new_graphs = sum(backend.graphs.values()) - graphs
        calls.append((bsz, new_graphs, backend.runs["transformer"], backend.runs["head"]))
        return out

    monkeypatch.setattr(MAR, "compile_for_sampling",
                        lambda self, mode="default", **_: compile_for_sampling(self, mode, backend=backend))
    monkeypatch.setattr(MAR, "sample_tokens", counted)

    def run(*flags: str) -> dict[str, bytes]:
        out = tmp_path / ("compiled" if flags else "eager")
        eval_script.main(eval_script.build_parser().parse_args(
            ["--model", "demo", "--num_images", "12", "--eval_bsz", "5", "--num_iter", "8", "--num_sampling_steps",
             "10", "--lazy_mar", "--no_metrics", "--device", "cpu", "--output_dir", str(out), *flags]))
        (images,) = out.glob("*/images")
        return {p.name: p.read_bytes() for p in sorted(images.iterdir())}

    eager = run()
    calls.clear()
    compiled = run("--compile")
    assert [c[0] for c in calls] == [5, 5, 2]
    assert all(transformer > 0 and head > 0 for _, _, transformer, head in calls), calls
    assert calls[1][1] == 0, calls  # the second batch of 5: nothing compiled
    assert len(compiled) == 12 and compiled == eager
