"""benchmarks.throughput: every planned cell is reported (measured, skipped by the budget, OOM or error),
in the planned order, with images/s and speedups that follow from its own seconds; bad flags fail
before any model is built. Runs the tiny random model on the CPU."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

import benchmarks.throughput as tp
import lazymar
from lazymar.flops import estimate
from benchmarks.throughput_report import OK, OOM, SKIPPED, Cell
from util.deadline import can_interrupt

TINY = ["--tiny", "--device", "cpu", "--presets", "plain", "lazymar", "--precisions", "bf16", "fp32",
        "--batches", "2", "--num_iter", "4", "--num_sampling_steps", "4", "--warmup_runs", "1"]
PLANNED = [("plain", "bf16"), ("lazymar", "bf16"), ("plain", "fp32"), ("lazymar", "fp32")]


def run_main(tmp_path, *extra: str) -> tuple[int, dict, str]:
    rc = tp.main([*TINY, *extra, "--out_json", str(tmp_path / "t.json"), "--out_md", str(tmp_path / "t.md")])
    return rc, json.loads((tmp_path / "t.json").read_text()), (tmp_path / "t.md").read_text()


def table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| tiny-random |")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(2)
    return run_main(tmp_path_factory.mktemp("throughput"))


def test_tiny_run_measures_every_cell(tiny_run, capsys):
    rc, report, markdown = tiny_run
    assert rc == 0
    cells = report["cells"]
    assert [(c["preset"], c["precision"]) for c in cells] == PLANNED
    assert {(c["model"], c["batch"]) for c in cells} == {("tiny-random", 2)}
    for c in cells:
        assert c["status"] == OK and c["detail"] == ""
        assert math.isfinite(c["seconds"]) and c["seconds"] > 0
        assert c["images_per_s"] == pytest.approx(2 / c["seconds"], rel=1e-12)
        assert c["tflops_per_s"] == pytest.approx(c["images_per_s"] * c["tflops_per_image"], rel=1e-12)
    by = {(c["preset"], c["precision"]): c for c in cells}
    for prec in ("bf16", "fp32"):
        plain, lazy = by["plain", prec], by["lazymar", prec]
        assert plain["speedup"] == 1.0
        assert lazy["speedup"] == pytest.approx(plain["seconds"] / lazy["seconds"], rel=1e-12)
    # FLOPs are the estimate of the cell's own preset, the same in both precisions.
    model = tp.build("tiny-random", num_sampling_steps=4, device="meta")
    for preset, accel in (("plain", None), ("lazymar", "lazymar")):
        expected = estimate(model, num_iter=4, cfg=3.0, accel=accel, bsz=2).total / 1e12
        assert by[preset, "bf16"]["tflops_per_image"] == by[preset, "fp32"]["tflops_per_image"] == expected

    meta = report["meta"]
    assert meta["command"].startswith("python -m benchmarks.throughput --tiny --device cpu")
    assert meta["torch"] == torch.__version__ and meta["device"] == "cpu"
    assert meta["warmup_runs"] == 1 and meta["num_iter"] == 4 and meta["cfg_schedule"] == "linear"
    rows = table_rows(markdown)
    assert len(rows) == 4
    for row, (preset, prec) in zip(rows, PLANNED):
        assert f"| {preset} | {prec} |" in row and row.endswith("| ok |")
    assert meta["command"] in markdown and torch.__version__ in markdown


def test_budget_skips_cells_and_exits_0(tmp_path, monkeypatch):
    built = []
    real_build = tp.build
    monkeypatch.setattr(tp, "build", lambda name, **kw: built.append(kw["device"]) or real_build(name, **kw))
    rc, report, markdown = run_main(tmp_path, "--budget_s", "0.001")
    assert rc == 0
    assert [(c["preset"], c["precision"]) for c in report["cells"]] == PLANNED  # none dropped
    for c in report["cells"]:
        assert c["status"] == SKIPPED
        assert c["seconds"] is None and c["images_per_s"] is None and c["speedup"] is None
        assert c["tflops_per_image"] > 0  # known without running
    assert all(row.endswith("| skipped (budget) |") for row in table_rows(markdown))
    assert len(table_rows(markdown)) == 4
    assert built == ["meta"]  # the FLOPs count only: no model was built to run


@pytest.mark.skipif(not can_interrupt(), reason="needs SIGALRM in the main thread")
def test_budget_interrupts_the_cell_in_progress(tmp_path, monkeypatch):
    """lazymar would take a minute: the deadline cuts it at the budget, and what ran stays reported."""
    def fake_generate(model, *, bsz, num_iter, cfg, preset, seed):
        if preset == "lazymar":
            time.sleep(60)
        return torch.zeros(bsz)

    monkeypatch.setattr(tp, "generate", fake_generate)
    start = time.monotonic()
    rc, report, markdown = run_main(tmp_path, "--budget_s", "3")
    assert time.monotonic() - start < 20
    assert rc == 0
    statuses = [c["status"] for c in report["cells"]]
    assert statuses == [OK, SKIPPED, SKIPPED, SKIPPED]
    assert report["cells"][1]["detail"].startswith("interrupted after")
    assert report["cells"][0]["speedup"] == 1.0
    assert report["meta"]["elapsed_s"] < 10
    assert "skipped (budget): interrupted after" in table_rows(markdown)[1]


def test_oom_and_errors_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def fake_generate(model, *, bsz, num_iter, cfg, preset, seed):
        if preset == "lazymar" and torch.is_autocast_enabled("cpu"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")
        if preset == "lazymar":
            raise RuntimeError("a bug in one preset")
        return torch.zeros(bsz)

    monkeypatch.setattr(tp, "generate", fake_generate)
    rc, report, markdown = run_main(tmp_path)
    assert rc == 1  # an error is a bug: the run says so in its status, after reporting every cell
    cells = report["cells"]
    assert [c["status"] for c in cells] == [OK, OOM, OK, "error"]
    assert cells[1]["detail"] == "CUDA out of memory. Tried to allocate 80 GiB"
    assert cells[3]["detail"] == "RuntimeError: a bug in one preset"
    assert cells[1]["speedup"] is None and cells[3]["seconds"] is None
    assert "a bug in one preset" in capsys.readouterr().err  # the traceback
    rows = table_rows(markdown)
    assert rows[1].endswith("| OOM: CUDA out of memory. Tried to allocate 80 GiB |")


def test_warmup_is_the_timed_generation(tiny_mar):
    """Every warm-up call is the timed call itself (same steps, preset, guidance, batch, seed), so the
    cached paths and every step's token count are met before the clock starts."""
    calls = []
    real = tiny_mar.sample_tokens

    def recording(bsz, **kwargs):
        calls.append((bsz, {k: v for k, v in kwargs.items() if k not in ("labels", "generator")}))
        return real(bsz, **kwargs)

    tiny_mar.sample_tokens = recording
    try:
        settings = tp.Settings(num_iter=6, warmup_runs=2, num_sampling_steps=4)
        seconds, _ = tp.measure(tiny_mar, Cell("tiny", 2, "lazymar", "fp32"), settings)
    finally:
        del tiny_mar.sample_tokens
    assert len(calls) == 3 and calls[0] == calls[1] == calls[2]
    assert calls[0] == (2, dict(num_iter=6, cfg=3.0, cfg_schedule="linear", accel=lazymar.preset("lazymar")))
    assert seconds > 0


