"""The acceleration planner: for a quality budget, the cheapest way to sample, found by measurement.

    python -m demo.plan_search --model demo --budget_s 1200 --out output/plan_demo

It searches the compositions of the techniques and their settings (:mod:`lazymar.search_space`; the
ones the composition rules reject are pruned and counted) on the demo model, where quality can be
measured: class accuracy and demo FID of generated images against the held-out reference
(:func:`demo.evaluate.evaluate`); cost is the FLOPs of the executed plan and CPU seconds per image.

Successive halving: a sample of the space (half at the reference sampling settings, half elsewhere,
spread over the compositions) plus the named presets given as anchors is measured on a few images
per class, cheapest FLOPs first; the third of it nearest the Pareto front of (FLOPs, demo FID) is
measured again on more images, and so on. The front of the last rung, the anchors and the exported
presets are then measured on other seeds: which points form the front and which become presets is
decided on the selection seeds, and the quality reported for them comes from the held-out seeds,
with its range (the selection value stands beside it, labelled as such). Every measurement is compared
with plain MAR at the reference settings on common random numbers (same labels, seed and batch size), so
each carries the 95% interval of its demo FID loss (:mod:`demo.compare`). A preset ``fast`` with bound
0.25 is the cheapest configuration at the reference sampling settings (the ones ``--accel`` runs with)
whose loss interval on the selection seeds ends within 25% of plain MAR's demo FID (:func:`qualifies`): a
configuration qualifies by its worst plausible loss, not its mean. It is written to
``lazymar/planned_presets.json`` with its held-out measurements and their intervals.

``--out`` holds ``results.jsonl`` (the run identity, then one line per measurement, appended as it
finishes: the same command run again reuses them and continues; other settings, weights or measurement
code (:data:`MEASUREMENT_CODE`) are refused, naming what differs), ``front.md`` (the table), ``front.png`` (the plot), ``presets.json`` (the export) and
``fidelity_cache/`` (the reference images' classifier features, computed once).
``--budget_s`` bounds the wall time of the search (loading the model and the reference come before it):
no measurement starts that its predicted time (from its FLOPs and the seconds per FLOP so far) would
carry past it; what is measured stays saved.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from demo.dataset import NUM_CLASSES
from demo.compare import RowSample
from demo.evaluate import Row, Summary, evaluate, plain_sample_path, row_from_json, row_to_json, summarize
from lazymar.planned import config_to_dict
from lazymar.search_space import Candidate, SearchSpace, candidates, price
from util.hashing import source_sha256
from util.stats import BOOTSTRAP_RESAMPLES

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
ROOT = Path(__file__).resolve().parents[1]
# The sources whose edits can change a measurement (a line of results.jsonl), so their digest is part of the
# results' identity: the sampler and every technique with its FLOPs count and search space (a line is found
# by its candidate's key), how weights are read and images generated and timed, and the demo's measure (data,
# classifier, metrics, demo.evaluate). This module's selection and report are not: they decide which
# configurations to measure and how to show them, and a measurement reused under their edit is still right.
MEASUREMENT_CODE = ("models", "lazymar", "util/generate.py", "util/loading.py", "util/checkpoint.py",
                    "util/precision.py", "util/timing.py", "util/stats.py", "util/set_metrics.py", "util/paired.py",
                    "demo/registry.py", "demo/tokenizer.py", "demo/dataset.py", "demo/classifier.py",
                    "demo/fidelity.py", "demo/evaluate.py", "demo/compare.py")
# The named presets measured beside the search by default: the paper techniques the README compares.
DEFAULT_ANCHORS = ("lazymar", "gtr+lazymar", "gtr+disa+lazymar")

Measure = Callable[[Candidate, int, list[int]], list[Row]]


@dataclass(frozen=True)
class PlanSettings:
    """How the search spends its measurements.

    Attributes:
        reference: ``(num_iter, cfg)`` of plain MAR, the quality every bound is relative to; presets are
            chosen among the configurations at these sampling settings (what ``--accel`` runs with).
        rungs: images per class of each successive-halving rung (increasing).
        eta: from one rung to the next, keep ``1 / eta`` of the configurations (those nearest the front).
        max_configs: configurations of the space measured at the first rung (a spread sample of it).
        select_seeds: seeds of the measurements that select (the rungs).
        report_seeds: seeds of the measurements that are reported (disjoint from ``select_seeds``).
        report_per_class: images per class and report seed.
        bsz: images per batch; seconds per image exclude each measurement's first batch.
        search_seed: seed of the sample of the space.
    """

    reference: tuple[int, float] = (64, 3.0)
    rungs: tuple[int, ...] = (2, 6)
    eta: int = 3
    max_configs: int = 30
    select_seeds: tuple[int, ...] = (0,)
    report_seeds: tuple[int, ...] = (1, 2)
    report_per_class: int = 4
    bsz: int = 12
    search_seed: int = 0

    def __post_init__(self) -> None:
        if not self.rungs or min(self.rungs) < 1 or list(self.rungs) != sorted(set(self.rungs)):
            raise ValueError(f"rungs must be increasing image counts per class >= 1, got {self.rungs}")
        if self.eta < 2:
            raise ValueError(f"eta must be >= 2, got {self.eta}")
        if min(self.max_configs, self.report_per_class, self.bsz) < 1:
            raise ValueError("max_configs, report_per_class and bsz must be >= 1")
        if not self.select_seeds or not self.report_seeds:
            raise ValueError("select_seeds and report_seeds must each name at least one seed")
        shared = sorted(set(self.select_seeds) & set(self.report_seeds))
        if shared:
            raise ValueError(f"seeds {shared} both select and report: reported quality must come from seeds "
                             f"that did not select it")
        if len(set(self.select_seeds)) != len(self.select_seeds) or len(set(self.report_seeds)) != len(self.report_seeds):
            raise ValueError("a seed is listed twice")


@dataclass
class Point:
    """A configuration, its FLOPs per image and its measurements at one image count (one row per seed)."""

    cand: Candidate
    tflops: float
    rows: list[Row]

    @property
    def fid(self) -> float:
        """Mean demo FID over the seeds; +inf when not finite (ranks last)."""
        fid = float(np.mean([r.demo_fid for r in self.rows]))
        return fid if math.isfinite(fid) else math.inf

    @property
    def accuracy(self) -> float:
        return float(np.mean([r.class_accuracy for r in self.rows]))

    @property
    def fid_loss_high(self) -> float:
        """The largest upper end, over the seeds, of the 95% interval of (demo FID - plain MAR's) on common
        random numbers; +inf where a row has none."""
        highs = [((r.vs_plain or {}).get("difference", {}).get("demo_fid") or {}).get("high") for r in self.rows]
        return max((math.inf if h is None else h) for h in highs)


@dataclass
class PlanResult:
    """What a search found.

    Attributes:
        complete: False when the time box stopped it (rerun the same command to continue).
        space_size: combinations of the space; pruned: how many the composition rules rejected, by reason
            (at config time over the whole space, at plan time over the configurations priced).
        valid: configurations left after config-time pruning; rung_sizes: configurations measured per rung.
        measured / reused: measurements made now / found in the results file.
        last: the last rung's points; front: its Pareto front (selection seeds); picks: preset name -> point.
        report: candidate key -> its held-out rows summarized (means and ranges over the report seeds).
        held_out: candidate key -> its held-out rows (each with its difference from plain MAR).
        plain: the reference plain MAR point; anchors: the keys of plain and the named presets.
    """

    complete: bool
    space_size: int
    pruned: Counter
    valid: int
    rung_sizes: list[int] = field(default_factory=list)
    measured: int = 0
    reused: int = 0
    last: list[Point] = field(default_factory=list)
    front: list[Point] = field(default_factory=list)
    picks: dict[str, Point] = field(default_factory=dict)
    report: dict[str, Summary] = field(default_factory=dict)
    held_out: dict[str, list[Row]] = field(default_factory=dict)
    plain: Point | None = None
    anchors: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ results file
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class ResultsFile:
    """The measurements of one search: a JSON line with the run identity, then one line per measured
    (configuration, images per class, seed), appended and synced as each finishes.

    Opening a file written with another identity raises ``ValueError`` naming the settings that differ.
    A last line cut short by a kill is dropped (it is measured again).
    """

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path = Path(path)
        self.rows: dict[tuple[str, int, int], Row] = {}
        identity = json.loads(json.dumps(identity))  # as it reads back (tuples as lists)
        if not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"identity": identity}) + "\n")
            return
        lines = self.path.read_text().splitlines()
        try:
            saved = json.loads(lines[0])["identity"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            saved = None
        if saved is None:
            raise ValueError(f"{self.path} is not a results file of demo.plan_search; use another --out, or "
                             f"delete it to start over")
        mine, theirs = _flatten(identity), _flatten(saved)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(f"{self.path} holds measurements of another search (differs in {diff}); rerun with "
                             f"the settings it was made with, use another --out, or delete it to start over")
        good = [lines[0]]
        for i, line in enumerate(lines[1:], start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if i != len(lines) - 1:
                    raise ValueError(f"{self.path}: line {i + 1} is not JSON; delete the file to start over") from None
                logger.warning("%s: dropping a last line cut short (it will be measured again)", self.path)
                self.path.write_text("\n".join(good) + "\n")
                break
            good.append(line)
            row = row_from_json(entry["row"])
            self.rows[row.policy, entry["per_class"], row.seed] = row

    def get(self, key: str, per_class: int, seed: int) -> Row | None:
        return self.rows.get((key, per_class, seed))

    def add(self, cand: Candidate, per_class: int, row: Row) -> None:
        entry = {"config": cand.key, "label": cand.label, "per_class": per_class, "row": row_to_json(row),
                 "accel": None if cand.accel is None else config_to_dict(cand.accel)}
        with self.path.open("a") as f:
            f.write(json.dumps(entry, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[cand.key, per_class, row.seed] = row


def measurement_code_sha256(root: Path = ROOT) -> str:
    """Digest of :data:`MEASUREMENT_CODE` under ``root`` (:func:`util.hashing.source_sha256`)."""
    return source_sha256(root, MEASUREMENT_CODE)


# ------------------------------------------------------------------------------------------ time box
class TimeBox:
    """``budget_s`` of wall time on ``clock``; a measurement may start only if its predicted duration
    (its work, TFLOPs x images, at the seconds per unit of work measured so far) ends within it."""

    def __init__(self, clock: Callable[[], float], budget_s: float) -> None:
        self.clock, self.budget_s = clock, budget_s
        self.start = clock()
        self.seconds = self.work = 0.0

    def allows(self, now: float, work: float) -> bool:
        predicted = self.seconds / self.work * work if self.work > 0 else 0.0
        return now - self.start + predicted <= self.budget_s

    def record(self, work: float, seconds: float) -> None:
        self.seconds += seconds
        self.work += work


# ------------------------------------------------------------------------------------------ selection
def dominates(a: Point, b: Point) -> bool:
    """``a`` costs no more FLOPs and has no worse demo FID than ``b``, and is better in one."""
    return a.tflops <= b.tflops and a.fid <= b.fid and (a.tflops < b.tflops or a.fid < b.fid)


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point dominates, by FLOPs; a point without a finite demo FID is never on it."""
    return sorted((p for p in points if math.isfinite(p.fid) and not any(dominates(q, p) for q in points)),
                  key=_order)


def _order(p: Point) -> tuple:
    return p.tflops, p.fid, p.cand.key


def nearest_front(points: list[Point], k: int) -> list[Point]:
    """``k`` points by non-dominated sorting: whole fronts in turn, and from the front that does not fit
    whole, points spread evenly along it by FLOPs; points without a finite demo FID come last."""
    out, rest = [], list(points)
    while rest and len(out) < k:
        front = pareto_front(rest) or sorted(rest, key=_order)  # the unmeasurable ones last
        room = k - len(out)
        if len(front) > room:  # evenly spaced indices, the cheapest first
            step = (len(front) - 1) / max(room - 1, 1)
            front = [front[round(i * step)] for i in range(room)]
        out += front
        keys = {p.cand.key for p in front}
        rest = [p for p in rest if p.cand.key not in keys]
    return out


def sample_space(cands: list[Candidate], k: int, reference: tuple[int, float], seed: int) -> list[Candidate]:
    """At most ``k`` of ``cands``: half at the reference sampling settings (where presets are chosen), the
    rest elsewhere, each drawn in turn from every composition (sampling settings and which techniques
    are on) in a seeded order, so that every composition is represented before any twice."""
    rng = random.Random(seed)
    at_ref = [c for c in cands if (c.num_iter, c.cfg) == tuple(reference)]
    others = [c for c in cands if (c.num_iter, c.cfg) != tuple(reference)]
    k_ref = min(len(at_ref), max(k - len(others), (k + 1) // 2))
    return _round_robin(at_ref, k_ref, rng) + _round_robin(others, k - k_ref, rng)


def _round_robin(cands: list[Candidate], k: int, rng: random.Random) -> list[Candidate]:
    groups: dict[tuple, list[Candidate]] = {}
    for c in cands:
        techniques = tuple(cls.__name__ for cls, _ in c.accel.enabled()) if c.accel is not None else ()
        groups.setdefault((c.num_iter, c.cfg, techniques), []).append(c)
    order = sorted(groups)
    rng.shuffle(order)
    for name in order:
        rng.shuffle(groups[name])
    out: list[Candidate] = []
    while len(out) < min(k, len(cands)):
        for name in order:
            if groups[name] and len(out) < k:
                out.append(groups[name].pop())
    return out


def qualifies(p: Point, plain: Point, bound: float) -> bool:
    """Whether ``p`` is within ``bound`` of plain MAR's demo FID beyond reasonable doubt: the upper end of the
    95% interval of its loss (demo FID - plain's, on common random numbers, every selection seed) is at most
    ``bound`` x plain's demo FID. A point whose interval is wide qualifies for no bound, however good its
    mean; plain MAR qualifies for every bound."""
    return p.cand.key == plain.cand.key or p.fid_loss_high <= bound * plain.fid


def choose_presets(points: list[Point], plain: Point, targets: dict[str, float],
                   reference: tuple[int, float]) -> dict[str, Point]:
    """Per target ``name -> bound``: the cheapest point at the reference sampling settings that
    :func:`qualifies` for the bound (plain itself when nothing cheaper does)."""
    at_ref = [p for p in points if (p.cand.num_iter, p.cand.cfg) == tuple(reference)]
    return {name: min((p for p in at_ref if qualifies(p, plain, bound)), key=_order)
            for name, bound in targets.items()}


# ------------------------------------------------------------------------------------------ search
def search(space: SearchSpace, *, model, measure: Measure, results_path: Path, identity: dict[str, Any],
           settings: PlanSettings, anchors: dict[str, Any], targets: dict[str, float],
           budget_s: float = math.inf, clock: Callable[[], float] = time.monotonic,
           progress: bool = False) -> PlanResult:
    """Successive halving over ``space`` (see the module docstring) within ``budget_s`` on ``clock``.

    Args:
        model: the MAR whose plans are priced (only its shapes are read).
        measure: ``(candidate, images per class, seeds) -> one Row per seed``.
        results_path: the results file; measurements found there are reused.
        identity: what the measurements depend on besides the search (model files, sampling, machine);
            the space, settings and anchors are added to it.
        anchors: named presets (name -> config) measured at every rung and reported, beside plain MAR.
        targets: preset name -> demo FID bound relative to plain MAR (0.25: within 25%).
        clock: seconds; read at the start, before and after each measurement.
    """
    from tqdm.auto import tqdm

    plain = Candidate(*settings.reference, None, "plain")
    named = [plain] + [Candidate(*settings.reference, config, name) for name, config in anchors.items()]
    identity = {**identity, "space": space.as_dict(), "settings": asdict(settings),
                "anchors": {c.name: None if c.accel is None else config_to_dict(c.accel) for c in named}}
    results = ResultsFile(results_path, identity)
    timebox = TimeBox(clock, budget_s)
    cands, pruned = candidates(space)
    result = PlanResult(complete=False, space_size=space.size(), pruned=pruned, valid=len(cands),
                        anchors=[c.key for c in named])
    chosen = sample_space(cands, settings.max_configs, settings.reference, settings.search_seed)
    priced, plan_pruned = price(named + chosen, model, bsz=settings.bsz, progress=progress)
    result.pruned.update(plan_pruned)
    pool: dict[str, tuple[Candidate, float]] = {}
    for cand, tflops in priced:  # the named ones first: a sampled copy of one keeps its name
        pool.setdefault(cand.key, (cand, tflops))
    if plain.key not in pool:
        raise ValueError(f"plain MAR at {settings.reference} does not plan on this model")
    result.anchors = [k for k in result.anchors if k in pool]  # a named preset may not plan on this model

    def measure_all(keys: list[str], per_class: int, seeds: tuple[int, ...], desc: str) -> list[Point] | None:
        """The points of ``keys`` at ``per_class``: plain MAR first (every other is compared with it), then
        the cheapest first; None when the time box stops it."""
        order = sorted(keys, key=lambda k: (k != plain.key, pool[k][1], k))
        points = []
        with tqdm(total=len(order), desc=desc, unit="config", disable=not progress) as bar:
            for key in order:
                cand, tflops = pool[key]
                missing = [s for s in seeds if results.get(key, per_class, s) is None]
                result.reused += len(seeds) - len(missing)
                if missing:
                    work = tflops * per_class * NUM_CLASSES * len(missing)
                    now = clock()
                    if not timebox.allows(now, work):
                        return None
                    for row in measure(cand, per_class, missing):
                        results.add(cand, per_class, row)
                    timebox.record(work, clock() - now)
                    result.measured += len(missing)
                points.append(Point(cand, tflops, [results.get(key, per_class, s) for s in seeds]))
                bar.set_postfix_str(cand.label[:60])
                bar.update(1)
        return points

    alive = list(pool)
    for r, per_class in enumerate(settings.rungs):
        result.rung_sizes.append(len(alive))
        points = measure_all(alive, per_class, settings.select_seeds,
                             f"rung {r + 1}/{len(settings.rungs)} ({per_class}/class)")
        if points is None:
            return result
        if r + 1 < len(settings.rungs):
            alive = _next_rung(points, result.anchors, settings)
    result.last = points
    result.front = pareto_front(points)
    result.plain = next(p for p in points if p.cand.key == plain.key)
    result.picks = choose_presets(points, result.plain, targets, settings.reference)
    keys = list(dict.fromkeys(result.anchors + [p.cand.key for p in result.front + list(result.picks.values())]))
    held_out = measure_all(keys, settings.report_per_class, settings.report_seeds, "held-out seeds")
    if held_out is None:
        return result
    result.report = {p.cand.key: summarize(p.rows)[0] for p in held_out}
    result.held_out = {p.cand.key: p.rows for p in held_out}
    result.complete = True
    return result


def _next_rung(points: list[Point], anchors: list[str], settings: PlanSettings) -> list[str]:
    """The anchors, the ``1 / eta`` of the others nearest the front, and the ``1 / eta`` of those at the
    reference sampling settings nearest theirs (the presets are chosen among these)."""
    free = [p for p in points if p.cand.key not in anchors]
    at_ref = [p for p in free if (p.cand.num_iter, p.cand.cfg) == tuple(settings.reference)]
    keep = nearest_front(free, math.ceil(len(free) / settings.eta))
    keep += nearest_front(at_ref, math.ceil(len(at_ref) / settings.eta))
    return list(dict.fromkeys(anchors + [p.cand.key for p in keep]))


# ------------------------------------------------------------------------------------------ measurement
class DemoMeasure:
    """Measures a candidate with :func:`demo.evaluate.evaluate`: class-balanced images from each seed, class
    accuracy and demo FID against ``reference``, FLOPs of the executed plan, CPU seconds per image, and the
    difference from plain MAR at the reference settings on common random numbers (same labels, seed and
    batch size), with its interval.

    Plain MAR's per-image data is kept in ``samples_dir`` per (images per class, seed): measured once as the
    plain candidate's row (the search measures it first), read back for every other candidate and resume.
    """

    def __init__(self, gen, *, classifier_path: str, reference: np.ndarray, cfg_schedule: str, temperature: float,
                 bsz: int, reference_settings: tuple[int, float], samples_dir: Path,
                 reference_cache: tuple[Path, str] | None = None, resamples: int = BOOTSTRAP_RESAMPLES) -> None:
        self.gen, self.classifier_path, self.reference, self.bsz = gen, classifier_path, reference, bsz
        self.cfg_schedule, self.temperature = cfg_schedule, temperature
        self.reference_settings, self.samples_dir, self.resamples = tuple(reference_settings), Path(samples_dir), resamples
        self.reference_cache = reference_cache  # the reference's features are computed once, not per measurement

    def _sampling(self, cfg: float) -> dict:
        return dict(cfg=cfg, cfg_schedule=self.cfg_schedule, temperature=self.temperature)

    def plain(self, per_class: int, seed: int) -> RowSample:
        """Plain MAR's per-image data at the reference settings, ``per_class`` images per class, ``seed``."""
        num_iter, cfg = self.reference_settings
        folder = self.samples_dir / f"{per_class}-per-class"
        path = plain_sample_path(folder, num_iter, seed)
        if not path.is_file():
            evaluate(self.gen, steps=[num_iter], policies=[None], per_class=per_class, sampling=self._sampling(cfg),
                     bsz=self.bsz, seeds=[seed], classifier_path=self.classifier_path, reference=self.reference,
                     reference_cache=self.reference_cache, samples_dir=folder, resamples=2)
        return RowSample.load(path)

    def __call__(self, cand: Candidate, per_class: int, seeds: list[int]) -> list[Row]:
        at_reference = (cand.num_iter, cand.cfg) == self.reference_settings
        if cand.accel is None and at_reference:  # plain MAR itself: its row is the twin of all others
            rows = evaluate(self.gen, steps=[cand.num_iter], policies=[None], per_class=per_class,
                            sampling=self._sampling(cand.cfg), bsz=self.bsz, seeds=list(seeds),
                            classifier_path=self.classifier_path, reference=self.reference,
                            reference_cache=self.reference_cache, samples_dir=self.samples_dir / f"{per_class}-per-class",
                            resamples=self.resamples)
        else:
            rows = evaluate(self.gen, steps=[cand.num_iter], policies=[cand.accel], per_class=per_class,
                            sampling=self._sampling(cand.cfg), bsz=self.bsz, seeds=list(seeds),
                            classifier_path=self.classifier_path, reference=self.reference,
                            reference_cache=self.reference_cache, resamples=self.resamples,
                            twin=lambda _steps, seed: self.plain(per_class, seed), twin_pairs=at_reference)
        return [replace(r, policy=cand.key) for r in rows]


# ------------------------------------------------------------------------------------------ report
def _by_key(result: PlanResult) -> dict[str, Point]:
    return {p.cand.key: p for p in result.last}


def _range(mean: float, span: tuple[float, float], fmt: str) -> str:
    return f"{mean:{fmt}} ({span[0]:{fmt}}-{span[1]:{fmt}})"


def _loss_high(p: Point, plain: Point) -> str:
    """The upper end of the selection's interval of the demo FID loss against plain MAR."""
    if p.cand.key == plain.cand.key:
        return "-"
    return "no interval" if not math.isfinite(p.fid_loss_high) else f"{p.fid_loss_high:+.2f}"


def _differences(rows: list[Row]) -> str:
    """``value [low, high]`` of each held-out row's demo FID difference from plain MAR."""
    out = []
    for r in rows:
        d = ((r.vs_plain or {}).get("difference") or {}).get("demo_fid")
        if d is not None:
            out.append(f"{d['value']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")
    return "; ".join(out) or "-"


def format_report(result: PlanResult, settings: PlanSettings) -> str:
    """The search in numbers and the table of the front, the anchors and the presets (held-out numbers)."""
    reasons = "".join(f"\n  - {n}: {reason}" for reason, n in result.pruned.most_common())
    sizes = ", ".join(f"{n} at {k}/class" for n, k in zip(result.rung_sizes, settings.rungs))
    lines = [f"- space: {result.space_size} combinations, {sum(result.pruned.values())} pruned by the composition "
             f"rules (config time over the space, plan time over those priced), {result.valid} valid{reasons}",
             f"- successive halving (eta {settings.eta}, selection seeds {list(settings.select_seeds)}): {sizes}",
             f"- measurements: {result.measured} made now, {result.reused} reused from the results file"]
    if not result.complete:
        return "\n".join(lines + ["- stopped by the time box: rerun the same command to continue"])
    points, plain = _by_key(result), result.report[result.plain.cand.key]
    front = {p.cand.key for p in result.front}
    marks: dict[str, list[str]] = {k: (["front"] if k in front else []) for k in result.report}
    for name, p in result.picks.items():
        marks[p.cand.key].append(f"**{name}**")
    n_sel = settings.rungs[-1] * NUM_CLASSES
    lines += ["", f"Held-out: seeds {list(settings.report_seeds)}, {settings.report_per_class * NUM_CLASSES} images "
              f"each; mean (range over the seeds). Selection: demo FID of {n_sel} images per seed at the last rung.", "",
              "| configuration | TFLOPs / image | vs plain | CPU s / image | demo FID, selection | loss CI high, "
              "selection | demo FID, held-out | d demo FID vs plain, held-out (95% CI per seed) "
              "| class accuracy, held-out | |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, s in sorted(result.report.items(), key=lambda kv: _order(points[kv[0]])):
        p = points[key]
        lines.append(f"| {p.cand.label} | {p.tflops:.4f} | {plain.tflops_per_image / p.tflops:.2f}x | "
                     f"{s.seconds_per_image:.3f} | {p.fid:.2f} | {_loss_high(p, result.plain)} | "
                     f"{_range(s.demo_fid, s.demo_fid_range, '.2f')} | {_differences(result.held_out.get(key, []))} | "
                     f"{_range(s.class_accuracy, s.class_accuracy_range, '.1%')} | {', '.join(marks[key])} |")
    lines.append("")
    chosen: dict[str, list[str]] = {}
    for name, p in result.picks.items():
        chosen.setdefault(p.cand.key, []).append(name)
    for key, names in chosen.items():
        if len(names) > 1:
            lines.append(f"- {' and '.join(names)} chose the same configuration ({points[key].cand.label}): nothing "
                         f"cheaper qualifies for the looser bound at the selection's interval widths")
    for key in result.anchors:
        a = points[key]
        if a.cand.accel is None:
            continue
        better = [points[k].cand.label for k, s in result.report.items()
                  if points[k].tflops < a.tflops and s.demo_fid <= result.report[key].demo_fid]
        lines.append(f"- cheaper than `{a.cand.name}` at no worse held-out demo FID: "
                     + ("; ".join(better) if better else "nothing measured"))
    return "\n".join(lines)


def plot_front(result: PlanResult, path: Path) -> Path:
    """Held-out demo FID vs FLOPs of the reported points (:func:`demo.plot.plot_quality_vs_flops`), coloured
    by role: each exported preset, each named preset, the rest of the front."""
    from demo.plot import plot_quality_vs_flops
    points, names = _by_key(result), {p.cand.key: n for n, p in result.picks.items()}
    rows = []
    for key, s in result.report.items():
        role = (f"preset {names[key]}" if key in names else points[key].cand.name or "front")
        rows.append(replace(s, policy=role))
    return plot_quality_vs_flops(rows, path)


def preset_entries(result: PlanResult, settings: PlanSettings, targets: dict[str, float]) -> dict[str, dict]:
    """The planned presets file's entries: each pick's config, the rule that chose it and its measurements."""
    from lazymar.config import OFF
    plain = result.report[result.plain.cand.key]
    out = {}
    for name, p in result.picks.items():
        s, bound = result.report[p.cand.key], targets[name]
        out[name] = dict(
            accel=p.cand.accel if p.cand.accel is not None else OFF, label=p.cand.label,
            num_iter=p.cand.num_iter, cfg=p.cand.cfg, bound=bound,
            rule=f"the cheapest configuration at {p.cand.num_iter} steps, cfg {p.cand.cfg:g} whose demo FID loss against "
                 f"plain MAR on the selection seeds (common random numbers) has a 95% interval ending within "
                 f"{bound:.0%} of plain MAR's demo FID",
            tflops_per_image=p.tflops, flops_vs_plain=result.plain.tflops / p.tflops,
            selection=dict(seeds=list(settings.select_seeds), images_per_seed=settings.rungs[-1] * NUM_CLASSES,
                           demo_fid=p.fid, class_accuracy=p.accuracy, plain_demo_fid=result.plain.fid,
                           demo_fid_loss_high=None if not math.isfinite(p.fid_loss_high) else p.fid_loss_high),
            held_out=dict(seeds=list(s.seeds), images_per_seed=s.num_images, demo_fid=s.demo_fid,
                          demo_fid_range=list(s.demo_fid_range), class_accuracy=s.class_accuracy,
                          class_accuracy_range=list(s.class_accuracy_range), seconds_per_image=s.seconds_per_image,
                          plain_demo_fid=plain.demo_fid, plain_class_accuracy=plain.class_accuracy,
                          demo_fid_difference=[((r.vs_plain or {}).get("difference") or {}).get("demo_fid")
                                               for r in result.held_out.get(p.cand.key, [])],
                          within_bound=bool(s.demo_fid <= plain.demo_fid * (1 + bound))))
    return out


# ------------------------------------------------------------------------------------------ CLI
def _targets(text: str) -> tuple[str, float]:
    name, _, bound = text.partition("=")
    if not name or not bound:
        raise argparse.ArgumentTypeError(f"expected NAME=BOUND (fast=0.25), got {text!r}")
    return name, float(bound)


def main(argv: list[str] | None = None) -> int:
    import torch

    from demo.evaluate import reference_images
    from demo.registry import DEMO_DEFAULTS, DEMO_DIR, DEMO_FILES, DEMO_MODEL
    from lazymar.config import PRESETS
    from lazymar.names import preset
    from lazymar.planned import DEFAULT_TARGETS, PLANNED_FILE, write_planned
    from lazymar.search_space import SPACES
    from util.hashing import file_sha256
    from util.generate import SEED_RULE
    from util.loading import load_generator

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL, choices=[DEMO_MODEL],
                   help="quality is measured with the demo classifier, so the demo model only")
    p.add_argument("--budget_s", type=float, required=True, help="wall-time budget of this run, seconds")
    p.add_argument("--out", type=Path, required=True, help="folder of the results file, table and plot")
    p.add_argument("--space", default="default", choices=sorted(SPACES), help="lazymar.search_space.SPACES")
    d = PlanSettings()
    p.add_argument("--rungs", type=int, nargs="+", default=list(d.rungs), help="images per class at each rung")
    p.add_argument("--eta", type=int, default=d.eta)
    p.add_argument("--max_configs", type=int, default=d.max_configs, help="configurations of the space at rung 1")
    p.add_argument("--select_seeds", type=int, nargs="+", default=list(d.select_seeds))
    p.add_argument("--report_seeds", type=int, nargs="+", default=list(d.report_seeds))
    p.add_argument("--report_per_class", type=int, default=d.report_per_class)
    p.add_argument("--bsz", type=int, default=d.bsz)
    p.add_argument("--search_seed", type=int, default=d.search_seed)
    p.add_argument("--anchors", nargs="*", default=list(DEFAULT_ANCHORS), choices=sorted(PRESETS),
                   help="named presets measured and reported beside plain MAR")
    p.add_argument("--targets", type=_targets, nargs="+", default=sorted(DEFAULT_TARGETS.items()),
                   help="exported presets, NAME=BOUND: the cheapest within BOUND (0.25 = 25%%) of plain's demo FID")
    p.add_argument("--presets_file", type=Path, default=PLANNED_FILE, help="where the presets are written")
    p.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples per interval")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    settings = PlanSettings(reference=(DEMO_DEFAULTS["num_iter"], DEMO_DEFAULTS["cfg"]), rungs=tuple(args.rungs),
                            eta=args.eta, max_configs=args.max_configs, select_seeds=tuple(args.select_seeds),
                            report_seeds=tuple(args.report_seeds), report_per_class=args.report_per_class,
                            bsz=args.bsz, search_seed=args.search_seed)  # checked before anything loads
    targets = dict(args.targets)
    clash = sorted(set(targets) & set(PRESETS))
    if clash:
        raise ValueError(f"--targets {clash}: paper preset names; choose other names")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    gen = load_generator(DEMO_MODEL)
    classifier = DEMO_DIR / DEMO_FILES["classifier"]
    reference, data = reference_images(gen)
    identity = dict(model=DEMO_MODEL, classifier_sha256=file_sha256(classifier),
                    **{f"{role}_sha256": file_sha256(path) for role, path in sorted(gen.files.items())},
                    reference=dict(data, per_class=len(reference) // NUM_CLASSES),
                    cfg_schedule=DEMO_DEFAULTS["cfg_schedule"], temperature=DEMO_DEFAULTS["temperature"],
                    seed_rule=SEED_RULE, device="cpu", threads=torch.get_num_threads(), resamples=args.resamples,
                    code_sha256=measurement_code_sha256())
    # The reference's classifier features are computed once; the cache is named by the images themselves.
    reference_name = f"demo-reference-{hashlib.sha256(reference.tobytes()).hexdigest()[:16]}"
    measure = DemoMeasure(gen, classifier_path=str(classifier), reference=reference,
                          cfg_schedule=DEMO_DEFAULTS["cfg_schedule"], temperature=DEMO_DEFAULTS["temperature"],
                          bsz=settings.bsz, reference_settings=settings.reference, samples_dir=args.out / "plain_samples",
                          reference_cache=(args.out / "fidelity_cache", reference_name), resamples=args.resamples)
    result = search(SPACES[args.space], model=gen.mar, measure=measure, results_path=args.out / RESULTS_FILE,
                    identity=identity, settings=settings, anchors={n: preset(n) for n in args.anchors},
                    targets=targets, budget_s=args.budget_s, progress=True)
    wall = time.monotonic() - t0
    header = (f"# Acceleration planner: demo model, space `{args.space}`, reference plain MAR at "
              f"{settings.reference[0]} steps, cfg {settings.reference[1]:g}, {torch.get_num_threads()} CPU threads, "
              f"this run {wall / 60:.1f} min\n\n")
    report = header + format_report(result, settings) + "\n"
    (args.out / "front.md").write_text(report)
    print(report)
    if not result.complete:
        print(f"stopped by --budget_s {args.budget_s:g} after {wall:.0f} s; the measurements are in "
              f"{args.out / RESULTS_FILE}: rerun the same command to continue")
        return 0
    print(f"plot: {plot_front(result, args.out / 'front.png')}")
    entries = preset_entries(result, settings, targets)
    about = dict(written_by="python -m demo.plan_search", model=DEMO_MODEL, space=args.space,
                 results=str(args.out / RESULTS_FILE), mar_sha256=identity.get("mar_sha256"),
                 note="chosen on the demo model at the sampling settings given per preset; held_out numbers "
                      "come from seeds that did not select them")
    for path in (args.presets_file, args.out / "presets.json"):
        print(f"presets {sorted(entries)}: {write_planned(path, entries, about)}")
    return 0


if __name__ == "__main__":
    from util import cli
    cli.run(main)
