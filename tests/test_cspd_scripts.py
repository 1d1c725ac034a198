"""Speculative decoding in the scripts: ``--accel cspd --draft_model`` in eval.py (acceptance statistics in
metrics.json, the draft's digest in the run identity), sample.py ``--compare``, the bench and FLOPs command
lines, and the FLOPs dispatch; bad flag combinations end in one clear error before anything is written."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmarks.sampling  # noqa: E402
import eval as eval_script  # noqa: E402
import evaluation.report as eval_report  # noqa: E402
import evaluation.run as eval_run  # noqa: E402
import lazymar  # noqa: E402
import sample as sample_script  # noqa: E402
from benchmarks.flops import main as flops_main  # noqa: E402
from conftest import build_tiny_mar  # noqa: E402
from lazymar import cspd_flops  # noqa: E402
from lazymar.cspd import (CSPD_PRESETS, CSpDConfig, StatsLog, cspd_preset, describe, named_accel,  # noqa: E402
                          preset_settings, summarize)
from lazymar.flops import estimate, measure  # noqa: E402
from lazymar.names import check_draft_flags  # noqa: E402
from models.mar import build_released, mar_from_config  # noqa: E402
from models.schedules import plain_mask_lens  # noqa: E402
from util.hashing import file_sha256  # noqa: E402

DRAFT = "tiny-draft"  # a narrower tiny-random, weights from a file (--draft_ckpt), like a released draft
OTHER_GRID = "tiny-other-grid"  # 16x16 tokens instead of tiny-random's 8x8
EVAL = ["--model", "tiny-random", "--num_images", "10", "--eval_bsz", "5", "--num_iter", "4",
        "--num_sampling_steps", "5", "--device", "cpu", "--no_metrics"]


pytestmark = pytest.mark.usefixtures("one_thread")  # the scripts set their own threads: restored after


def draft_architecture(**overrides):
    """tiny-random's token grid and channels at half the width: what a draft of it may look like."""
    from util.loading import TINY_MAR
    return mar_from_config({**TINY_MAR, "encoder_embed_dim": 16, "decoder_embed_dim": 16, "diffloss_w": 16,
                            **overrides})


def save_draft(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    mar = draft_architecture()
    with torch.no_grad():  # adaLN-Zero would make the head output exactly 0
        for name, p in mar.diffloss.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.02)
    torch.save(mar.state_dict(), path)
    st = path.stat()  # a replaced file has a new mtime, even within the file system's time resolution
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seed))


@pytest.fixture
def draft_file(monkeypatch, tmp_path):
    """Registers ``tiny-draft`` (weights from ``--draft_ckpt``) and ``tiny-other-grid``; the draft's file."""
    from models.vae import VAE_LATENT_SCALE, AutoencoderKL
    from util import loading

    def load_draft(*, ckpt, vae_path, use_ema):
        mar = draft_architecture()
        mar.load_state_dict(torch.load(ckpt, weights_only=True))
        return loading.LoadedModel(mar, AutoencoderKL(**loading.TINY_VAE), VAE_LATENT_SCALE, {"mar": Path(ckpt)})

    def load_other(*, ckpt, vae_path, use_ema):
        return loading.LoadedModel(draft_architecture(img_size=64), AutoencoderKL(**loading.TINY_VAE),
                                   VAE_LATENT_SCALE, {})

    monkeypatch.setitem(loading._REGISTERED, DRAFT, load_draft)
    monkeypatch.setitem(loading._REGISTERED, OTHER_GRID, load_other)
    path = tmp_path / "draft.pth"
    save_draft(path, seed=1)
    return path


def run_eval(*flags: str) -> dict:
    return eval_script.main(eval_script.build_parser().parse_args([*EVAL, *flags]))


def only_run_dir(root: Path) -> Path:
    (d,) = [p for p in root.iterdir() if p.is_dir()]
    return d


# ------------------------------------------------------------------------------------------ flags
def test_draft_flags_rule():
    check_draft_flags(None, None)
    check_draft_flags("lazymar", None)
    for name in CSPD_PRESETS:
        check_draft_flags(name, "mar_base")
        with pytest.raises(ValueError, match=f"--accel {name} needs --draft_model"):
            check_draft_flags(name, None)
    for accel in (None, "lazymar"):
        with pytest.raises(ValueError, match="--draft_model mar_base is only used by speculative decoding"):
            check_draft_flags(accel, "mar_base")