def test_a_time_of_zero_is_reported_never_divided_by(tmp_path):
    """A clock that did not advance gives seconds 0.0: no speedup, no images/s, a status that says so."""
    from benchmarks.throughput_report import Result, write_reports
    results = [Result(Cell("m", 2, "plain", "fp32"), OK, 1.0, seconds=0.0),
               Result(Cell("m", 2, "lazymar", "fp32"), OK, 0.5, seconds=0.5),
               Result(Cell("m", 2, "plain", "bf16"), OK, 1.0, seconds=2.0),
               Result(Cell("m", 2, "lazymar", "bf16"), OK, 0.5, seconds=0.0)]
    meta = dict(device_name="cpu", torch="x", cuda="none", float32_matmul_precision="highest", command="c",
                num_iter=4, cfg=3.0, cfg_schedule="linear", num_sampling_steps=4, warmup_runs=1, compile=None,
                budget_s=1.0, elapsed_s=0.1)
    markdown = write_reports(meta, results, out_json=tmp_path / "r.json", out_md=None)
    assert [r.speedup for r in results] == [None, None, 1.0, None]
    assert results[0].images_per_s is None and results[0].tflops_per_s is None
    assert results[1].images_per_s == 4.0
    rows = [line for line in markdown.splitlines() if line.startswith("| m |")]
    assert rows[0].endswith("| ok: no time measured |") and rows[3].endswith("| ok: no time measured |")
    assert json.loads((tmp_path / "r.json").read_text())["cells"][0]["speedup"] is None


