"""The demo evaluation table: generation is seeded per batch, rows are measured, the table renders."""
from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from demo.dataset import HELDOUT_SEED, NUM_CLASSES, make_split
from demo.evaluate import Row, evaluate, format_markdown, load_done_rows, save_rows, summarize
from demo.plot import plot_quality_vs_flops
from models.mar import MAR
from models.vae import AutoencoderKL
from util.generate import SamplingSettings, generate_batches, generate_images
from util.loading import Generator

CLASSIFIER = str(Path(__file__).resolve().parents[1] / "pretrained_models" / "demo" / "classifier.pt")


@pytest.fixture(scope="module")
def tiny_generator():
    torch.manual_seed(0)
    mar = MAR(img_size=64, vae_stride=4, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
              decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, mlp_ratio=2.0, buffer_size=4,
              diffloss_d=1, diffloss_w=32, num_sampling_steps="20", class_num=NUM_CLASSES,
              norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)).eval()
    vae = AutoencoderKL(16, (1, 2, 2), ch=32, num_res_blocks=1, resolution=64).eval()
    return Generator(mar=mar, vae=vae, latent_scale=1.0, name="tiny", is_random=True)


SAMPLING = dict(cfg=2.0, cfg_schedule="linear", temperature=1.0)


def test_generation_is_seeded_per_batch(tiny_generator):
    labels = torch.arange(6) % NUM_CLASSES
    settings = SamplingSettings(num_iter=4, **SAMPLING)
    a, _ = generate_images(tiny_generator, labels, settings, seed=1, batch_size=3)
    b, _ = generate_images(tiny_generator, labels, settings, seed=1, batch_size=3)
    c, _ = generate_images(tiny_generator, labels, settings, seed=2, batch_size=3)
    assert a.shape == (6, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    (second,) = generate_batches(tiny_generator, labels, settings, seed=1, batch_size=3, batches=[1])
    assert second.start == 3 and np.array_equal(second.images, a[3:])  # a batch alone = the same batch in a run


def test_table_rows_and_plot(tiny_generator, tmp_path):
    reference, _ = make_split(5, HELDOUT_SEED)
    rows = evaluate(tiny_generator, steps=[8], policies=[None, "lazymar", "gtr+lazymar", "marche"], per_class=2,
                    sampling=SAMPLING, bsz=12, seeds=[0, 1], classifier_path=CLASSIFIER, reference=reference)
    assert [(r.policy, r.seed) for r in rows] == [(p, s) for p in ("plain", "lazymar", "gtr+lazymar", "marche")
                                                  for s in (0, 1)]
    assert all(r.tflops_per_image < rows[0].tflops_per_image for r in rows[2:])
    assert all(0.0 <= r.class_accuracy <= 1.0 and r.demo_fid > 0 and r.num_images == 24 for r in rows)
    assert rows[0].demo_fid != rows[1].demo_fid  # another seed: other images
    summaries = summarize(rows)
    assert [s.policy for s in summaries] == ["plain", "lazymar", "gtr+lazymar", "marche"]
    first = summaries[0]
    assert first.seeds == (0, 1) and first.demo_fid == pytest.approx((rows[0].demo_fid + rows[1].demo_fid) / 2)
    assert first.demo_fid_range == (min(rows[0].demo_fid, rows[1].demo_fid), max(rows[0].demo_fid, rows[1].demo_fid))
    table = format_markdown(rows, {"class_accuracy": 1.0, "demo_fid": 0.01})
    assert table.count("\n") == 6 and "real held-out data" in table
    assert f"{first.demo_fid:.2f} ({first.demo_fid_range[0]:.2f}-{first.demo_fid_range[1]:.2f})" in table
    path = plot_quality_vs_flops(summaries, tmp_path / "plot.png", size=(400, 300))
    from PIL import Image
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert im.size == (400, 300) and len(np.unique(pixels, axis=0)) > 3  # axes, points and legend drawn
    with pytest.raises(ValueError):
        plot_quality_vs_flops([], tmp_path / "empty.png")


def test_finished_rows_are_reused_and_saved_rows_checked(tiny_generator, tmp_path):
    reference, _ = make_split(3, HELDOUT_SEED)
    common = dict(per_class=1, sampling=SAMPLING, bsz=6, seeds=[0], classifier_path=CLASSIFIER, reference=reference)
    earlier = Row("plain", 4, 1.0, 2.0, 0.5, 9.0, 12, seed=0)  # stands for a row measured by a killed run
    new = []
    rows = evaluate(tiny_generator, steps=[4], policies=[None, "lazymar"], done=[earlier], on_row=new.append,
                    **common)
    assert rows[0] is earlier and [r.policy for r in rows] == ["plain", "lazymar"]
    assert new == rows[1:]  # only the new row was generated and reported

    path = tmp_path / "table.json"
    identity = dict(mar_sha256="abc", per_class=1, cfg=2.0, presets={"lazymar": "LazyMAR(a=1)"})
    assert load_done_rows(path, identity) == ([], {})
    path.write_text(json.dumps({"identity": identity, "rows": [asdict(r) for r in rows]}))
    assert load_done_rows(path, identity)[0][1].seed == 0
    assert load_done_rows(path, identity) == (rows, {"lazymar": "LazyMAR(a=1)"})
    assert load_done_rows(path, identity | {"presets": {"gtr": "GtR()"}})[0] == rows  # other presets: fine
    with pytest.raises(ValueError, match=r"differs in \['cfg'\]"):
        load_done_rows(path, identity | {"cfg": 3.0})
    with pytest.raises(ValueError, match=r"differs in \['preset lazymar'\]"):
        load_done_rows(path, identity | {"presets": {"lazymar": "LazyMAR(a=2)"}})  # an edited preset
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not written by this version"):
        load_done_rows(path, identity)


def test_demo_class_accuracy_uses_the_shared_loop(tiny_generator, monkeypatch, tmp_path):
    import demo.registry as registry
    monkeypatch.setattr(registry, "load_demo", lambda device="cpu", name="mar": (tiny_generator.mar, tiny_generator.vae, 1.0))
    grid = tmp_path / "grid.png"
    a = registry.class_accuracy(per_class=1, num_iter=2, batch_size=6, grid=grid, progress=False)
    b = registry.class_accuracy(per_class=1, num_iter=2, batch_size=6, progress=False)
    assert a["n"] == NUM_CLASSES and 0.0 <= a["accuracy"] <= 1.0 and grid.is_file()
    assert a["per_class"] == b["per_class"] and a["settings"]["num_iter"] == 2


def test_a_one_batch_row_is_timed_after_an_untimed_warm_up(tiny_generator, monkeypatch):
    """A row of one batch used to have nothing after its warm-up batch to time (NaN seconds in the table):
    it is now preceded by an untimed warm-up generation and timed whole, with the same images as before;
    rows saved with NaN are left out of the mean, not averaged in."""
    import demo.evaluate as ev
    labels = torch.arange(NUM_CLASSES) % NUM_CLASSES
    settings = SamplingSettings(num_iter=4, **SAMPLING)
    calls = []
    real = ev.generate_batches

    def spy(gen, lab, *args, **kwargs):
        calls.append(len(lab))
        return real(gen, lab, *args, **kwargs)
    monkeypatch.setattr(ev, "generate_batches", spy)
    row = ev.row_images(tiny_generator, labels, settings, seed=0, bsz=NUM_CLASSES)
    images, seconds = row.images, row.seconds_per_image
    assert calls == [NUM_CLASSES] and seconds > 0  # the warm-up goes through generate_set, then one timed batch
    plain, nan = generate_images(tiny_generator, labels, settings, seed=0, batch_size=NUM_CLASSES)
    assert np.isnan(nan) and np.array_equal(images, plain)
    rows = [Row("plain", 4, 1.0, s, 0.5, 10.0, 12, seed) for seed, s in enumerate((float("nan"), 2.0, 4.0))]
    assert summarize(rows)[0].seconds_per_image == 3.0
    assert np.isnan(summarize(rows[:1])[0].seconds_per_image)


def test_speculative_decoding_rows_hold_their_own_acceptance(tiny_generator):
    """A ``cspd`` row samples the target with a draft and records accepted / verified drafts of exactly
    its own images (not of the warm-up before a one-batch row); a draft identical to the target has
    every draft accepted, another one fewer; FLOPs count both models."""
    from lazymar.cspd import StatsLog, cspd_preset, summarize as summarize_cspd
    from lazymar.flops import estimate
    torch.manual_seed(1)
    other = MAR(img_size=64, vae_stride=4, encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=2,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0, buffer_size=4,
                diffloss_d=1, diffloss_w=16, num_sampling_steps="20", class_num=NUM_CLASSES,
                norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)).eval()
    # Untrained heads predict eps = 0 (their output layer starts at zero), so any two untrained models agree
    # on every token; a bias moves the draft's tokens off the target's, by ~3 of its last-step sd here.
    with torch.no_grad():
        other.diffloss.net.final_layer.linear.bias.fill_(3e-6)
    reference, _ = make_split(3, HELDOUT_SEED)
    common = dict(steps=[8], per_class=1, sampling=SAMPLING, bsz=12, seeds=[3], classifier_path=CLASSIFIER,
                  reference=reference)
    with pytest.raises(ValueError, match="draft"):
        evaluate(tiny_generator, policies=["cspd"], **common)
    plain, same = evaluate(tiny_generator, policies=[None, "cspd"], draft=tiny_generator.mar, **common)
    (small,) = evaluate(tiny_generator, policies=["cspd"], draft=other, **common)
    assert plain.acceptance_rate is None and same.acceptance_rate == 1.0
    log = StatsLog()
    settings = SamplingSettings(num_iter=8, accel=cspd_preset("cspd", other, on_stats=log), **SAMPLING)
    list(generate_batches(tiny_generator, torch.arange(12) % NUM_CLASSES, settings, seed=3, batch_size=12))
    assert 0.2 < small.acceptance_rate == summarize_cspd([log.last.as_dict()])["acceptance_rate"] < 0.95
    # A row of several batches: every batch's generation, none left out (3 batches of 4 images).
    (batched,) = evaluate(tiny_generator, policies=["cspd"], draft=other, **common | {"bsz": 4})
    log = StatsLog()
    settings = SamplingSettings(num_iter=8, accel=cspd_preset("cspd", other, on_stats=log), **SAMPLING)
    list(generate_batches(tiny_generator, torch.arange(12) % NUM_CLASSES, settings, seed=3, batch_size=4))
    assert len(log.runs) == 3
    assert 0.2 < batched.acceptance_rate == summarize_cspd([r.as_dict() for r in log.runs])["acceptance_rate"] < 0.95
    assert small.tflops_per_image == pytest.approx(estimate(tiny_generator.mar, num_iter=8, cfg=2.0, bsz=12,
                                                            accel=cspd_preset("cspd", other)).total / 1e12)
    assert plain.tflops_per_image < same.tflops_per_image  # the same-size draft costs more than it saves
    table = format_markdown([plain, small], None)
    assert "drafts accepted" in table.splitlines()[0] and table.count("| - |") == 1
    assert table.splitlines()[-1].endswith(f"| {small.acceptance_rate:.1%} |")
    assert "drafts accepted" not in format_markdown([plain], None)