def test_named_accel_builds_each_kind():
    draft = build_tiny_mar(seed=1, encoder_embed_dim=16, decoder_embed_dim=16)
    log = StatsLog()
    assert named_accel(None) is None
    assert named_accel("lazymar") is lazymar.PRESETS["lazymar"]
    config = named_accel("cspd-release", draft, on_stats=log)
    assert isinstance(config, CSpDConfig) and config.draft is draft and config.on_stats is log
    assert config == cspd_preset("cspd-release", draft)  # the callback is not part of the config's value
    assert config.settings() == preset_settings("cspd-release")
    with pytest.raises(ValueError, match="needs a draft model"):
        named_accel("cspd")
    with pytest.raises(ValueError, match="only used by speculative decoding"):
        named_accel("lazymar", draft)
    with pytest.raises(ValueError, match="needs a draft model: lazymar.cspd_preset"):
        lazymar.preset("cspd")


def test_summarize_sums_generations_per_verification_step():
    draft = build_tiny_mar(seed=1, encoder_embed_dim=16, decoder_embed_dim=16)
    target = build_tiny_mar(seed=0)
    log = StatsLog()
    config = CSpDConfig(draft=draft, ratio=0.1, num_draft=3, inner_temperature=1.0, on_stats=log)
    for seed in (0, 1):
        target.sample_tokens(2, num_iter=10, cfg=2.0, labels=torch.tensor([1, 2]), accel=config,
                             generator=torch.Generator().manual_seed(seed))
    runs = [s.as_dict() for s in log.runs]
    total = summarize(runs)
    assert total["generations"] == 2 and total["target_passes"] == 5 and total["num_iter"] == 10
    assert total["verified"] == 2 * 2 * plain_mask_lens(10, 16)[1]  # every drafted token of 2 x 2 images
    assert total["accepted"] == log.runs[0].accepted + log.runs[1].accepted
    assert total["acceptance_rate"] == total["accepted"] / total["verified"]
    assert [v["step"] for v in total["verifications"]] == [3, 6, 9]
    for i, row in enumerate(total["verifications"]):
        assert row["verified"] == sum(s.verifications[i].verified for s in log.runs)
        assert row["accepted"] == sum(s.verifications[i].accepted for s in log.runs)
    assert sum(v["accepted"] for v in total["verifications"]) == total["accepted"]
    assert describe(total).startswith(f"accepted {total['accepted']}/{total['verified']} drafts")
    assert summarize([])["generations"] == 0


# ------------------------------------------------------------------------------------------ FLOPs
def test_flops_estimate_and_measure_dispatch_to_both_models():
    draft = build_tiny_mar(seed=1, encoder_embed_dim=16, decoder_embed_dim=16, num_sampling_steps="10")
    target = build_tiny_mar(seed=0, num_sampling_steps="10")
    config = CSpDConfig(draft=draft, ratio=0.1, num_draft=3)
    per_model = cspd_flops.estimate(target, config, num_iter=9, cfg=2.5, bsz=2)
    report = estimate(target, num_iter=9, cfg=2.5, accel=config, bsz=2)
    assert report.total == per_model.total == per_model.target.total + per_model.draft.total
    for c in ("encoder", "decoder", "diffusion_head"):
        assert report.components[c] == per_model.target.components[c] + per_model.draft.components[c]
    counted = measure(target, num_iter=9, cfg=2.5, accel=config, bsz=2)
    assert counted.components == pytest.approx(report.components, rel=1e-9)
    plain = estimate(target, num_iter=9, cfg=2.5, bsz=2)
    assert report.components["encoder"] < plain.components["encoder"]  # fewer target passes


