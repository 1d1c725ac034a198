"""Class-conditional generation + FID / IS, as in the MAR and LazyMAR evaluations.

    python eval.py --model mar_huge --num_iter 64 --cfg 3.25 --lazy_mar --fid_stats fid_stats/adm_in256_stats.npz
    torchrun --nproc_per_node=8 eval.py --model mar_huge ...       # same images, 8x faster

What it does (see docs/REPRODUCING.md for the paper commands):

* Labels are class-balanced: image ``i`` has class ``i % num_classes`` (``--num_images`` must be a multiple
  of the class count unless ``--unbalanced``).
* Global batches: batch ``b`` holds images ``[b*eval_bsz, (b+1)*eval_bsz)``; batches go round-robin to
  the ranks, and batch ``b`` draws ALL its randomness (orders, diffusion noise) from its own
  ``torch.Generator(device).manual_seed(batch_seed(seed, b))`` (:mod:`util.generate`, the one
  generation loop). The images therefore do not depend on the number of processes (they do depend on
  ``--eval_bsz`` and the device, which is why both are in the output folder name).
* Every image is written as ``<output_dir>/<run_name>/images/<global_index>.png`` with the index
  zero-padded to 6 digits (more when ``--num_images`` exceeds 10^6), via a temporary file and
  ``os.replace``. A rerun skips the batches whose PNGs all exist, so a killed run resumes and ends with
  exactly the files of an uninterrupted one; stale temporary files are removed at start.
* ``--num_iter``, ``--cfg``, ``--cfg_schedule`` and ``--temperature`` default to the model's own settings
  (:func:`util.loading.sampling_defaults`, the ones sample.py uses): the released models the LazyMAR
  evaluation's (64 steps, cfg 3.25 linear, temperature 1.0), the demo model its tuned ones (cfg 3.0,
  temperature 0.4). ``metrics.json`` records which were taken from the defaults (``settings.sampling_defaults``).
* The run folder's name encodes every setting that changes the images (:func:`evaluation.run.run_name`): a
  changed sampler setting, seed, batch size, precision or preset definition gets a NEW folder.
* A resume is the same run or nothing: a new run folder gets ``run.json`` (:func:`evaluation.run.run_identity`:
  weight file digests, settings, preset definition, seed rule, sampling-code digest, library versions, device).
  A rerun compares it and refuses in one line naming what differs (e.g. weights replaced at the same
  ``--ckpt`` path), rather than mixing two setups' images into one FID. A folder with images but no
  ``run.json`` is refused too. Checkpoint digests are cached in ``<output_dir>/sha256_cache.json``.
* Timing as in the papers: per-image latency and throughput over the batches generated in this run,
  excluding each process's first (warm-up) batch, synchronized on GPU; peak memory; FLOPs per image from
  :func:`lazymar.flops.estimate`. Metrics on rank 0: torch-fidelity Inception-v3 (``inception-v3-compat``)
  IS, and FID against ``--fid_stats`` (an ``.npz`` with ``mu`` (2048,) / ``sigma`` (2048, 2048), e.g. MAR's
  ``fid_stats/adm_in256_stats.npz``) or against ``--fid_ref_dir`` (a folder of reference images); the demo
  model gets :func:`demo.fidelity.demo_metrics` (demo FID, demo IS, class accuracy). Everything goes to
  ``metrics.json`` in the run folder.
* What the metrics need is loaded on rank 0 before the weights and before any image
  (:func:`evaluation.metrics.prepare_metrics`): the FID statistics or reference folder, and the Inception
  network (``--inception_weights FILE``, else torch-fidelity's download into the torch.hub cache), which then
  computes the metrics; for the demo model, its classifier. A missing or unusable file ends the run in one ``error:`` line saying how to provide it,
  in seconds rather than after hours of sampling. ``--no_metrics`` loads none of it.
* ``--accel cspd --draft_model mar_base`` (or ``cspd-release``) samples by continuous speculative decoding,
  ``--model`` verifying what the draft proposes (:mod:`lazymar.cspd`; the draft's weights from ``--draft_ckpt``
  or its released path). Its weights' digest is part of the run's identity, each batch's acceptance
  statistics are kept in ``cspd_stats/`` of the run folder, and ``metrics.json`` gets their sum over the run
  (``cspd``: accepted / verified drafts overall and per verification step); FLOPs count both models.
* If a rank fails while sampling, every rank stops after its current batch with that error (they check
  after each batch), rather than sampling on and waiting at the final gather for a rank that is gone.
* The progress bar counts images (rate and ETA); the last line and ``timing.images_per_second`` give each
  process's rate: images it generated / wall seconds of its generation loop (warm-up and PNG writing included).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import demo.registry  # noqa: F401  (registers the demo model with util.loading)
from evaluation.metrics import DEFAULT_FID_STATS, MetricInputs, compute_metrics, prepare_metrics
from evaluation.report import (acceptance_summary, flops_summary, format_table, peak_memory_bytes, rate_line,
                               save_batch_stats, summarize_timing)
from evaluation.run import (accel_definition, accel_name, claim_run_dir, class_labels, index_width, remove_stale_tmp,
                            run_identity, run_name, save_png)
from lazymar.cspd import CSpDConfig, StatsLog, named_accel
from lazymar.names import ACCEL_NAMES
from models.schedules import check_sampling_settings
from util.compile import add_compile_args, apply_compile, compile_mode
from util.distributed import gather, init_distributed, raise_everywhere, raise_if_any, shutdown
from util.generate import SamplingSettings, add_sampling_args, generate_batches, sampling_flags
from util.generate import num_batches as batch_count
from util.loading import load_draft, load_generator, model_choices
from util.precision import PRECISIONS

# tqdm's default bar, but always in img/s (tqdm flips to s/img below 1 img/s, which reads as another unit).
PROGRESS_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


# ------------------------------------------------------------------------------------------- args
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mar_huge", choices=model_choices())
    p.add_argument("--num_images", type=int, default=50000)
    p.add_argument("--eval_bsz", type=int, default=64, help="images per global batch (per process)")
    add_sampling_args(p)  # each left out: the model's default (the demo's own; the LazyMAR evaluation's else)
    p.add_argument("--num_sampling_steps", type=int, default=100, help="diffusion steps of the head")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="autocast sampling and decoding (weights stay float32; see docs/REPRODUCING.md on "
                        "upstream's fp16 autocast); part of the output folder name unless fp32")
    p.add_argument("--lazy_mar", action="store_true", help="same as --accel lazymar")
    p.add_argument("--plan_from_other_model", action="store_true",
                   help="allow a planned preset (--accel fast / balanced) on a model it was not chosen on "
                        "(refused by default: it was measured on another model)")
    p.add_argument("--accel", default=None, choices=ACCEL_NAMES,
                   help="acceleration preset (cspd / cspd-release: speculative decoding, with --draft_model)")
    p.add_argument("--draft_model", default=None, choices=model_choices(),
                   help="the draft of --accel cspd: a smaller model with --model's token grid (e.g. mar_base)")
    p.add_argument("--draft_ckpt", default=None, help="the draft's MAR checkpoint (default: its released path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="output/eval", help="root; each setting gets its own subfolder")
    add_compile_args(p)
    p.add_argument("--resume", "--ckpt", dest="ckpt", default=None, help="MAR checkpoint (default: released path)")
    p.add_argument("--vae_path", default=None, help="VAE checkpoint (default: released path)")
    p.add_argument("--no_ema", action="store_true", help="use the raw instead of the EMA weights")
    p.add_argument("--device", default=None, help="default: cuda (this rank's GPU) if available, else cpu")
    p.add_argument("--fid_stats", default=None,
                   help=f"reference statistics .npz with mu/sigma (default: {DEFAULT_FID_STATS} if present)")
    p.add_argument("--fid_ref_dir", default=None, help="folder of reference images (instead of --fid_stats)")
    p.add_argument("--inception_weights", default=None,
                   help="torch-fidelity Inception weights file (default: torch-fidelity downloads them)")
    p.add_argument("--isc_splits", type=int, default=10)
    p.add_argument("--metrics_bsz", type=int, default=64)
    p.add_argument("--unbalanced", action="store_true", help="allow num_images not divisible by the class count")
    p.add_argument("--no_metrics", action="store_true", help="only generate (and time)")
    p.add_argument("--stop_after_batches", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    return p


def sampling_settings(args: argparse.Namespace, accel: Any) -> SamplingSettings:
    """The sampler settings of the flags, with ``accel`` the config built from ``--accel`` (None: plain)."""
    return SamplingSettings(num_iter=args.num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                            temperature=args.temperature, accel=accel, precision=args.precision)


# ------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    # The sampler settings the flags leave out are the model's defaults: filled in here, once, and recorded.
    settings, defaults_used = sampling_flags(args.model, args)
    vars(args).update(settings)
    accel = accel_name(args)
    if args.num_images < 1 or args.eval_bsz < 1:
        raise SystemExit("--num_images and --eval_bsz must be >= 1")
    check_sampling_settings(args.num_iter, args.cfg, args.cfg_schedule, args.temperature)  # before loading
    if args.fid_stats is not None and args.fid_ref_dir is not None:
        raise SystemExit("give --fid_stats or --fid_ref_dir, not both")
    rank, world, device = init_distributed(args.device)
    try:
        return _run(args, accel, rank, world, device, defaults_used)
    finally:
        shutdown()


def _run(args: argparse.Namespace, accel: str | None, rank: int, world: int,
         device: torch.device, defaults_used: dict[str, Any]) -> dict[str, Any]:
    sampling_compile = compile_mode(args, device)  # a bad --cuda_graph fails before anything loads
    # Metric files first, before the weights and the run folder: fail before hours of sampling, not after.
    metric_inputs: MetricInputs | None = None
    problem: BaseException | None = None
    if rank == 0 and not args.no_metrics:
        try:
            metric_inputs = prepare_metrics(args)
        except Exception as e:  # every rank must stop, not wait for rank 0 at a collective
            problem = e
    raise_everywhere(problem, world)

    gen = load_generator(args.model, ckpt=args.ckpt, vae_path=args.vae_path, use_ema=not args.no_ema,
                         device=device, num_sampling_steps=args.num_sampling_steps)
    mar = gen.mar
    # Speculative decoding: the draft on the same device with the same head steps, checked against the
    # target before any folder or image exists. Each batch's acceptance statistics land in ``stats``.
    draft = None if args.draft_model is None else load_draft(args.draft_model, gen, ckpt=args.draft_ckpt,
                                                             vae_path=args.vae_path, use_ema=not args.no_ema)
    stats = StatsLog()
    accel_config = named_accel(accel, None if draft is None else draft.mar, on_stats=stats)
    if isinstance(accel_config, CSpDConfig):
        accel_config.check_target(mar)
    if metric_inputs is not None and metric_inputs.demo_classifier is not None:
        metric_inputs = dataclasses.replace(metric_inputs, demo_reference=dict(
            reference_size=mar.img_size, reference_style=getattr(mar, "data_style", "varied")))
    apply_compile(mar, sampling_compile)
    if draft is not None:
        apply_compile(draft.mar, sampling_compile)
    if gen.is_random and rank == 0:
        print(f"note: {args.model} has random weights; its images (and metrics) are meaningless")
    num_classes = mar.num_classes
    if args.num_images % num_classes != 0 and not args.unbalanced:
        raise SystemExit(f"--num_images {args.num_images} is not a multiple of the {num_classes} classes; the "
                         f"evaluation is class-balanced (pass --unbalanced to allow it)")
    labels_all = class_labels(args.num_images, num_classes)

    run_dir = Path(args.output_dir) / run_name(args, device)
    image_dir = run_dir / "images"
    identity: dict[str, Any] = {}
    if rank == 0:
        image_dir.mkdir(parents=True, exist_ok=True)
        try:
            identity = run_identity(args, accel, gen, device, num_classes, draft)
            claim_run_dir(run_dir, identity)
        except Exception as e:  # every rank must stop, not wait for rank 0 at a barrier
            problem = e
        if problem is None:
            stale = remove_stale_tmp(image_dir)
            if stale:
                print(f"removed {stale} partial files from an interrupted run")
    raise_everywhere(problem, world)

    width = index_width(args.num_images)
    num_batches = batch_count(args.num_images, args.eval_bsz)
    mine = list(range(rank, num_batches, world))
    existing = set(os.listdir(image_dir))

    def paths(b: int) -> list[Path]:
        return [image_dir / f"{i:0{width}d}.png" for i in range(b * args.eval_bsz,
                                                                 min((b + 1) * args.eval_bsz, args.num_images))]

    todo = [b for b in mine if not all(p.name in existing for p in paths(b))]
    if rank == 0:
        if defaults_used:
            print(f"{args.model}'s default sampling settings: "
                  + ", ".join(f"{k} {v}" for k, v in defaults_used.items()))
        print(f"{run_dir}: {num_batches} batches of {args.eval_bsz}, {world} process(es); "
              f"{len(mine) - len(todo)} of rank 0's {len(mine)} batches already done")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    timed_images, sample_s, total_s, generated = 0, 0.0, 0.0, 0
    now = todo if args.stop_after_batches is None else todo[:args.stop_after_batches]
    # Counted in images, so that the bar's rate and ETA read in images whatever the batch size.
    bar = tqdm(total=sum(len(paths(b)) for b in now), unit="img", desc="sampling", bar_format=PROGRESS_FORMAT,
               disable=rank != 0)
    # Every rank checks, after each of its batches, whether any rank failed (a rank with fewer batches left
    # checks as many times): a failure stops all ranks within a batch, with its error.
    rounds = max(gather(len(now), world))
    batches = generate_batches(gen, labels_all, sampling_settings(args, accel_config), seed=args.seed,
                               batch_size=args.eval_bsz, batches=now)
    start = time.perf_counter()
    for k in range(rounds):
        problem = None
        try:
            if k < len(now):
                batch = next(batches)
                if draft is not None:  # before the images: a batch with images has its statistics
                    save_batch_stats(run_dir, batch.index, stats.runs[k].as_dict())
                if k > 0:  # the first batch of each process is warm-up
                    timed_images += len(batch.images)
                    sample_s += batch.sample_s
                    total_s += batch.total_s
                for img, p in zip(batch.images, paths(batch.index)):
                    save_png(img, p)
                generated += len(batch.images)
                bar.update(len(batch.images))
        except Exception as e:  # the other ranks must stop too, not sample on and wait at the gather below
            problem = e
        raise_if_any(problem, world, device)
    wall_s = time.perf_counter() - start
    bar.close()
    if len(now) < len(todo):
        print(f"rank {rank}: stopping after {len(now)} batches (--stop_after_batches)", flush=True)
        sys.exit(3)

    timing = {"images_generated": generated, "images_timed": timed_images, "sample_s": sample_s,
              "sample_vae_s": total_s, "wall_s": wall_s,
              "images_per_second": generated / wall_s if generated else None,
              "peak_memory_bytes": peak_memory_bytes(device),
              "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process RSS peak"}
    gathered = gather(timing, world)
    if rank != 0:
        return {}

    missing = [i for i in range(args.num_images) if not (image_dir / f"{i:0{width}d}.png").is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} images missing after generation (e.g. {missing[:5]})")
    result: dict[str, Any] = {
        "settings": {**{k: v for k, v in vars(args).items() if k != "stop_after_batches"}, "accel": accel,
                     "accel_config": accel_definition(args, accel), "world_size": world,
                     "device": str(device), "device_name": (torch.cuda.get_device_name(device)
                                                          if device.type == "cuda" else "cpu"),
                     "run_dir": str(run_dir), "image_name": f"<index zero-padded to {width}>.png",
                     "labels": "image i has class i % num_classes", "num_classes": num_classes,
                     "sampling_defaults": {"model": args.model, "used": defaults_used}},
        "identity": identity,
        "timing": summarize_timing(gathered, args.eval_bsz),
        "flops": flops_summary(gen, args, accel_config),
    }
    if draft is not None:  # accepted / verified drafts over every batch of the run, and per verification step
        result["cspd"] = acceptance_summary(run_dir, num_batches)
    if metric_inputs is not None:
        result["metrics"] = compute_metrics(args, metric_inputs, image_dir, labels_all, device)
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    print(format_table(result))
    print(f"wrote {run_dir / 'metrics.json'}")
    print(rate_line(result["timing"]))
    return result


if __name__ == "__main__":
    from util import cli
    cli.run(main, build_parser().parse_args())