@pytest.fixture(scope="module")
def conditioned_generator(tiny_generator):
    """tiny_generator's MAR on the linear noise schedule with the head's adaLN weights perturbed. With
    adaLN-Zero's init the head predicts 0 whatever its condition, and with the cosine schedule its tokens are
    its starting noise x 2e4 (test_preset_bands): either way a transformer approximation would not show."""
    import dataclasses
    torch.manual_seed(0)
    mar = MAR(img_size=64, vae_stride=4, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
              decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, mlp_ratio=2.0, buffer_size=4,
              diffloss_d=1, diffloss_w=32, num_sampling_steps="20", class_num=NUM_CLASSES, noise_schedule="linear",
              norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in mar.diffloss.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.02)
    return dataclasses.replace(tiny_generator, mar=mar)


def test_rows_are_compared_with_plain_on_common_random_numbers(conditioned_generator, tmp_path, monkeypatch):
    """Plain MAR first, then each row's difference from it: exact zero for a preset that is plain MAR
    (lazymar-off), twin distances only where the preset pairs with plain, the same comparison after a
    resume that finds plain's per-image data on disk instead of sampling it again."""
    import demo.evaluate as ev
    reference, _ = make_split(5, HELDOUT_SEED)
    kwargs = dict(steps=[16], per_class=2, sampling=SAMPLING, bsz=12, seeds=[0], classifier_path=CLASSIFIER,
                  reference=reference, samples_dir=tmp_path / "samples", resamples=200)
    rows = evaluate(conditioned_generator, policies=["lazymar-off", None, "lazymar-scaled", "gtr"], **kwargs)
    assert [r.policy for r in rows] == ["lazymar-off", "plain", "lazymar-scaled", "gtr"]  # the order asked for
    off, plain, lazy, gtr = rows
    assert plain.vs_plain is None
    assert plain.intervals["demo_fid"]["value"] == pytest.approx(plain.demo_fid, rel=1e-4)  # = torch-fidelity's
    acc = plain.intervals["class_accuracy"]
    assert acc["value"] == pytest.approx(plain.class_accuracy) and acc["low"] <= acc["value"] <= acc["high"]
    diff = off.vs_plain["difference"]
    assert all(diff[m] == {"value": 0.0, "low": 0.0, "high": 0.0} for m in ("demo_fid", "kid", "class_accuracy"))
    assert off.vs_plain["verdict"]["demo_fid"] == "no detectable difference"
    assert off.vs_plain["twin"]["psnr"]["value"] is None  # infinite: identical images
    assert off.vs_plain["twin"]["ssim"]["value"] == pytest.approx(1.0)
    assert lazy.vs_plain["paired"] and 0 < lazy.vs_plain["twin"]["token_rel_err"]["value"] < 0.1
    assert not gtr.vs_plain["paired"] and "twin" not in gtr.vs_plain
    d = gtr.vs_plain["difference"]["demo_fid"]
    assert d["low"] <= d["value"] <= d["high"] and d["value"] == pytest.approx(gtr.demo_fid - plain.demo_fid, rel=1e-3)

    sampled = []
    real = ev.generate_set
    monkeypatch.setattr(ev, "generate_set", lambda *a, **k: sampled.append(a[2].accel) or real(*a, **k))
    again = evaluate(conditioned_generator, policies=[None, "gtr"], done=[plain], **kwargs)
    assert sampled == ["gtr"]  # plain's images came from samples_dir, not from sampling them again
    assert again[1].vs_plain == gtr.vs_plain and again[1].intervals == gtr.intervals