def test_flops_cli_takes_cspd_with_a_draft(capsys):
    flops_main(["--model", "mar_huge", "--num_iter", "256", "--cfg", "4.0", "--accel", "cspd",
                "--draft_model", "mar_base", "--json"])
    out = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        target, draft = build_released("mar_huge"), build_released("mar_base")
    expected = cspd_flops.estimate(target, cspd_preset("cspd", draft), num_iter=256, cfg=4.0)
    assert out["accel"] == "cspd" and out["draft_model"] == "mar_base"
    assert out["total_tflops"] == pytest.approx(expected.total / 1e12, rel=1e-12)
    assert out["components"]["vae_decode"] > 0 and out["plain_total_tflops"] > out["total_tflops"]
    flops_main(["--model", "mar_huge", "--accel", "lazymar", "cspd", "--draft_model", "mar_base"])
    table = capsys.readouterr().out
    assert "cspd (mar_base)" in table and "lazymar" in table
    with pytest.raises(ValueError, match="needs --draft_model"):
        flops_main(["--model", "mar_huge", "--accel", "cspd"])
    with pytest.raises(ValueError, match="only used by speculative decoding"):
        flops_main(["--model", "mar_huge", "--accel", "lazymar", "--draft_model", "mar_base"])


# ------------------------------------------------------------------------------------------ bench
def test_bench_times_and_counts_cspd(monkeypatch):
    target = build_tiny_mar(seed=0)
    draft = build_tiny_mar(seed=1, encoder_embed_dim=16, decoder_embed_dim=16)
    scripted = iter([4.0, 1.0])
    monkeypatch.setattr(benchmarks.sampling, "median_time", lambda fn, device, repeats, warmup=None:
                        (fn(), next(scripted))[1])
    rows = benchmarks.sampling.bench(target, [None, "cspd"], num_iter=8, cfg=3.0, bsz=2, repeats=1,
                                     device=torch.device("cpu"), draft=draft)
    assert [r.preset for r in rows] == ["plain", "cspd"] and rows[1].speedup == 4.0
    flops = estimate(target, num_iter=8, cfg=3.0, accel=cspd_preset("cspd", draft), bsz=2).total / 1e12
    assert rows[1].tflops_per_image == flops and rows[1].flops_ratio == rows[0].tflops_per_image / flops
    with pytest.raises(ValueError, match="needs --draft_model"):
        benchmarks.sampling.main(["--model", "mar_base", "--presets", "cspd"])
    with pytest.raises(ValueError, match="only used by speculative decoding"):
        benchmarks.sampling.main(["--model", "mar_base", "--draft_model", "mar_base"])


# ------------------------------------------------------------------------------------------ eval.py
def test_eval_records_acceptance_and_both_weight_files(draft_file, tmp_path):
    out = tmp_path / "out"
    result = run_eval("--accel", "cspd", "--draft_model", DRAFT, "--draft_ckpt", str(draft_file),
                      "--output_dir", str(out))
    folder = only_run_dir(out)
    saved = json.loads((folder / "metrics.json").read_text())
    cspd = saved["cspd"]
    # 10 images in 2 batches; 4 steps at ratio 0.15: step 0 pre-fills, steps 1-3 draft, one verification
    # (the last step) that scores every token drafted: all but step 0's.
    drafted = plain_mask_lens(4, 64)[0]
    assert cspd["generations"] == 2 and cspd["batches_without_stats"] == 0
    assert cspd["verified"] == 10 * drafted and cspd["target_passes"] == 2
    assert [v["step"] for v in cspd["verifications"]] == [3]
    batches = [json.loads(p.read_text()) for p in sorted((folder / eval_report.STATS_DIR).iterdir())]
    assert len(batches) == 2 and cspd["accepted"] == sum(b["accepted"] for b in batches)
    assert cspd["acceptance_rate"] == cspd["accepted"] / cspd["verified"]
    assert saved["settings"]["draft_model"] == DRAFT and saved["settings"]["accel"] == "cspd"
    assert saved["settings"]["accel_config"] == repr(cspd_preset("cspd", draft_architecture()))
    # Both weight files in the identity (tiny-random's are made in memory: a state-dict digest).
    identity = json.loads((folder / eval_run.IDENTITY_FILE).read_text())
    assert identity["draft_mar_sha256"] == file_sha256(draft_file) and identity["draft_model"] == DRAFT
    assert "weights_sha256" in identity and result["identity"] == identity
    # FLOPs: both models, priced on the loaded pair's shapes.
    from util.loading import load_generator
    target = load_generator("tiny-random", num_sampling_steps=5).mar
    draft = draft_architecture(num_sampling_steps="5")
    expected = estimate(target, num_iter=4, cfg=3.25, accel=cspd_preset("cspd", draft), bsz=5).total
    assert saved["flops"]["per_image"] == pytest.approx(expected, rel=1e-12)
    assert saved["flops"]["speedup_vs_plain"] == pytest.approx(
        estimate(target, num_iter=4, cfg=3.25, bsz=5).total / expected, rel=1e-12)
    assert "cspd" in folder.name and DRAFT in folder.name
    assert len(list((folder / "images").iterdir())) == 10


