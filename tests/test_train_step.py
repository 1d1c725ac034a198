"""The static-shape training step (demo.train_step, train.py --mask_buckets / --compile step) and the
carried-checkpoint windows it is for: same losses as MAR.forward, exact resume, clean refusals."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import train as train_mod
from demo.train_step import BucketedMaskStep, bucket_mask_counts
from models.mar import MAR, mar_from_config
from test_train import _args as _train_args, _log

TINY = dict(train_mod.MODEL_SIZES["tiny"], img_size=32, vae_stride=2, vae_embed_dim=4, class_num=12,
            attn_dropout=0.0, proj_dropout=0.0)


def _args(tok: Path, tmp: Path, out: str, **kw):
    """test_train's arguments with 2 epochs and no dropout (compiled code draws other dropout masks)."""
    return _train_args(tok, tmp, out, **{"epochs": 2, "dropout": 0.0, **kw})


def _force_count(model: MAR, count: int) -> None:
    """Make ``MAR.random_masking`` mask exactly ``count`` tokens (it still makes its one rand draw)."""
    model.mask_ratio_generator = type("Fixed", (), {"ppf": staticmethod(lambda u: (count - 0.5) / model.seq_len)})()


def test_bucket_counts():
    model = mar_from_config(TINY)
    lo = math.ceil(model.seq_len * model.mask_ratio_min)
    for n in (1, 2, 4, 8, 64):
        counts = bucket_mask_counts(model, n)
        assert len(counts) == n and counts == sorted(counts) and lo <= counts[0] and counts[-1] <= model.seq_len
    assert bucket_mask_counts(model, 1) == [math.ceil(model.seq_len * model.mask_ratio_generator.ppf(0.5))]
    with pytest.raises(ValueError, match="num_buckets"):
        bucket_mask_counts(model, 0)


def test_bucketed_step_equals_mar_forward_bit_for_bit():
    """Same draws and the same count: the static-shape step gives MAR.forward's loss and gradients."""
    torch.manual_seed(0)
    model = mar_from_config(TINY).train()
    step = BucketedMaskStep(model, 4)
    x, y = torch.randn(8, 4, 16, 16), torch.arange(8) % 12
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        orders = step.draw_orders(8, torch.device("cpu"))
        count = step.draw_num_masked()
        loss = step(x, y, orders, count)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        reference = mar_from_config(TINY).train()
        reference.load_state_dict(model.state_dict())
        _force_count(reference, count)
        torch.manual_seed(seed)
        ref_loss = reference(x, y)
        ref_grads = torch.autograd.grad(ref_loss, list(reference.parameters()))
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
        seen.add(count)
    assert len(seen) > 1


def test_buckets_off_is_the_previous_step(tiny_tokenizer, tmp_path):
    """--mask_buckets 0: the first loss is MAR.forward on util.latents.draw_latents (the code before
    device-resident data), drawn exactly as before."""
    from torch.utils.data import DistributedSampler

    from demo.latents import load_or_build_latents
    from util.latents import draw_latents
    args = _args(tiny_tokenizer, tmp_path, "off", epochs=1)
    out = train_mod.main(args)
    data = load_or_build_latents(tiny_tokenizer, 2, 0, tmp_path / "cache", verbose=False, style=args.data_style)
    config = torch.load(tmp_path / "off" / "checkpoint-last.pth", weights_only=True)["config"]
    torch.manual_seed(args.seed)
    model = mar_from_config(config).train()
    sampler = DistributedSampler(range(len(data["labels"])), num_replicas=1, rank=0, shuffle=True, seed=args.seed,
                                 drop_last=True)
    sampler.set_epoch(0)
    idx = torch.tensor(list(iter(sampler)))[:args.batch_size]
    torch.manual_seed(train_mod.step_seed(args.seed, 0, 0))
    x = draw_latents(data["mean"][idx], data["std"][idx], data["latent_scale"])
    assert model(x, data["labels"][idx]).item() == out["losses"][0]