def strict_json(text: str):
    """``json.loads`` that refuses what is not JSON (``NaN``, ``Infinity``), as strict readers do."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_saved_rows_are_strict_json_and_read_back(tmp_path):
    """A row without a time (NaN seconds) is written as null and read back as NaN; the shipped table too."""
    rows = [Row("plain", 64, 0.04, float("nan"), 0.9, 10.5, 120, 0), Row("lazymar", 64, 0.02, 0.2, 0.9, 11.0, 120, 1),
            Row("cspd", 64, 0.03, 0.4, 0.95, 9.4, 120, 0, acceptance_rate=0.32)]
    identity = dict(mar_sha256="abc", cfg=3.0, presets={"lazymar": "LazyMAR()"})
    path = tmp_path / "table.json"
    save_rows(path, identity, {"cfg": None}, {"demo_fid": 0.4, "class_accuracy": 1.0}, rows)
    saved = strict_json(path.read_text())
    assert saved["rows"][0]["seconds_per_image"] is None and saved["rows"][0]["acceptance_rate"] is None
    back, presets = load_done_rows(path, identity)
    assert np.isnan(back[0].seconds_per_image) and back[1:] == rows[1:] and presets == identity["presets"]
    assert [asdict(r) for r in back][0] | {"seconds_per_image": 0} == asdict(rows[0]) | {"seconds_per_image": 0}


# table: (temperature, which presets it holds: "all" of the comparison and CSpD, or the "paired" ones)
SHIPPED_TABLES = {"demo_quality_t04": (0.4, "all"), "demo_quality_t10": (1.0, "all"),
                  "demo_quality_t04_n1320": (0.4, "paired")}
RESOLVED = 0.03  # the paired table's claim: every difference resolved to +-3% of plain's demo FID


@pytest.mark.parametrize("name", sorted(SHIPPED_TABLES))
def test_shipped_tables_compare_every_row_with_plain(name):
    """The quality tables as shipped (docs/quality.md): strict JSON that reads back under its own identity, one plain
    row, every other row measured against it on the same images with a verdict its interval implies, and
    twin distances exactly for the presets that claim pairing (lazymar.names.pairs_with_plain)."""
    from demo.compare import images_to_resolve
    from demo.evaluate import COMPARISON
    from lazymar.names import pairs_with_plain
    from util.stats import Interval, verdict
    path = Path(__file__).resolve().parents[1] / "docs" / f"{name}.json"
    table = strict_json(path.read_text())
    temperature, holds = SHIPPED_TABLES[name]
    assert table["identity"]["temperature"] == temperature
    rows, _ = load_done_rows(path, table["identity"])
    (plain,) = [r for r in rows if r.policy == "plain"]
    others = [r for r in rows if r.policy != "plain"]
    if holds == "all":
        assert {r.policy for r in others} >= {p for p in COMPARISON if p != "none"} | {"cspd", "cspd-release"}
    else:  # the paired presets, each resolved to +-3% (half the interval's width within 3% of plain)
        assert {r.policy for r in others} == {p for p in COMPARISON if p != "none" and pairs_with_plain(p)}
        for r in others:
            d = r.vs_plain["difference"]["demo_fid"]
            assert (d["high"] - d["low"]) / 2 <= RESOLVED * plain.demo_fid, r.policy
    for r in others:
        assert r.num_images == plain.num_images and r.seed == plain.seed
        d = r.vs_plain["difference"]["demo_fid"]
        assert d["low"] <= d["value"] <= d["high"]
        assert d["value"] == pytest.approx(r.demo_fid - plain.demo_fid, abs=1e-3)
        assert r.vs_plain["verdict"]["demo_fid"] == verdict(Interval(d["value"], d["low"], d["high"]),
                                                            higher_is_better=False)
        assert r.vs_plain["paired"] == pairs_with_plain(r.policy) == ("twin" in r.vs_plain)
        assert images_to_resolve(d, r.num_images, plain.demo_fid) > 0


def test_the_difference_plot_needs_rows_compared_with_plain(tmp_path):
    from PIL import Image

    from demo.plot import plot_difference_vs_flops
    plain = Row("plain", 64, 0.04, 0.5, 0.9, 10.0, 120, 0)
    lazy = Row("lazymar", 64, 0.02, 0.2, 0.9, 10.5, 120, 0,
               vs_plain={"difference": {"demo_fid": {"value": 0.5, "low": 0.1, "high": 0.9}}})
    with Image.open(plot_difference_vs_flops([plain, lazy], tmp_path / "d.png", size=(400, 300))) as im:
        assert im.size == (400, 300) and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 3
    with pytest.raises(ValueError, match="no rows measured against plain"):
        plot_difference_vs_flops([plain], tmp_path / "none.png")


def test_the_power_column_scales_the_measured_interval():
    """Images for a +-3% interval: a difference interval of +-0.6 on 120 images, plain at 10.0 (target +-0.3),
    needs 4x the images; a zero-width interval (a preset identical to plain) has nothing to scale."""
    from demo.compare import images_to_resolve
    from demo.evaluate import format_comparison
    assert images_to_resolve({"value": 0.1, "low": -0.5, "high": 0.7}, 120, 10.0) == 480
    assert images_to_resolve({"value": 0.1, "low": -0.5, "high": 0.7}, 120, -10.0) == 480
    assert images_to_resolve({"value": 0.0, "low": 0.0, "high": 0.0}, 120, 10.0) is None
    assert images_to_resolve({"value": 0.0, "low": None, "high": 0.2}, 120, 10.0) is None
    plain = Row("plain", 64, 0.04, 0.5, 0.9, 10.0, 120, 0)
    lazy = Row("lazymar", 64, 0.02, 0.2, 0.9, 10.1, 120, 0,
               vs_plain={"paired": True, "difference": {"demo_fid": {"value": 0.1, "low": -0.1, "high": 0.3}},
                         "verdict": {"demo_fid": "no detectable difference"}})
    last = format_comparison([plain, lazy], None).splitlines()[-1].split("|")
    assert last[-2].strip() == "54" and last[-3].strip() == "no detectable difference"  # 120 * (0.2 / 0.3)^2