def test_eval_resume_keeps_statistics_and_refuses_another_draft(draft_file, tmp_path):
    flags = ["--accel", "cspd", "--draft_model", DRAFT, "--draft_ckpt", str(draft_file)]
    whole = run_eval(*flags, "--output_dir", str(tmp_path / "whole"))
    out = tmp_path / "resumed"
    with pytest.raises(SystemExit):
        run_eval(*flags, "--output_dir", str(out), "--stop_after_batches", "1")
    resumed = run_eval(*flags, "--output_dir", str(out))
    assert resumed["timing"]["per_rank"][0]["images_generated"] == 5  # only the second batch now
    assert resumed["cspd"] == whole["cspd"]  # the first invocation's batch counted from its file

    save_draft(draft_file, seed=2)  # another draft at the same path: same folder name, other digest
    with pytest.raises(ValueError, match="holds images of another setup \\(draft_mar_sha256: "):
        run_eval(*flags, "--output_dir", str(out))


def test_eval_folder_names_tell_drafts_and_presets_apart(draft_file, tmp_path):
    parse = eval_script.build_parser().parse_args
    cpu = torch.device("cpu")
    base = ["--model", "mar_huge"]
    variants = [["--accel", "cspd", "--draft_model", "mar_base"], ["--accel", "cspd", "--draft_model", "mar_large"],
                ["--accel", "cspd-release", "--draft_model", "mar_base"],
                ["--accel", "cspd", "--draft_model", "mar_base", "--draft_ckpt", "a.pth"],
                ["--accel", "cspd", "--draft_model", "mar_base", "--draft_ckpt", "b.pth"], ["--accel", "lazymar"], []]
    names = [eval_run.run_name(parse([*base, *v]), cpu) for v in variants]
    assert len(set(names)) == len(names), names
    assert "-cspd-mar_base-" in names[0] and "-cspd-release-mar_base-" in names[2]
    assert eval_run.run_name(parse([*base, "--lazy_mar"]), cpu) == names[5]  # unchanged for the presets