def test_bucketed_training_is_mar_forward_with_the_same_counts(tiny_tokenizer, tmp_path, monkeypatch):
    """Whole runs (optimizer, EMA, data order): --mask_buckets 3 == the MAR.forward path with its masking
    drawing the same bucketed counts, loss for loss."""
    bucketed = train_mod.main(_args(tiny_tokenizer, tmp_path, "bucketed", mask_buckets=3))

    def bucketed_masking(self, x, orders):
        counts = bucket_mask_counts(self, 3)
        u = torch.rand(1).item()
        return self.mask_by_order(counts[min(int(u * 3), 2)], orders).to(x.dtype)
    monkeypatch.setattr(MAR, "random_masking", bucketed_masking)
    reference = train_mod.main(_args(tiny_tokenizer, tmp_path, "reference"))
    assert bucketed["losses"] == reference["losses"] and len(bucketed["losses"]) == 6


def test_time_limited_window_resumes_exactly_from_carried_checkpoint(tiny_tokenizer, tmp_path):
    """A window stopped by --time_limit, its folder carried elsewhere and resumed there, continues with
    the losses of an uninterrupted run (bucketed step; --save_every_minutes saves on its own clock)."""
    full = train_mod.main(_args(tiny_tokenizer, tmp_path, "full", mask_buckets=4))
    first = train_mod.main(_args(tiny_tokenizer, tmp_path, "window1", mask_buckets=4, time_limit=0,
                                 save_every=100, save_every_minutes=60))
    assert first["step"] == 1  # out of time after the first step: saved, then stopped
    shutil.copytree(tmp_path / "window1", tmp_path / "carried")  # what the next machine gets
    rest = train_mod.main(_args(tiny_tokenizer, tmp_path, "carried", mask_buckets=4, save_every=100,
                                save_every_minutes=60, log_every=5))
    assert first["losses"] + rest["losses"] == full["losses"]
    assert _log(tmp_path / "carried" / "log.jsonl") == full["losses"]


def test_save_every_minutes_saves_on_the_clock(tiny_tokenizer, tmp_path, monkeypatch):
    saved = []
    real_save = train_mod.atomic_save

    def spy(obj, path):
        saved.append(obj["step"])
        return real_save(obj, path)
    monkeypatch.setattr(train_mod, "atomic_save", spy)
    train_mod.main(_args(tiny_tokenizer, tmp_path, "clock", epochs=1, save_every=100, save_every_minutes=1e-9))
    assert saved == [1, 2, 3]  # every step is past the clock; without it only the epoch end saves


def test_compiled_step_matches_eager_and_resumes_exactly(tiny_tokenizer, tmp_path, inductor_default_random):
    """--compile step: losses equal to the eager step within float32 reordering.

    Tolerance: the compiled kernels sum in another order. The loss is a mean over n = batch x tokens x
    diffusion_batch_mul terms whose reordering moves it by about sqrt(n) float32 roundoffs (a random
    walk of per-addition errors u = 2**-24); 2 sqrt(n) u = 1.1e-5 for n = 8192 covers it (measured:
    7e-7 to 1.4e-6 over three steps). The equality needs the compiled graph to draw its random numbers
    with the eager generator calls (inductor's default Philox stream is another draw): train.py must set
    that itself, since a real run resumes across --compile, so the test starts from inductor's default.
    """
    eager = train_mod.main(_args(tiny_tokenizer, tmp_path, "eager", epochs=1, mask_buckets=2))
    compiled = train_mod.main(_args(tiny_tokenizer, tmp_path, "compiled", epochs=1, mask_buckets=2,
                                    compile="step"))
    n = 8 * 256 * train_mod.get_args_parser().get_default("diffusion_batch_mul")
    rtol = 2 * math.sqrt(n) * 2.0 ** -24
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=rtol, atol=0)
    part = train_mod.main(_args(tiny_tokenizer, tmp_path, "resumed", epochs=1, mask_buckets=2, compile="step",
                                stop_after=2))
    rest = train_mod.main(_args(tiny_tokenizer, tmp_path, "resumed", epochs=1, mask_buckets=2, compile="step"))
    assert part["losses"] + rest["losses"] == compiled["losses"]


