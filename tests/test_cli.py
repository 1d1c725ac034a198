"""Scripts fail on a user's mistake with one ``error:`` line and status 1, before any heavy work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from util import cli
from util.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def test_run_turns_user_errors_into_one_line(capsys):
    for err in (ValueError("bad --x"), FileNotFoundError("no file"), CheckpointError("not a MAR")):
        def fail(err=err):
            raise err
        with pytest.raises(SystemExit) as exit_info:
            cli.run(fail)
        assert exit_info.value.code == f"error: {err}"  # printed to stderr, status 1
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda a, b: a + b, 2, 1)
    assert exit_info.value.code == 3  # an int result is the exit status
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: {"fid": 1.0})
    assert exit_info.value.code == 0
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.run(lambda: {}["missing"])
    with pytest.raises(json.JSONDecodeError):  # so does a ValueError raised inside a library
        cli.run(json.loads, "{not json")
    with pytest.raises(SystemExit, match="error: loss is nan"):
        cli.run(lambda: (_ for _ in ()).throw(FloatingPointError("loss is nan at step 3")))


def test_check_positive_names_the_flag():
    cli.check_positive(bsz=1, repeats=3)
    with pytest.raises(ValueError, match="--repeats must be >= 1, got 0"):
        cli.check_positive(bsz=1, repeats=0)


@pytest.mark.parametrize("module,argv,match", [
    ("benchmarks.flops", ["--num_iter", "0"], "num_iter"),
    ("benchmarks.flops", ["--cfg", "-1"], "cfg"),
    ("benchmarks.sampling", ["--repeats", "0"], "--repeats"),
    ("benchmarks.sampling", ["--bsz", "0"], "--bsz"),
    ("benchmarks.sampling", ["--num_iter", "0"], "num_iter"),
    ("benchmarks.profile_sampler", ["--num_sampling_steps", "0"], "--num_sampling_steps"),
    ("benchmarks.profile_sampler", ["--num_sampling_steps", "1001"], "--num_sampling_steps"),
    ("benchmarks.profile_sampler", ["--ops", "-1"], "--ops"),
    ("benchmarks.profile_sampler", ["--cuda_graph", "--device", "cpu"], "--cuda_graph needs a CUDA device"),
    ("benchmarks.sampling", ["--cuda_graph", "--device", "cpu"], "--cuda_graph needs a CUDA device"),
    ("demo.evaluate", ["--steps", "16", "0"], "--steps"),
    ("demo.evaluate", ["--per_class", "0"], "--per_class"),
    ("demo.evaluate", ["--temperature", "-1"], "temperature"),
    ("demo.registry", ["--cfg", "3", "-1"], "cfg"),
    ("demo.registry", ["--per_class", "0"], "--per_class"),
])
def test_bad_flags_raise_before_work(module, argv, match, monkeypatch):
    import importlib

    import demo.registry
    import models.mar

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the flags were checked")
    mod = importlib.import_module(module)
    for owner in (models.mar, demo.registry, mod):
        for name in ("build_released", "load_demo"):
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, no_model)
    with pytest.raises(ValueError, match=match):
        mod.main(argv)


def test_script_exit_status_and_message():
    out = subprocess.run([sys.executable, "-m", "benchmarks.flops", "--num_iter", "0"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip() == "error: num_iter must be >= 1, got 0"
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("module,argv,match", [
    ("demo.classifier", ["--epochs", "0"], "--epochs"),
    ("demo.classifier", ["--lr", "0"], "--lr"),
    ("demo.tokenizer", ["--batch_size", "0"], "--batch_size"),
    ("demo.tokenizer", ["--num_per_class", "1", "--batch_size", "64"], "larger than the 12 training images"),
])
def test_demo_trainers_refuse_settings_that_write_an_untrained_checkpoint(tmp_path, module, argv, match):
    import importlib
    out = tmp_path / "model.pt"
    with pytest.raises(ValueError, match=match):
        importlib.import_module(module).main([*argv, "--out", str(out)])
    assert not out.exists()