@pytest.mark.parametrize("flags, message", [
    (["--draft_model", DRAFT], "only used by speculative decoding"),
    (["--accel", "lazymar", "--draft_model", DRAFT], "only used by speculative decoding"),
    (["--accel", "cspd"], "--accel cspd needs --draft_model"),
    (["--accel", "cspd", "--draft_ckpt", "x.pth"], "--draft_ckpt needs --draft_model"),
    (["--accel", "cspd", "--draft_model", OTHER_GRID], "share the token grid: draft has 256 tokens"),
])
def test_eval_bad_draft_flags_fail_before_any_image(draft_file, tmp_path, flags, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_eval(*flags, "--output_dir", str(out))
    assert not out.exists()
    from util import cli
    with pytest.raises(SystemExit) as exit_info:  # from the shell: one line
        cli.run(eval_script.main, eval_script.build_parser().parse_args([*EVAL, *flags, "--output_dir", str(out)]))
    assert str(exit_info.value.code).startswith("error: ") and "\n" not in str(exit_info.value.code)


# ------------------------------------------------------------------------------------------ sample.py
def test_sample_compare_shows_the_acceptance(draft_file, tmp_path, capsys):
    single, both = tmp_path / "single.png", tmp_path / "compare.png"
    common = ["--model", "tiny-random", "--classes", "0", "1", "--num_per_class", "2", "--num_iter", "8",
              "--num_sampling_steps", "5", "--accel", "cspd", "--draft_model", DRAFT, "--draft_ckpt", str(draft_file)]
    parse = sample_script.build_parser().parse_args
    sample_script.main(parse([*common, "--out", str(single)]))
    alone = capsys.readouterr().out
    assert "cspd (tiny-draft drafts): accepted " in alone and "target passes of 8 steps" in alone
    sample_script.main(parse([*common, "--compare", "--out", str(both)]))
    shown = capsys.readouterr().out
    line = next(x for x in shown.splitlines() if x.startswith("cspd (tiny-draft drafts): accepted"))
    assert line == next(x for x in alone.splitlines() if x.startswith("cspd (tiny-draft drafts): accepted"))
    with Image.open(single) as a, Image.open(both) as b:
        arr, ref = np.asarray(b), np.asarray(a)
        assert b.width == 2 * a.width
    right = arr[sample_script.LABEL_HEIGHT:, a.width:]
    assert np.array_equal(right, ref)  # the right half is the CSpD grid from the same seed
    assert not np.array_equal(arr[sample_script.LABEL_HEIGHT:, :a.width], right)


@pytest.mark.parametrize("flags, message", [
    (["--draft_model", DRAFT], "only used by speculative decoding"),
    (["--compare", "--draft_model", DRAFT], "only used by speculative decoding"),  # --compare's default: lazymar
    (["--accel", "cspd"], "--accel cspd needs --draft_model"),
    (["--accel", "cspd", "--draft_model", OTHER_GRID], "share the token grid"),
])
def test_sample_bad_draft_flags(draft_file, tmp_path, flags, message):
    out = tmp_path / "grid.png"
    with pytest.raises(ValueError, match=message):
        sample_script.main(sample_script.build_parser().parse_args(
            ["--model", "tiny-random", "--num_iter", "4", "--num_sampling_steps", "5", *flags, "--out", str(out)]))
    assert not out.exists()


# ------------------------------------------------------------------------------------------ the demo pair
def test_shipped_demo_draft_drafts_for_the_demo_model():
    """``pretrained_models/demo/draft.pt`` ships with the clone (required, never skipped): ``demo_draft``
    loads it (half the demo's width, the demo's token grid and tokenizer) and drafts for the demo model.

    Measured (seed 0, 24 images, 16 steps, the demo defaults, preset ``cspd``): acceptance 0.389 (570 of 1,464 drafts), 24 of 24
    classified right. Bounds: acceptance within [measured / 2, 1.5x measured] (a draft of other
    weights, or a broken trajectory alignment, is accepted at ~0 with the target's sd ~1e-3 of the token
    scale); 18 of 24 right as for the demo model alone (noise reads at chance, 2 of 24)."""
    import demo.registry as registry
    from util.loading import load_generator
    assert registry.demo_path("draft").is_file(), "pretrained_models/demo/draft.pt ships with the repository"
    draft, target = load_generator("demo_draft").mar, load_generator("demo").mar
    assert (draft.seq_len, draft.token_embed_dim, draft.z_proj.out_features) == (64, 16, 64)  # encoder width
    assert target.z_proj.out_features == 128 and draft.data_style == target.data_style == "simple"
    log = StatsLog()
    r = registry.class_accuracy(per_class=2, num_iter=16, seed=0, batch_size=24, progress=False,
                                accel=cspd_preset("cspd", draft, on_stats=log))
    # 3 pre-fill steps make 3 tokens; the 13 draft steps the other 61, every one verified once.
    assert len(log.runs) == 1 and (len(log.last.prefill_steps), log.last.verified) == (3, 24 * 61)
    assert 0.389 / 2 <= log.last.acceptance_rate <= 0.389 * 1.5, log.last.acceptance_rate
    assert r["accuracy"] >= 0.75, r
    import argparse
    from evaluation.metrics import prepare_metrics  # eval.py --model demo_draft: scored as the demo is
    assert prepare_metrics(argparse.Namespace(model="demo_draft")).demo_classifier == registry.demo_path("classifier")