@pytest.mark.parametrize("kw,match", [
    (dict(cuda_graph=True, compile="step", mask_buckets=4), "--cuda_graph needs a CUDA GPU"),
    (dict(compile="step"), "--compile step needs --mask_buckets"),
    (dict(mask_buckets=-1), "--mask_buckets"),
    (dict(save_every_minutes=0), "--save_every_minutes"),
])
def test_static_step_flags_refused_before_work(tmp_path, kw, match):
    if kw.get("cuda_graph") and torch.cuda.is_available():
        pytest.skip("a GPU is here: --cuda_graph is allowed")
    with pytest.raises(ValueError, match=match):
        train_mod.main(_args(tmp_path / "missing_tokenizer.pt", tmp_path, "bad", **kw))
    assert not (tmp_path / "bad").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_trains_and_resumes(tiny_tokenizer, tmp_path):
    full = train_mod.main(_args(tiny_tokenizer, tmp_path, "graph", mask_buckets=2, compile="step",
                                cuda_graph=True))
    assert all(math.isfinite(v) for v in full["losses"])
    part = train_mod.main(_args(tiny_tokenizer, tmp_path, "graph2", mask_buckets=2, compile="step",
                                cuda_graph=True, stop_after=3))
    rest = train_mod.main(_args(tiny_tokenizer, tmp_path, "graph2", mask_buckets=2, compile="step",
                                cuda_graph=True))
    assert part["losses"] + rest["losses"] == full["losses"]


def test_gpu_window_script_collects_a_split_checkpoint(tmp_path):
    """demo/gpu_window.sh: valid bash; `collect` joins the returned parts, checks the SHA-256, refuses a
    damaged part (the full window runs train.py as tested above; a CPU dry run is in demo/TRAINING.md)."""
    import hashlib
    import os
    import subprocess
    root = Path(__file__).resolve().parents[1]
    script = root / "demo" / "gpu_window.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    blob = torch.randn(50_000).numpy().tobytes()
    src = tmp_path / "returned"
    src.mkdir()
    for i in range(3):
        (src / f"checkpoint-last.pth.part-{i:02d}").write_bytes(blob[i * 80_000:(i + 1) * 80_000])
    (src / "checkpoint-last.pth.sha256").write_text(hashlib.sha256(blob).hexdigest() + "\n")
    (src / "log.jsonl").write_text(json.dumps(dict(step=7, loss=1.0)) + "\n")
    env = dict(os.environ, RUN_DIR=str(tmp_path / "run"))
    done = subprocess.run(["bash", str(script), "collect", str(src)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "checkpoint-last.pth").read_bytes() == blob and "step 7" in done.stdout
    (src / "checkpoint-last.pth.part-01").write_bytes(b"damaged")
    (tmp_path / "run" / "checkpoint-last.pth").unlink()
    done = subprocess.run(["bash", str(script), "collect", str(src)], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and not (tmp_path / "run" / "checkpoint-last.pth").exists()


def test_step_timing_reports_each_mode(capsys):
    from benchmarks import step_timing
    step_timing.main(["--model", "tiny", "--batch_size", "2", "--steps", "2", "--modes", "eager,buckets"])
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [ln["mode"] for ln in lines] == ["eager", "buckets"]
    assert all(ln["wall_s_per_step"] > 0 and len(ln["wall_s_rounds"]) == 2 for ln in lines)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="graph needs a CUDA GPU"):
            step_timing.main(["--model", "tiny", "--modes", "graph"])
