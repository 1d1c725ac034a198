"""The demo model's speed/quality table: step count x policy -> FLOPs, CPU latency, class accuracy, demo FID.

    python -m demo.evaluate --steps 16 32 64 --policies none lazymar lazymar-scaled --per_class 50
    python -m demo.evaluate --steps 64 --policies comparison cspd cspd-release --per_class 80 --bsz 120 \
        --out docs/demo_quality_t04 --plot docs/demo_quality_t04.png

Every row generates the same class-balanced labels from the same seeds, so rows differ only by the
policy and step count (common random numbers). With plain MAR (``none``) among the policies, every row
is compared with it on those same images (:mod:`demo.compare`): the difference of demo FID, KID and class
accuracy with a paired bootstrap interval, a verdict, the distances to its plain twin where the preset
draws plain's random numbers, and the images a +-3% interval would take. With several ``--seeds`` each
(policy, steps) is measured once per seed and the table shows the mean with the range over seeds.
Class accuracy and demo FID come from the demo classifier (``demo.fidelity``); the "real data" row is
the same measurement on held-out real images of the model's data style, the floor any generator can
reach. Latency is per image on this machine, excluding the first (warm-up) batch; a row of one batch
is timed whole after an untimed warm-up generation (:func:`row_images`).

Speculative decoding (``--policies cspd`` or ``cspd-release``) samples the demo model as its target with
``--draft_model`` (the shipped ``demo_draft`` by default) drafting; its rows also hold the share of drafts
the target accepted, and its FLOPs count both models.

The full table is hours of CPU time, so a progress bar counts batches, each row is printed when done,
and with ``--out`` the rows are saved as they finish: the same command run again (same checkpoint,
settings and thread count) skips the rows already measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from demo.compare import RESOLUTION, RowSample, absolute, as_json, images_to_resolve, versus_plain
from demo.dataset import FLOOR_SEED, HELDOUT_SEED, NUM_CLASSES, make_split
from demo.fidelity import FID_LAYER, demo_metrics, extract_features
from lazymar.config import AccelConfig
from util.generate import SEED_RULE, GeneratedSet, SamplingSettings, generate_batches, generate_set
from util.loading import Generator
from util.set_metrics import Reference
from util.stats import BOOTSTRAP_RESAMPLES

REFERENCE_PER_CLASS = 500
# The methods compared in docs/quality.md: plain MAR, each method, and the combinations.
COMPARISON = ["none", "lazymar", "gtr", "marche", "disa", "recap", "gtr+lazymar", "marche+lazymar", "gtr+marche+lazymar",
              "disa+lazymar", "recap+lazymar", "gtr+disa+lazymar", "interval", "interval+lazymar"]


@dataclass
class Row:
    """One measurement: ``num_images`` images of one (policy, step count) generated from ``seed``."""

    policy: str
    num_iter: int
    tflops_per_image: float
    seconds_per_image: float
    class_accuracy: float
    demo_fid: float
    num_images: int
    seed: int = 0
    acceptance_rate: float | None = None  # speculative decoding: accepted / verified drafts of the row
    # With comparisons (plain MAR among the policies): the row's own intervals ({metric: {value, low,
    # high}}: demo FID and KID by bootstrap, class accuracy by Wilson) and its difference from plain MAR at
    # the same steps and seed (demo.compare.versus_plain, as JSON).
    intervals: dict | None = None
    vs_plain: dict | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        return self.policy, self.num_iter, self.seed


@dataclass
class Summary:
    """The rows of one (policy, step count) over its seeds: means, and the range over seeds."""

    policy: str
    num_iter: int
    seeds: tuple[int, ...]
    tflops_per_image: float
    seconds_per_image: float
    class_accuracy: float
    class_accuracy_range: tuple[float, float]
    demo_fid: float
    demo_fid_range: tuple[float, float]
    num_images: int
    acceptance_rate: float | None = None  # mean over seeds (speculative decoding only)


FLOAT_FIELDS = ("tflops_per_image", "seconds_per_image", "class_accuracy", "demo_fid")  # of Row, never None


def strict_json(value: Any) -> Any:
    """``value`` (nested dicts, lists, tuples) with every float that is not finite as None, so that
    ``json.dumps(..., allow_nan=False)`` writes JSON (bare ``NaN`` is not JSON: strict readers refuse it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def row_to_json(row: Row) -> dict[str, Any]:
    """``row`` as JSON values: a number that is not finite as null (NaN seconds: a row saved before rows of
    one batch were timed)."""
    return strict_json(asdict(row))


def row_from_json(data: dict[str, Any]) -> Row:
    """The :class:`Row` of :func:`row_to_json`'s output: null in a number field reads as NaN (files written
    before that held bare ``NaN``, which Python's json reads too)."""
    return Row(**{k: float("nan") if v is None and k in FLOAT_FIELDS else v for k, v in data.items()})


def save_rows(path: Path, identity: dict, settings: dict, floor: dict | None, rows: list[Row]) -> None:
    """Write a table's rows file (read back by :func:`load_done_rows`) atomically, as strict JSON."""
    from util.checkpoint import atomic_path
    payload = strict_json({"identity": identity, "settings": settings, "floor": floor})
    payload["rows"] = [row_to_json(r) for r in rows]
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str, allow_nan=False))


