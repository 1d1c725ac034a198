"""The benchmark scripts report what they claim: latency from the clock, FLOPs from the formula, and
each component's time attributed to it (no real timing is asserted: the clock is scripted)."""
from __future__ import annotations

import types
from contextlib import ExitStack, contextmanager

import torch

import benchmarks.sampling
import util.timing
from conftest import build_tiny_mar
from benchmarks.sampling import bench, format_rows
from lazymar.flops import estimate
from models.vae import AutoencoderKL
from benchmarks.profile_sampler import profile


def test_bench_rows_pair_latency_with_flops(monkeypatch):
    model = build_tiny_mar(img_size=128, buffer_size=4, num_sampling_steps="20")
    scripted = iter([6.0, 1.5, 3.0])  # median seconds per call of plain, lazymar, lazymar-off
    calls = []

    def fake_median_time(fn, device, repeats, warmup=None):
        fn()  # the generation really runs (it must not raise), but its time is the scripted one
        calls.append(repeats)
        return next(scripted)

    monkeypatch.setattr(benchmarks.sampling, "median_time", fake_median_time)
    bsz = 2
    rows = bench(model, [None, "lazymar", "lazymar-off"], num_iter=16, cfg=3.0, bsz=bsz, repeats=3,
                 device=torch.device("cpu"), warmup_iter=2)
    assert calls == [3, 3, 3]
    assert [r.preset for r in rows] == ["plain", "lazymar", "lazymar-off"]
    assert [r.seconds_per_image for r in rows] == [3.0, 0.75, 1.5]  # seconds per call / bsz
    assert [r.speedup for r in rows] == [1.0, 4.0, 2.0]  # 3.0 / 3.0, 3.0 / 0.75, 3.0 / 1.5
    tflops = [estimate(model, num_iter=16, cfg=3.0, accel=a, bsz=bsz).total / 1e12 for a in (None, "lazymar")]
    assert tflops[1] < tflops[0]
    assert [r.tflops_per_image for r in rows] == [tflops[0], tflops[1], tflops[0]]  # lazymar-off = plain
    assert rows[1].flops_ratio == tflops[0] / tflops[1] and rows[2].flops_ratio == 1.0
    assert rows[1].efficiency == 4.0 / (tflops[0] / tflops[1])
    table = format_rows(rows)
    assert "    4.00x" in table.splitlines()[3] and "lazymar-off" in table.splitlines()[4]


def test_sampling_prints_each_row_as_its_preset_finishes(monkeypatch, capsys):
    """A run over many presets is long: the table's header comes first and each row when its preset is
    timed, not all at the end (what was printed is read at each timing call), and a bar counts presets."""
    model = build_tiny_mar(img_size=128, buffer_size=4, num_sampling_steps="20")
    monkeypatch.setattr(benchmarks.sampling, "build_timed_model", lambda args: (model, torch.device("cpu")))
    scripted = iter([6.0, 1.5, 3.0])
    printed, bars = [], []

    def fake_median_time(fn, device, repeats, warmup=None):
        out = capsys.readouterr()
        printed.append(out.out)
        bars.append(out.err)
        return next(scripted)

    monkeypatch.setattr(benchmarks.sampling, "median_time", fake_median_time)
    assert benchmarks.sampling.main(["--model", "mar_base", "--device", "cpu", "--num_iter", "4", "--bsz", "2",
                                     "--presets", "lazymar", "lazymar-off", "--repeats", "1"]) == 0
    out = capsys.readouterr()
    printed.append(out.out)
    bars.append(out.err)
    lines = ["".join(printed[:k + 1]).splitlines() for k in range(len(printed))]
    assert lines[0][1:] == benchmarks.sampling.format_rows([]).splitlines()  # the title, the header, no row yet
    assert [line.split()[0] for line in lines[1][3:]] == ["plain"]  # before lazymar is timed
    assert [line.split()[0] for line in lines[2][3:]] == ["plain", "lazymar"]
    assert [line.split()[0] for line in lines[3][3:]] == ["plain", "lazymar", "lazymar-off"]
    assert "4.00x" in lines[3][4]  # the speedups are against plain's row, printed before them
    assert "3/3" in "".join(bars) and "preset" in "".join(bars)


@contextmanager
def _costs(obj, attr: str, seconds: float, now: list[float], calls: dict, name: str):
    """For the block: ``obj.attr`` advances the scripted clock by ``seconds`` per call (and counts calls);
    afterwards the instance is exactly as before. Not ``monkeypatch``: undoing a patched method of an
    ``nn.Module`` instance is not portable across pytest versions, and a failed undo leaves the other
    patches (the scripted clock) in place for every later test."""
    original = getattr(obj, attr)

    def timed(*args, **kwargs):
        now[0] += seconds
        calls[name] = calls.get(name, 0) + 1
        return original(*args, **kwargs)

    setattr(obj, attr, timed)
    try:
        yield
    finally:
        delattr(obj, attr)


def test_profile_attributes_each_component(monkeypatch):
    """A scripted clock advances only inside each component (encoder 1 s per call, decoder 10, head 100,
    VAE 1000) and in the sampler's own code around them (7 s): the profile must give back exactly those
    sums, with 'other' = the 7 s spent outside every component."""
    now = [0.0]
    monkeypatch.setattr(util.timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    model = build_tiny_mar()
    vae = AutoencoderKL(16, (1, 1, 1, 1, 2), ch=32).eval()  # stride 16, like the tiny model expects
    calls = {}
    with ExitStack() as stack:
        for obj, attr, name, seconds in ((model, "forward_mae_encoder", "encoder", 1.0),
                                         (model, "forward_mae_decoder", "decoder", 10.0),
                                         (model.diffloss, "sample", "diffusion_head", 100.0),
                                         (vae, "decode", "vae_decode", 1000.0),
                                         (model, "sample_tokens", "sampler", 7.0)):
            stack.enter_context(_costs(obj, attr, seconds, now, calls, name))
        seconds, total = profile(model, vae, bsz=1, num_iter=3, cfg=2.0, device=torch.device("cpu"))
        # The timer put back the instance attributes it found (the scripted costs), not the class methods.
        assert vae.decode.__name__ == "timed" and model.forward_mae_encoder.__name__ == "timed"
    assert "decode" not in vars(vae) and "forward_mae_encoder" not in vars(model)
    # Plain MAR: one encoder, decoder and head call per step (guidance doubles the batch, not the calls).
    assert calls == {"sampler": 1, "encoder": 3, "decoder": 3, "diffusion_head": 3, "vae_decode": 1}
    assert seconds == {"encoder": 3.0, "decoder": 30.0, "diffusion_head": 300.0, "vae_decode": 1000.0,
                       "other": 7.0}
    assert total == 3.0 + 30.0 + 300.0 + 1000.0 + 7.0


def test_component_timer_restores_what_it_found():
    """Wrapping a method that is already an instance attribute (compiled, or another wrapper) puts that
    attribute back; wrapping a plain method leaves the class's method showing through."""
    timer = util.timing.ComponentTimer("cpu")
    model = build_tiny_mar()
    shadow = lambda *a, **k: "shadow"  # noqa: E731
    model.forward_mae_encoder = shadow
    with timer.wrap(model, "forward_mae_encoder", "encoder"), timer.wrap(model, "forward_mae_decoder", "decoder"):
        assert model.forward_mae_encoder() == "shadow"
    assert vars(model)["forward_mae_encoder"] is shadow
    assert "forward_mae_decoder" not in vars(model)
    assert timer.seconds["encoder"] >= 0.0 and set(timer.seconds) == {"encoder"}