def test_default_order_puts_the_headline_first():
    cells = tp.order_cells(tp.DEFAULT_MODELS, tp.DEFAULT_BATCHES, tp.DEFAULT_PRESETS, tp.DEFAULT_PRECISIONS)
    assert len(cells) == len(set(cells)) == 4 * 5 * 2  # (B 64, B 256, L 64, H 64) x 5 presets x 2
    assert cells[:4] == [Cell("mar_base", 64, "plain", "bf16"), Cell("mar_base", 64, "lazymar", "bf16"),
                         Cell("mar_base", 64, "plain", "fp32"), Cell("mar_base", 64, "lazymar", "fp32")]
    groups = []
    for c in cells:  # consecutive runs of (model, batch, precision)
        if not groups or groups[-1] != (c.model, c.batch, c.precision):
            groups.append((c.model, c.batch, c.precision))
    assert groups == [("mar_base", 64, "bf16"), ("mar_base", 64, "fp32")] * 2 + [
        ("mar_large", 64, "bf16"), ("mar_huge", 64, "bf16"), ("mar_base", 256, "bf16"),
        ("mar_large", 64, "fp32"), ("mar_huge", 64, "fp32"), ("mar_base", 256, "fp32")]
    assert [c.preset for c in cells[4:7]] == ["gtr+lazymar", "disa+lazymar", "gtr+disa+lazymar"]
    assert [c.preset for c in cells[10:15]] == list(tp.DEFAULT_PRESETS)  # every later group: plain first


@pytest.mark.parametrize("argv,match", [
    (["--batches", "0"], "--batches must all be >= 1"),
    (["--budget_s", "0"], "--budget_s must be a positive"),
    (["--budget_s", "-5"], "--budget_s must be a positive"),
    (["--budget_s", "nan"], "--budget_s must be a positive"),
    (["--presets", "plain", "lazymar", "plain"], "--presets lists plain more than once"),
    (["--num_iter", "0"], "num_iter must be >= 1"),
    (["--num_sampling_steps", "0"], "--num_sampling_steps"),
    (["--warmup_runs", "-1"], "--warmup_runs"),
    (["--tiny", "--num_iter", "65"], "exceeds tiny-random's 64 tokens"),
    (["--device", "tpu"], "--device"),
])
def test_bad_flags_raise_before_work(argv, match, monkeypatch):
    def no_model(name, **kw):
        if kw["device"] != "meta":
            raise AssertionError("a model was built before the flags were checked")
        return real_build(name, **kw)

    real_build = tp.build
    monkeypatch.setattr(tp, "build", no_model)
    with pytest.raises(ValueError, match=match):
        tp.main(argv)


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA device"):
        tp.main(["--tiny", "--device", "cuda"])


@pytest.mark.parametrize("argv,match", [
    (["--models", "mar_giant"], "invalid choice: 'mar_giant'"),
    (["--presets", "fast"], "invalid choice: 'fast'"),
    (["--precisions", "fp8"], "invalid choice: 'fp8'"),
    (["--tiny", "--models", "mar_base"], "not allowed with"),
])
def test_unknown_names_are_refused_by_the_parser(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tp.main(argv)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