def _mean_timed(seconds: list[float]) -> float:
    """Mean seconds per image over the rows that were timed (rows saved before one-batch rows were timed
    hold NaN); NaN if none was."""
    timed = [x for x in seconds if not np.isnan(x)]
    return float(np.mean(timed)) if timed else float("nan")


def summarize(rows: list[Row]) -> list[Summary]:
    """One :class:`Summary` per (policy, step count), in the order they first appear in ``rows``."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.policy, r.num_iter), []).append(r)
    out = []
    for (policy, num_iter), rs in groups.items():
        acc = [r.class_accuracy for r in rs]
        fid = [r.demo_fid for r in rs]
        out.append(Summary(policy, num_iter, tuple(r.seed for r in rs), float(np.mean([r.tflops_per_image for r in rs])),
                           _mean_timed([r.seconds_per_image for r in rs]), float(np.mean(acc)),
                           (min(acc), max(acc)), float(np.mean(fid)), (min(fid), max(fid)), rs[0].num_images,
                           None if rs[0].acceptance_rate is None else float(np.mean([r.acceptance_rate for r in rs]))))
    return out


def evaluate(gen: Generator, *, steps: list[int], policies: list[Any], per_class: int,
             sampling: dict, bsz: int, seeds: list[int], classifier_path: str, reference: np.ndarray,
             done: list[Row] | None = None, on_row: Callable[[Row], None] | None = None,
             progress: bool = False, reference_cache: tuple[Path, str] | None = None, draft: Any = None,
             samples_dir: Path | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
             twin: Callable[[int, int], RowSample] | None = None, twin_pairs: bool = False) -> list[Row]:
    """One :class:`Row` per (step count, policy, seed), in that order.

    Images come from :func:`util.generate.generate_set`; seconds per image exclude the first batch. When
    plain MAR (None) is among ``policies`` it is measured first at each step count and seed, and every
    other row also gets its intervals and its difference from plain (:mod:`demo.compare`), on common
    random numbers: the same labels, seeds and batch size.

    Args:
        policies: preset names, acceleration configs, or None (plain MAR).
        done: rows measured before (same model and settings); they are reused, not regenerated.
        on_row: called with each new row as soon as it is measured (to print or save it).
        progress: show a progress bar over the batches still to generate.
        reference_cache: ``(folder, name)`` under which torch-fidelity keeps the reference's features, for
            callers that measure many rows against one reference (``demo.plan_search``); the name says
            what the reference images are.
        draft: the draft MAR of the speculative decoding policies (``cspd``, ``cspd-release``).
        samples_dir: where plain MAR's per-image data is kept (``plain-<steps>-<seed>.npz``), so that a
            resumed run compares new rows with a plain row measured before without sampling it again.
        resamples: bootstrap resamples of every interval.
        twin: ``(steps, seed) -> RowSample`` of the plain MAR every row is compared with, when it is not
            the plain MAR of the rows' own steps (the planner compares every configuration with plain MAR
            at its reference settings). Comparisons are made when it is given or plain MAR is a policy.
        twin_pairs: ``twin`` was sampled at the rows' own steps and sampling settings, so the rows of
            presets that pair with plain MAR have their twins in it.
    """
    from tqdm.auto import tqdm

    from lazymar.names import pairs_with_plain
    from lazymar.cspd import summarize as summarize_cspd
    from lazymar.flops import estimate
    labels = torch.arange(per_class * NUM_CLASSES) % NUM_CLASSES
    known = {r.key: r for r in done or []}
    compare = None in policies or twin is not None
    order = [None] + [p for p in policies if p is not None] if compare else list(policies)
    todo = [(n, p, s) for n in steps for p in order for s in seeds if (p or "plain", n, s) not in known]
    bar = tqdm(total=len(todo) * -(-len(labels) // bsz), desc="demo.evaluate", unit="batch", disable=not progress)
    ref = (Reference.from_features(extract_features(reference, classifier_path, (FID_LAYER,), device="cpu")[FID_LAYER])
           if compare and todo else None)
    plain: dict[tuple[int, int], RowSample] = {}
    measured: dict[tuple[str, int, int], Row] = {}
    for num_iter in steps:
        for policy in order:
            for seed in seeds:
                key = (policy or "plain", num_iter, seed)
                if key in known:
                    measured[key] = known[key]
                    continue
                bar.set_postfix_str(f"{policy or 'plain'} @ {num_iter} steps, seed {seed}")
                accel, log = _accel(policy, draft)
                settings = SamplingSettings(num_iter=num_iter, accel=accel, **sampling)
                generated = row_images(gen, labels, settings, seed=seed, bsz=bsz, progress=bar)
                # One generation per batch, the row's last ones; a warm-up before them is not part of it.
                batches = -(-len(labels) // bsz)
                acceptance = None if log is None else summarize_cspd(
                    [r.as_dict() for r in log.runs[-batches:]])["acceptance_rate"]
                cache = dict(zip(("cache_root", "reference_cache_name"), reference_cache or ()))
                m = demo_metrics(generated.images, classifier_path, labels=labels.numpy(), reference=reference,
                                 compute_is=False, **cache)
                flops = estimate(gen.mar, num_iter=num_iter, cfg=sampling["cfg"], accel=accel, bsz=bsz).total / 1e12
                row = Row(policy or "plain", num_iter, flops, generated.seconds_per_image, m["class_accuracy"],
                          m["demo_fid"], len(generated.images), seed, acceptance)
                if compare:
                    sample = RowSample.measure(generated.images, generated.tokens, labels.numpy(), classifier_path)
                    if samples_dir is not None and policy is None:  # only plain's is read back
                        samples_dir.mkdir(parents=True, exist_ok=True)
                        sample.save(plain_sample_path(samples_dir, num_iter, seed))
                    if policy is None:
                        plain[num_iter, seed] = sample
                    if twin is not None:
                        base = twin(num_iter, seed)
                    else:
                        base = plain.get((num_iter, seed)) or _plain_sample(
                            gen, labels, sampling, num_iter, seed, bsz, classifier_path, samples_dir, bar)
                        plain[num_iter, seed] = base
                    row.intervals = as_json(absolute(sample, ref, resamples=resamples, seed=seed))
                    if policy is not None or twin is not None:
                        paired = pairs_with_plain(accel) and (twin is None or twin_pairs)
                        row.vs_plain = as_json(versus_plain(sample, base, ref, paired=paired,
                                                            resamples=resamples, seed=seed))
                measured[key] = row
                if on_row is not None:
                    on_row(row)
    bar.close()
    return [measured[p or "plain", n, s] for n in steps for p in policies for s in seeds]


def plain_sample_path(folder: Path, num_iter: int, seed: int) -> Path:
    """Where :func:`evaluate` keeps plain MAR's per-image data at (steps, seed) under ``samples_dir`` (the
    only row whose data is read back)."""
    return Path(folder) / f"plain-{num_iter}-{seed}.npz"


def _plain_sample(gen: Generator, labels: torch.Tensor, sampling: dict, num_iter: int, seed: int, bsz: int,
                  classifier_path: str, samples_dir: Path | None, bar: Any) -> RowSample:
    """Plain MAR's per-image data at (steps, seed) for a row measured after a resume: from ``samples_dir``
    when an earlier run kept it, else sampled again (the same images: generation is seeded per batch)."""
    if samples_dir is not None and plain_sample_path(samples_dir, num_iter, seed).is_file():
        return RowSample.load(plain_sample_path(samples_dir, num_iter, seed))
    bar.total += -(-len(labels) // bsz)
    generated = generate_set(gen, labels, SamplingSettings(num_iter=num_iter, **sampling), seed=seed,
                             batch_size=bsz, progress=bar)
    return RowSample.measure(generated.images, generated.tokens, labels.numpy(), classifier_path)


def _accel(policy: Any, draft: Any) -> tuple[Any, Any]:
    """What a row samples with, and for speculative decoding the :class:`~lazymar.cspd.StatsLog` its
    generations report to (None otherwise)."""
    from lazymar.cspd import CSPD_PRESETS, StatsLog, cspd_preset
    if not (isinstance(policy, str) and policy in CSPD_PRESETS):
        return policy, None
    if draft is None:
        raise ValueError(f"policy {policy} is speculative decoding: pass the draft MAR (draft=)")
    log = StatsLog()
    return cspd_preset(policy, draft, on_stats=log), log


def row_images(gen: Generator, labels: torch.Tensor, settings: SamplingSettings, *, seed: int, bsz: int,
               progress: Any = None) -> GeneratedSet:
    """One row's images, tokens and CPU seconds per image.

    With several batches the first is the warm-up and the rest are timed (:func:`generate_set`). A row
    of one batch has nothing after its warm-up, so an untimed generation of one image per class (same
    settings, where a preset's first call pays its allocations) comes first, and the row is timed whole.
    """
    if len(labels) > bsz:
        return generate_set(gen, labels, settings, seed=seed, batch_size=bsz, progress=progress)
    generate_set(gen, labels[:NUM_CLASSES], settings, seed=seed, batch_size=bsz)
    (batch,) = generate_batches(gen, labels, settings, seed=seed, batch_size=bsz)
    if progress is not None:
        progress.update(1)
    return GeneratedSet(batch.images, batch.tokens, batch.total_s / len(batch.images))


def reference_images(gen: Generator) -> tuple[np.ndarray, dict]:
    """The demo FID's real reference (:data:`REFERENCE_PER_CLASS` held-out images per class) and the data
    settings it is rendered with: the model's resolution (the classifier upsamples both alike) and style."""
    data = dict(size=gen.mar.img_size, style=getattr(gen.mar, "data_style", "varied"))
    reference, _ = make_split(REFERENCE_PER_CLASS, HELDOUT_SEED, **data)
    return reference, data


def _ci(interval: dict | None, fmt: str, scale: float = 1.0) -> str:
    """``value [low, high]`` of a saved interval ("-" without one; "inf" for an infinite value)."""
    if interval is None:
        return "-"
    if interval["value"] is None:
        return "inf"
    text = format(interval["value"] * scale, fmt)
    if interval["low"] is not None and interval["high"] is not None:
        text += f" [{format(interval['low'] * scale, fmt)}, {format(interval['high'] * scale, fmt)}]"
    return text


def _images_to_resolve(row: Row, plain: Row | None) -> str:
    """The power column: images per row for a demo FID difference interval of +-RESOLUTION of plain's."""
    diff = ((row.vs_plain or {}).get("difference") or {}).get("demo_fid")
    if diff is None or plain is None:
        return "-"
    n = images_to_resolve(diff, row.num_images, plain.demo_fid)
    return "-" if n is None else f"{n:,}"


def format_comparison(rows: list[Row], floor: dict | None) -> str:
    """The table of rows measured against plain MAR (one per step count, policy and seed): each row's own
    values with 95% intervals, its difference from plain at the same steps and seed with the paired
    bootstrap interval, the distances to its plain twin where it has one, and the verdict on demo FID."""
    plain = {(r.num_iter, r.seed): r for r in rows if r.policy == "plain"}
    lines = ["| steps | policy | paired | FLOPs vs plain | CPU speed-up | class accuracy | "
             "demo FID | d accuracy | d demo FID | d KID x 1e3 | twin PSNR dB | twin SSIM | verdict (demo FID) | "
             f"images for d demo FID +-{RESOLUTION:.0%} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = plain.get((r.num_iter, r.seed))
        vs = r.vs_plain or {}
        diff, twin = vs.get("difference", {}), vs.get("twin", {})
        flops = f"{base.tflops_per_image / r.tflops_per_image:.2f}x" if base else "-"
        speed = (f"{base.seconds_per_image / r.seconds_per_image:.2f}x"
                 if base and np.isfinite(r.seconds_per_image) and np.isfinite(base.seconds_per_image) else "-")
        own = r.intervals or {}
        lines.append(f"| {r.num_iter} | {r.policy} | {'-' if not vs else 'yes' if vs['paired'] else 'no'} | {flops} | "
                     f"{speed} | {_ci(own.get('class_accuracy'), '.1%')} | {_ci(own.get('demo_fid'), '.2f')} | "
                     f"{_ci(diff.get('class_accuracy'), '+.1%')} | {_ci(diff.get('demo_fid'), '+.2f')} | "
                     f"{_ci(diff.get('kid'), '+.2f', 1e3)} | {_ci(twin.get('psnr'), '.1f')} | "
                     f"{_ci(twin.get('ssim'), '.3f')} | {vs.get('verdict', {}).get('demo_fid', '-')} | "
                     f"{_images_to_resolve(r, base)} |")
    if floor:
        lines.append(f"| - | real held-out data | - | - | - | {floor['class_accuracy']:.1%} | {floor['demo_fid']:.2f} "
                     f"| - | - | - | - | - | - | - |")
    return "\n".join(lines)


def format_markdown(rows: list[Row], floor: dict | None) -> str:
    """The table of ``rows`` summarized over seeds: means, with the range over seeds when there are several
    (rows of one seed measured against plain MAR: :func:`format_comparison`)."""
    if any(r.vs_plain is not None for r in rows) and len({r.seed for r in rows}) == 1:
        return format_comparison(rows, floor)
    summaries = summarize(rows)
    speculative = any(r.acceptance_rate is not None for r in summaries)  # a column for them only then
    lines = ["| steps | policy | seeds | TFLOPs / image | CPU s / image | class accuracy | demo FID |"
             + (" drafts accepted |" if speculative else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if speculative else "")]
    for r in summaries:
        acc, fid = f"{r.class_accuracy:.1%}", f"{r.demo_fid:.2f}"
        if len(r.seeds) > 1:
            acc += f" ({r.class_accuracy_range[0]:.1%}-{r.class_accuracy_range[1]:.1%})"
            fid += f" ({r.demo_fid_range[0]:.2f}-{r.demo_fid_range[1]:.2f})"
        accepted = "-" if r.acceptance_rate is None else f"{r.acceptance_rate:.1%}"
        lines.append(f"| {r.num_iter} | {r.policy} | {len(r.seeds)} | {r.tflops_per_image:.4f} | "
                     f"{r.seconds_per_image:.3f} | {acc} | {fid} |" + (f" {accepted} |" if speculative else ""))
    if floor:
        lines.append(f"| - | real held-out data | - | - | - | {floor['class_accuracy']:.1%} | "
                     f"{floor['demo_fid']:.2f} |" + (" - |" if speculative else ""))
    return "\n".join(lines)


# A technique written out as off (``name=None``): how definitions were saved before
# ``AccelConfig.definition`` left off techniques out.
_OFF_TECHNIQUE = re.compile(r"\b(?:%s)=None(?:, )?" % "|".join(
    f.name for f in dataclasses.fields(AccelConfig) if "technique" in f.metadata))


def same_definition(mine: str, saved: str) -> bool:
    """Whether a preset's definition now and the one a saved row was measured with name the same config;
    a technique written out as off in either is no difference (it did not exist, or was off)."""
    return _OFF_TECHNIQUE.sub("", mine) == _OFF_TECHNIQUE.sub("", saved)


def load_done_rows(path: Path, identity: dict) -> tuple[list[Row], dict[str, str]]:
    """The rows saved at ``path`` by an earlier run with the same ``identity`` (model files and settings),
    and the preset definitions they were measured with (to be saved again beside the new ones).

    Raises ``ValueError`` when ``path`` holds rows of another model or settings: mixing them into one
    table would compare unlike things, and overwriting them would throw away hours of measurement.
    """
    if not path.is_file():
        return [], {}
    saved = json.loads(path.read_text())
    if "identity" not in saved:
        raise ValueError(f"--out {path} was not written by this version of demo.evaluate (no 'identity'); "
                         f"use another --out, or delete it to start over")
    theirs = {k: v for k, v in saved["identity"].items() if k != "presets"}
    mine = {k: v for k, v in identity.items() if k != "presets"}
    # A preset counts only when both runs used it: a rerun may add or drop policies.
    shared = set(identity.get("presets", {})) & set(saved["identity"].get("presets", {}))
    changed = sorted(p for p in shared
                     if not same_definition(identity["presets"][p], saved["identity"]["presets"][p]))
    if theirs != mine or changed:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)) + [
            f"preset {p}" for p in changed]
        raise ValueError(f"--out {path} holds rows of another demo model or settings (differs in {diff}); "
                         f"use another --out, or delete it to start over")
    return [row_from_json(r) for r in saved["rows"]], saved["identity"].get("presets", {})


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from demo.registry import DEMO_DEFAULTS, DEMO_DIR, DEMO_DRAFT_MODEL, DEMO_FILES, DEMO_MODEL
    from lazymar.config import PRESETS
    from lazymar.cspd import CSPD_PRESETS, definition
    from models.schedules import check_sampling_settings
    from util.checkpoint import atomic_path
    from util.cli import check_positive
    from util.hashing import file_sha256
    from util.loading import load_draft, load_generator, model_choices

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--policies", nargs="+", default=["none", "lazymar", "lazymar-scaled"],
                   choices=["none", "comparison", *sorted(PRESETS), *sorted(CSPD_PRESETS)],
                   help="'comparison': plain MAR, LazyMAR, GtR, MARche, DiSA, ReCAP and their combinations; "
                        "cspd / cspd-release: speculative decoding with --draft_model drafting")
    p.add_argument("--draft_model", default=DEMO_DRAFT_MODEL, choices=model_choices(),
                   help="the draft of the speculative decoding policies (default: the shipped demo draft)")
    p.add_argument("--per_class", type=int, default=50, help="generated images per class and row")
    p.add_argument("--bsz", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one row per seed; the table shows the mean and the range over seeds")
    p.add_argument("--cfg", type=float, default=None, help="default: the demo default")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="also write the table (.md) and rows (.json) here")
    p.add_argument("--plot", type=Path, default=None,
                   help="also write the plot (PNG) here: each row's demo FID difference from plain MAR with its "
                        "interval against its FLOPs reduction (without plain MAR among the policies: demo FID "
                        "against TFLOPs)")
    p.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples per interval")
    p.add_argument("--samples_dir", type=Path, default=None,
                   help="where each row's per-image data is kept for comparisons across resumes (default: "
                        "output/demo_evaluate/<digest of the run's identity>)")
    args = p.parse_args(argv)
    check_positive(per_class=args.per_class, bsz=args.bsz, steps=min(args.steps), resamples=args.resamples)
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds lists a seed twice: {args.seeds}")
    check_sampling_settings(cfg=args.cfg, temperature=args.temperature)  # before loading anything
    if "comparison" in args.policies:
        at = args.policies.index("comparison")  # in its place: the table keeps the order asked for
        args.policies = list(dict.fromkeys(args.policies[:at] + COMPARISON + args.policies[at + 1:]))
    if args.threads:
        torch.set_num_threads(args.threads)
    sampling = dict(cfg=DEMO_DEFAULTS["cfg"] if args.cfg is None else args.cfg,
                    cfg_schedule=DEMO_DEFAULTS["cfg_schedule"],
                    temperature=DEMO_DEFAULTS["temperature"] if args.temperature is None else args.temperature)
    gen = load_generator(DEMO_MODEL, device=args.device)
    policies = [None if x == "none" else x for x in args.policies]
    speculative = [p for p in policies if p in CSPD_PRESETS]
    draft = load_draft(args.draft_model, gen) if speculative else None
    # Everything a saved row depends on: the model and classifier files, each preset's definition
    # (editing one in lazymar/config.py changes its rows; a CSpD row also depends on the draft's weights),
    # the images and the machine that timed them.
    definitions = {p: definition(p) for p in policies if p is not None}
    for p in speculative:
        definitions[p] += f", draft {args.draft_model} sha256 {file_sha256(draft.files['mar'])}"
    identity = dict(mar_sha256=file_sha256(DEMO_DIR / DEMO_FILES["mar"]),
                    classifier_sha256=file_sha256(DEMO_DIR / DEMO_FILES["classifier"]),
                    presets=definitions,
                    per_class=args.per_class, bsz=args.bsz, seed_rule=SEED_RULE, device=args.device,
                    threads=torch.get_num_threads(), resamples=args.resamples, **sampling)
    done, saved_presets = load_done_rows(args.out.with_suffix(".json"), identity) if args.out else ([], {})
    identity["presets"] = saved_presets | identity["presets"]  # rows of other presets stay in the file
    classifier = str(DEMO_DIR / DEMO_FILES["classifier"])
    reference, data = reference_images(gen)
    real, real_labels = make_split(args.per_class, FLOOR_SEED, **data)
    floor = demo_metrics(real, classifier, labels=real_labels, reference=reference, compute_is=False)
    header = (f"demo model, {args.per_class * NUM_CLASSES} images per row, cfg {sampling['cfg']} "
              f"{sampling['cfg_schedule']}, temperature {sampling['temperature']}, reference: "
              f"{REFERENCE_PER_CLASS * NUM_CLASSES} held-out real images ({data['style']} style, "
              f"{data['size']} px), {torch.get_num_threads()} CPU threads")
    finished = {r.key: r for r in done}  # saved rows of other steps, policies and seeds stay saved

    def save() -> None:
        save_rows(args.out.with_suffix(".json"), identity, vars(args) | {"out": str(args.out)}, floor,
                  list(finished.values()))

    def on_row(row: Row) -> None:
        finished[row.key] = row
        table = format_comparison(list(finished.values()), None) if row.intervals else format_markdown([row], None)
        tqdm.write(table.splitlines()[-1])
        if args.out:
            save()

    if done:
        print(f"reusing {len(done)} rows of {args.out.with_suffix('.json')}")
    samples_dir = args.samples_dir or Path("output/demo_evaluate") / hashlib.sha256(
        json.dumps({k: v for k, v in identity.items() if k != "presets"}, sort_keys=True).encode()).hexdigest()[:16]
    rows = evaluate(gen, steps=args.steps, policies=policies, per_class=args.per_class,
                    sampling=sampling, bsz=args.bsz, seeds=args.seeds, classifier_path=classifier, reference=reference,
                    done=done, on_row=on_row, progress=True, draft=None if draft is None else draft.mar,
                    samples_dir=samples_dir, resamples=args.resamples)
    table = format_markdown(rows, floor)
    print(header)
    print(table)
    if args.plot:
        from demo.plot import plot_difference_vs_flops, plot_quality_vs_flops
        compared = [r for r in rows if r.vs_plain is not None]
        path = (plot_difference_vs_flops(rows, args.plot, title=header) if compared
                else plot_quality_vs_flops(summarize(rows), args.plot))
        print(f"plot: {path}")
    if args.out:
        save()
        with atomic_path(args.out.with_suffix(".md")) as tmp:
            tmp.write_text(header + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    from util import cli
    cli.run(main)
