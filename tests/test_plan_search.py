"""The acceleration planner end to end on a tiny model: it prunes what does not compose, finds a front
that is one, reports held-out numbers, resumes without measuring twice, keeps to its time box,
refuses a results file of other settings, and exports presets that lazymar loads and samples with."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_mar
from demo.dataset import HELDOUT_SEED, NUM_CLASSES, make_split
from demo.plan_search import (DemoMeasure, PlanSettings, Point, ResultsFile, choose_presets, dominates, format_report,
                              main, nearest_front, pareto_front, plot_front, preset_entries, qualifies, sample_space,
                              search)
from demo.evaluate import Row
from lazymar.config import PRESETS
from lazymar.names import preset
from lazymar.flops import estimate
from lazymar.planned import write_planned
from lazymar.search_space import (Candidate, DiSASpace, GtRSpace, IntervalSpace, LazyMARSpace, MARcheSpace,
                                  ReCAPSpace, SearchSpace, candidates)
from models.vae import AutoencoderKL
from util.loading import Generator

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = str(ROOT / "pretrained_models" / "demo" / "classifier.pt")
# 16 combinations: LazyMAR (off, condition+head) x GtR x DiSA x ReCAP (each off or one setting). ReCAP
# composes with neither GtR nor DiSA: 6 of the 8 with ReCAP on are pruned, 10 remain (plain among them).
SPACE = SearchSpace(num_iter=(4,), cfg=(2.0,),
                    lazymar=LazyMARSpace(caches=((), ("condition", "head")), refresh_interval=(0.5,)),
                    gtr=GtRSpace(stage_steps=((0.5, 0.25, 0.25),), head_steps=((10, 5, 5),), fts=(False,)),
                    disa=DiSASpace(bounds=((10, 2),), annealing=("linear",)),
                    recap=ReCAPSpace(full_fraction=(0.5,), cheap_steps=(1,)),
                    marche=MARcheSpace(active_fraction=()), interval=IntervalSpace(t_max=()))
SETTINGS = PlanSettings(reference=(4, 2.0), rungs=(1, 2), eta=3, max_configs=20, select_seeds=(0,),
                        report_seeds=(1, 2), report_per_class=1, bsz=6)
ANCHORS = {"lazymar": PRESETS["lazymar"]}
TARGETS = {"fast": 0.25, "balanced": 0.05}


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: the measurements are many and tiny (and the tests share 2 cores)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def generator():
    """conftest's tiny MAR at 32 px (8 x 8 tokens) with the demo's 12 classes, and a tiny KL decoder."""
    mar = build_tiny_mar(img_size=32, vae_stride=4, class_num=NUM_CLASSES)
    torch.manual_seed(0)
    vae = AutoencoderKL(16, (1, 2, 2), ch=32, num_res_blocks=1, resolution=32).eval()
    return Generator(mar=mar, vae=vae, latent_scale=1.0, name="tiny", is_random=True)


@pytest.fixture(scope="module")
def measure(generator, tmp_path_factory):
    reference, _ = make_split(2, HELDOUT_SEED, size=32)
    return DemoMeasure(generator, classifier_path=CLASSIFIER, reference=reference, cfg_schedule="linear",
                       temperature=1.0, bsz=SETTINGS.bsz, reference_settings=SETTINGS.reference,
                       samples_dir=tmp_path_factory.mktemp("plain"), reference_cache=(tmp_path_factory.mktemp("fid"), "tiny-ref"),
                       resamples=100)


class Counting:
    """A measure that records what it was asked for and advances a fake clock by ``seconds`` per call."""

    def __init__(self, measure, clock=None, seconds: float = 0.0) -> None:
        self.measure, self.clock, self.seconds, self.calls = measure, clock, seconds, []

    def __call__(self, cand, per_class, seeds):
        self.calls += [(cand.key, per_class, s) for s in seeds]
        if self.clock is not None:
            self.clock.now += self.seconds
        return self.measure(cand, per_class, seeds)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(generator, measure, path, **overrides):
    kwargs = dict(model=generator.mar, measure=measure, results_path=path, identity={"model": "tiny"},
                  settings=SETTINGS, anchors=ANCHORS, targets=TARGETS)
    return search(SPACE, **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def planned(generator, measure, tmp_path_factory):
    """One complete search, shared by the tests below; its measure records the calls."""
    torch.set_num_threads(1)  # as _one_thread sets it for every test: reruns below compare numbers
    counting = Counting(measure)
    path = tmp_path_factory.mktemp("plan") / "results.jsonl"
    return run(generator, counting, path), path, counting


def test_the_space_is_pruned_by_the_composition_rules():
    cands, pruned = candidates(SPACE)
    assert SPACE.size() == 16 and len(cands) == 10 and sum(pruned.values()) == 6
    assert all("ReCAP" in reason for reason in pruned)
    assert sum(c.accel is None for c in cands) == 1  # every technique off is plain MAR itself
    assert len({c.key for c in cands}) == 10


def test_a_small_budget_finds_a_front(planned, generator):
    result, path, counting = planned
    assert result.complete and result.space_size == 16 and result.valid == 10 and sum(result.pruned.values()) == 6
    # Rung 1: the 10 valid configurations (plain once, with its name) and the lazymar anchor; rung 2: the
    # anchors and the third nearest the front.
    assert result.rung_sizes[0] == 11 and 2 < result.rung_sizes[1] < 11
    plain = result.plain
    assert plain.cand.name == "plain" and plain.tflops == pytest.approx(
        estimate(generator.mar, num_iter=4, cfg=2.0, bsz=SETTINGS.bsz).total / 1e12)
    last, front = result.last, result.front
    assert len(last) == result.rung_sizes[1]
    assert all(not dominates(q, p) for p in front for q in last)  # nothing dominates a front point
    for p in last:  # and every other point is dominated by one on the front
        assert p in front or any(dominates(f, p) for f in front)
    assert [p.tflops for p in front] == sorted(p.tflops for p in front)
    assert all(len(p.rows) == 1 and p.rows[0].num_images == 2 * NUM_CLASSES for p in last)
    # Every accelerated configuration measured at the last rung costs fewer FLOPs than plain MAR.
    assert all(p.tflops < plain.tflops for p in last if p.cand.accel is not None and p.cand.name is None)


def test_presets_are_chosen_on_selection_seeds_and_reported_on_others(planned):
    result, path, _ = planned
    plain = result.plain
    for name, bound in TARGETS.items():
        ok = [p for p in result.last if qualifies(p, plain, bound) and (p.cand.num_iter, p.cand.cfg) == SETTINGS.reference]
        assert result.picks[name].tflops == min(p.tflops for p in ok)
    # Every measured configuration carries its loss interval against plain MAR (the same labels and seed).
    for p in result.last:
        if p.cand.key != plain.cand.key:
            d = p.rows[0].vs_plain["difference"]["demo_fid"]
            assert d["low"] <= d["value"] <= d["high"] and p.fid_loss_high == d["high"]
            assert d["value"] == pytest.approx(p.fid - plain.fid, abs=0.05 * plain.fid)
    assert result.picks["fast"].tflops <= result.picks["balanced"].tflops
    reported = set(result.anchors) | {p.cand.key for p in result.front} | {p.cand.key for p in result.picks.values()}
    assert set(result.report) == reported
    saved = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    for key, summary in result.report.items():
        rows = [Row(**e["row"]) for e in saved if e["config"] == key and e["row"]["seed"] in SETTINGS.report_seeds
                and e["per_class"] == SETTINGS.report_per_class]
        assert summary.seeds == (1, 2) and sorted(r.seed for r in rows) == [1, 2]  # not the selection seed
        fids = [r.demo_fid for r in rows]
        assert summary.demo_fid == pytest.approx(sum(fids) / 2) and summary.demo_fid_range == (min(fids), max(fids))
    table = format_report(result, SETTINGS)
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == len(result.report)
    for p in result.front:
        assert any(row.startswith(f"| {p.cand.label} |") and "front" in row for row in rows)
    for name, p in result.picks.items():
        assert any(row.startswith(f"| {p.cand.label} |") and f"**{name}**" in row for row in rows)
    assert "16 combinations, 6 pruned" in table and "cheaper than `lazymar`" in table
    assert f"{result.report[plain.cand.key].demo_fid:.2f} (" in table


def test_resume_measures_nothing_twice(planned, generator, measure, tmp_path):
    result, path, counting = planned
    assert len(counting.calls) == len(set(counting.calls)) == result.measured
    again = Counting(measure)
    rerun = run(generator, again, path)
    assert again.calls == [] and rerun.measured == 0 and rerun.reused == result.measured + result.reused
    assert [p.cand.key for p in rerun.front] == [p.cand.key for p in result.front]
    # A run killed while writing: the last three measurements lost, a line cut in half.
    lines = path.read_text().splitlines()
    cut = tmp_path / "results.jsonl"
    cut.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:25])
    resumed_measure = Counting(measure)
    resumed = run(generator, resumed_measure, cut)
    lost = [(e["config"], e["per_class"], e["row"]["seed"]) for e in map(json.loads, lines[-3:])]
    assert sorted(resumed_measure.calls) == sorted(lost)
    assert resumed.report.keys() == result.report.keys()
    for key, summary in resumed.report.items():
        assert summary.demo_fid == pytest.approx(result.report[key].demo_fid, rel=1e-6)
    assert {n: p.cand.key for n, p in resumed.picks.items()} == {n: p.cand.key for n, p in result.picks.items()}


def test_the_time_box_is_respected_and_a_rerun_continues(generator, measure, tmp_path):
    clock = FakeClock()
    slow = Counting(measure, clock, seconds=100.0)  # every measurement takes 100 s on the fake clock
    path = tmp_path / "results.jsonl"
    first = run(generator, slow, path, clock=clock, budget_s=250.0)
    assert not first.complete and 1 <= len(slow.calls) <= 2 and clock.now <= 250.0
    assert "stopped by the time box" in format_report(first, SETTINGS)
    assert len(path.read_text().splitlines()) == 1 + len(slow.calls)  # identity + what was measured
    done = list(slow.calls)
    second = run(generator, slow, path, clock=clock, budget_s=250.0)
    assert not second.complete and second.reused == len(done)
    assert not set(slow.calls[len(done):]) & set(done) and len(slow.calls) > len(done)
    # Plain MAR first (every other point is compared with it), then the cheapest FLOPs first.
    lines = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert lines[0]["label"].startswith("plain")
    tflops = [line["row"]["tflops_per_image"] for line in lines[1:]]
    assert tflops == sorted(tflops)


def test_a_resume_with_other_settings_is_refused(planned, generator, measure):
    _, path, _ = planned
    never = Counting(measure)
    with pytest.raises(ValueError, match=r"differs in \['settings.eta'\]"):
        run(generator, never, path, settings=replace(SETTINGS, eta=2))
    with pytest.raises(ValueError, match=r"differs in \['model'\]"):
        run(generator, never, path, identity={"model": "other"})
    other_space = replace(SPACE, gtr=replace(SPACE.gtr, fts=(True,)))
    with pytest.raises(ValueError, match=r"differs in \['space.gtr.fts'\]"):
        search(other_space, model=generator.mar, measure=never, results_path=path, identity={"model": "tiny"},
               settings=SETTINGS, anchors=ANCHORS, targets=TARGETS)
    assert never.calls == []


def test_exported_presets_load_and_sample(planned, generator, tmp_path, monkeypatch):
    import lazymar.planned as planned_module
    result, _, _ = planned
    missing = tmp_path / "none.json"
    monkeypatch.setattr(planned_module, "PLANNED_FILE", missing)
    with pytest.raises(ValueError, match="chosen by measurement.*python -m demo.plan_search"):
        preset("fast")
    import sample as sample_script
    parse = sample_script.build_parser().parse_args
    with pytest.raises(ValueError, match="python -m demo.plan_search"):  # refused before any model loads
        sample_script.main(parse(["--model", "tiny-random", "--accel", "fast", "--out", str(tmp_path / "x.png")]))

    file = tmp_path / "planned_presets.json"
    entries = preset_entries(result, SETTINGS, TARGETS)
    write_planned(file, entries, about={"model": "tiny-random"})  # what the planner records: the model it measured
    monkeypatch.setattr(planned_module, "PLANNED_FILE", file)
    for name, pick in result.picks.items():
        assert preset(name) == (pick.cand.accel or PRESETS["lazymar-off"])
        held = entries[name]["held_out"]
        assert held["seeds"] == [1, 2] and held["demo_fid"] == result.report[pick.cand.key].demo_fid
    labels = torch.arange(2)
    by_name = generator.mar.sample_tokens(2, num_iter=4, cfg=2.0, labels=labels, accel="fast",
                                          generator=torch.Generator().manual_seed(0))
    by_config = generator.mar.sample_tokens(2, num_iter=4, cfg=2.0, labels=labels, accel=preset("fast"),
                                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(by_name, by_config) and torch.isfinite(by_name).all()
    out = tmp_path / "grid.png"
    sample_script.main(parse(["--model", "tiny-random", "--accel", "fast", "--num_iter", "4", "--classes", "0", "1",
                              "--num_per_class", "1", "--out", str(out)]))
    assert out.is_file()
    with pytest.raises(ValueError, match="paper presets"):
        write_planned(file, {"lazymar": entries["fast"]}, about={})


def test_the_plot_marks_presets_and_anchors(planned, tmp_path):
    import numpy as np
    from PIL import Image
    result, _, _ = planned
    path = plot_front(result, tmp_path / "front.png")
    with Image.open(path) as im:
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 3


def _point(name: str, tflops: float, fid: float) -> Point:
    cand = Candidate(4 + ord(name[0]), 2.0, None, name)  # a step count per name: a key per point
    return Point(cand, tflops, [Row(cand.key, cand.num_iter, tflops, 0.1, 0.5, fid, 12)])


def _with_loss(point: Point, value: float, low: float, high: float) -> Point:
    point.rows[0].vs_plain = {"difference": {"demo_fid": {"value": value, "low": low, "high": high}}}
    return point


def test_a_configuration_qualifies_by_the_upper_end_of_its_loss_interval():
    def point(name, accel, tflops, fid):
        return Point(Candidate(64, 3.0, accel, name), tflops, [Row(name, 64, tflops, 0.1, 0.5, fid, 12)])

    plain = point("plain", None, 10, 10)
    narrow = _with_loss(point("narrow", PRESETS["lazymar"], 2, 10.3), 0.3, 0.1, 0.45)  # at most 4.5% of 10 worse
    wide = _with_loss(point("wide", PRESETS["gtr"], 1, 10.1), 0.1, -1.5, 1.7)  # a better mean, up to 17% worse
    assert qualifies(narrow, plain, 0.05) and not qualifies(wide, plain, 0.05) and qualifies(wide, plain, 0.25)
    assert qualifies(plain, plain, 0.0) and not qualifies(point("unmeasured", PRESETS["marche"], 1, 9), plain, 1.0)
    picks = choose_presets([plain, narrow, wide], plain, {"fast": 0.25, "balanced": 0.05}, (64, 3.0))
    assert picks["fast"].cand.name == "wide" and picks["balanced"].cand.name == "narrow"
    picks = choose_presets([plain, narrow, wide], plain, {"fast": 0.04, "balanced": 0.01}, (64, 3.0))
    assert picks["fast"] is picks["balanced"] is plain  # nothing qualifies: plain MAR itself


def test_front_selection_on_known_points():
    a, b, c, d, e = (_point("a", 1, 10), _point("b", 2, 5), _point("c", 2, 8), _point("d", 3, 5), _point("e", 4, 1))
    nan = _point("nan", 0.5, math.nan)  # a failed FID is never on the front, however cheap
    assert [p.cand.name for p in pareto_front([a, b, c, d, e, nan])] == ["a", "b", "e"]
    assert dominates(b, c) and dominates(b, d) and not dominates(a, b) and not dominates(b, b)
    assert [p.cand.name for p in nearest_front([a, b, c, d, e], 2)] == ["a", "e"]  # spread along the front
    assert {p.cand.name for p in nearest_front([a, b, c, d, e], 4)} == {"a", "b", "e", "c"}
    assert [p.cand.name for p in nearest_front([nan, a, b], 3)] == ["a", "b", "nan"]


def test_the_sample_spreads_over_compositions_and_favours_the_reference():
    space = SearchSpace(num_iter=(8, 16), cfg=(2.0,))
    cands, _ = candidates(space)
    picked = sample_space(cands, 12, (16, 2.0), seed=0)
    assert len(picked) == len(set(picked)) == 12 and sum(c.num_iter == 16 for c in picked) == 6
    techniques = {tuple(cls.__name__ for cls, _ in c.accel.enabled()) if c.accel else () for c in picked}
    assert len(techniques) >= 6  # drawn from different compositions, not six settings of one
    assert sample_space(cands, 12, (16, 2.0), seed=0) == picked != sample_space(cands, 12, (16, 2.0), seed=1)
    assert sample_space(cands, 10 ** 6, (16, 2.0), seed=0).__len__() == len(cands)


def test_results_file_of_another_tool_is_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"rows": []}\n')
    with pytest.raises(ValueError, match="not a results file"):
        ResultsFile(path, {"model": "tiny"})


def test_command_line_checks_before_loading(tmp_path):
    with pytest.raises(ValueError, match="both select and report"):
        main(["--budget_s", "1", "--out", str(tmp_path), "--select_seeds", "1", "--report_seeds", "1"])
    with pytest.raises(ValueError, match="paper preset names"):
        main(["--budget_s", "1", "--out", str(tmp_path), "--targets", "lazymar=0.1"])
    with pytest.raises(ValueError, match="rungs must be increasing"):
        main(["--budget_s", "1", "--out", str(tmp_path), "--rungs", "6", "2"])
    assert not any(tmp_path.iterdir())


def test_the_command_line_writes_table_plot_and_presets(generator, tmp_path, monkeypatch):
    """``main`` end to end on the tiny model (loaded in place of the demo model, a smaller reference)."""
    import demo.evaluate
    import demo.registry
    import lazymar.search_space
    import util.loading
    monkeypatch.setattr(util.loading, "load_generator", lambda name, **kwargs: generator)
    monkeypatch.setattr(demo.evaluate, "REFERENCE_PER_CLASS", 2)
    monkeypatch.setitem(demo.registry.DEMO_DEFAULTS, "num_iter", 4)
    monkeypatch.setitem(demo.registry.DEMO_DEFAULTS, "cfg", 2.0)
    monkeypatch.setitem(lazymar.search_space.SPACES, "tiny", SPACE)
    out, presets = tmp_path / "plan", tmp_path / "planned_presets.json"
    argv = ["--budget_s", "600", "--out", str(out), "--space", "tiny", "--max_configs", "3", "--rungs", "1",
            "--report_per_class", "1", "--bsz", "6", "--anchors", "--presets_file", str(presets)]
    assert main(argv) == 0
    assert {f.name for f in out.iterdir()} >= {"results.jsonl", "front.md", "front.png", "presets.json"}
    table = (out / "front.md").read_text()
    assert "16 combinations, 6 pruned" in table and "4 at 1/class" in table and "**fast**" in table
    written = json.loads(presets.read_text())
    assert sorted(written["presets"]) == ["balanced", "fast"] and written == json.loads((out / "presets.json").read_text())
    assert written["presets"]["fast"]["held_out"]["seeds"] == [1, 2]
    lines = len((out / "results.jsonl").read_text().splitlines())
    assert main(argv) == 0 and len((out / "results.jsonl").read_text().splitlines()) == lines  # all reused
    with pytest.raises(ValueError, match=r"differs in \['settings.max_configs'\]"):
        main([*argv[:6], "--max_configs", "4", *argv[8:]])
    # A fix of the measurement code: the same command measures again instead of reusing the old lines.
    import demo.plan_search
    identity = json.loads((out / "results.jsonl").read_text().splitlines()[0])["identity"]
    assert identity["code_sha256"] == demo.plan_search.measurement_code_sha256()
    monkeypatch.setattr(demo.plan_search, "measurement_code_sha256", lambda root=None: "0" * 64)
    with pytest.raises(ValueError, match=r"differs in \['code_sha256'\]"):
        main(argv)
    assert len((out / "results.jsonl").read_text().splitlines()) == lines  # nothing appended


def test_the_measurement_code_digest_covers_what_makes_a_measurement(tmp_path):
    """Editing the sampler, a technique, its FLOPs count, the search space or the demo's measure changes
    the digest in the results' identity; the planner's own selection and report (demo/plan_search.py) do not
    change a measurement and are not part of it."""
    from demo.plan_search import MEASUREMENT_CODE, measurement_code_sha256
    root = tmp_path / "tree"
    for source in (*MEASUREMENT_CODE, "demo/plan_search.py"):
        src = ROOT / source
        for f in sorted(src.rglob("*.py")) if src.is_dir() else [src]:
            dst = root / f.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    base = measurement_code_sha256(root)
    assert base == measurement_code_sha256()  # the copy is the tree
    for name in ("models/mar.py", "models/runner.py", "lazymar/flops.py", "lazymar/search_space.py",
                 "lazymar/token_cache.py", "util/generate.py", "demo/evaluate.py", "demo/fidelity.py",
                 "demo/dataset.py", "demo/classifier.py"):
        path = root / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        assert measurement_code_sha256(root) != base, name
        path.write_bytes(original)
    (root / "demo/plan_search.py").write_bytes(b"# edited\n")
    assert measurement_code_sha256(root) == base


# ------------------------------------------------------------------------ a plan on another model
@pytest.mark.parametrize("script", ["eval", "sample"])
def test_a_planned_preset_is_refused_on_a_model_it_was_not_chosen_on(script, monkeypatch):
    """The shipped fast/balanced were measured on the demo model: on mar_huge the scripts refuse them
    before loading anything, saying what they were chosen on and the two ways on; on the demo, or with
    --plan_from_other_model, they run (eval.py then records what the plan was chosen on)."""
    import importlib

    import models.mar
    from lazymar.planned import check_planned_model, plan_origin
    mod = importlib.import_module(script)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the plan's model was checked")
    monkeypatch.setattr(models.mar, "build_released", no_model)
    monkeypatch.setattr(mod, "_load", no_model, raising=False)
    args = mod.build_parser().parse_args(["--model", "mar_huge", "--accel", "fast"])
    with pytest.raises(ValueError) as e:
        mod.main(args)
    message = str(e.value)
    assert "the planner's choice for the demo model (gtr+disa+lazymar @ 64 steps, cfg 3)" in message
    assert "not on mar_huge" in message and "--plan_from_other_model" in message
    assert "--accel gtr+disa+lazymar" in message
    origin = plan_origin("fast")
    assert origin["model"] == "demo" and origin["num_iter"] == 64 and len(origin["mar_sha256"]) == 64
    assert check_planned_model("fast", "demo") == origin
    assert check_planned_model("fast", "mar_huge", other_model=True) == origin
    assert check_planned_model("lazymar", "mar_huge") is None and check_planned_model(None, "mar_huge") is None


def test_the_opt_in_is_recorded_in_the_run_identity():
    from evaluation.run import accel_name, run_identity
    from util.loading import load_generator
    import eval as eval_script
    args = eval_script.build_parser().parse_args(["--model", "tiny-random", "--accel", "fast",
                                                  "--plan_from_other_model", "--output_dir", "unused"])
    assert accel_name(args) == "fast"
    gen = load_generator("tiny-random")
    identity = run_identity(args, "fast", gen, torch.device("cpu"), 10)
    assert identity["plan_from_other_model"]["model"] == "demo"
    args.plan_from_other_model = False
    with pytest.raises(ValueError, match="not on tiny-random"):
        accel_name(args)
