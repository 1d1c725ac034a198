"""What an eval.py run reports besides its metrics: timing over the processes, FLOPs, speculative
decoding's acceptance statistics, the summary table."""
from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path
from typing import Any

import numpy as np
import torch


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def summarize_timing(per_rank: list[dict[str, Any]], eval_bsz: int) -> dict[str, Any]:
    timed = [t for t in per_rank if t["images_timed"] > 0]
    rates = [t["images_per_second"] for t in per_rank if t["images_per_second"] is not None]
    out: dict[str, Any] = {"per_rank": per_rank, "batch_size": eval_bsz,
                           "peak_memory_gib": max(t["peak_memory_bytes"] for t in per_rank) / 2 ** 30,
                           "peak_memory_kind": per_rank[0]["peak_memory_kind"],
                           # Per process, wall clock of the whole loop (warm-up, VAE, PNGs): what a long run
                           # actually achieves; the mean over the processes that generated anything.
                           "images_per_second": float(np.mean(rates)) if rates else None}
    if timed:
        # Per process: seconds per image at this batch size; all processes: images per second in total.
        out["latency_s_per_image"] = float(np.mean([t["sample_s"] / t["images_timed"] for t in timed]))
        out["latency_with_vae_s_per_image"] = float(np.mean([t["sample_vae_s"] / t["images_timed"] for t in timed]))
        out["throughput_images_per_s"] = float(sum(t["images_timed"] / t["sample_vae_s"] for t in timed))
    else:
        out["latency_s_per_image"] = out["latency_with_vae_s_per_image"] = out["throughput_images_per_s"] = None
        out["note"] = "nothing timed: every process generated at most its warm-up batch (resumed run?)"
    return out


def flops_summary(gen, args: argparse.Namespace, accel: Any) -> dict[str, Any]:
    """FLOPs per image of the run's sampler (``accel``: None or the config it samples with; for CSpD
    both models' FLOPs), and against plain MAR."""
    from lazymar.flops import estimate
    rep = estimate(gen.mar, num_iter=args.num_iter, cfg=args.cfg, accel=accel, bsz=args.eval_bsz, vae=gen.vae)
    out = {"per_image": rep.total, "per_image_with_vae": rep.total_with_vae,
           "components": {k: float(v) for k, v in rep.components.items()}}
    if accel is not None:
        base = estimate(gen.mar, num_iter=args.num_iter, cfg=args.cfg, accel=None, bsz=args.eval_bsz)
        out["plain_per_image"] = base.total
        out["speedup_vs_plain"] = base.total / rep.total
    return out


STATS_DIR = "cspd_stats"  # in the run folder: one file of acceptance statistics per batch


def stats_path(run_dir: Path, batch: int) -> Path:
    return run_dir / STATS_DIR / f"{batch:06d}.json"


def save_batch_stats(run_dir: Path, batch: int, stats: dict[str, Any]) -> None:
    """Record batch ``batch``'s speculative-decoding statistics (:meth:`lazymar.cspd.CSpDStats.as_dict`),
    before its images: a batch whose images exist has its statistics, so a resumed run reports all."""
    from util.checkpoint import atomic_path
    path = stats_path(run_dir, batch)
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(stats))


def acceptance_summary(run_dir: Path, num_batches: int) -> dict[str, Any]:
    """The run's acceptance statistics over all its batches (:func:`lazymar.cspd.summarize`), however many
    invocations generated them; ``batches_without_stats`` counts batches whose file is missing (none, unless
    the folder was edited by hand), which the totals then leave out."""
    from lazymar.cspd import summarize
    paths = [stats_path(run_dir, b) for b in range(num_batches)]
    found = [json.loads(p.read_text()) for p in paths if p.is_file()]
    return {**summarize(found), "batches_without_stats": num_batches - len(found)}


def rate_line(timing: dict[str, Any]) -> str:
    """The run's last line: rank 0's sampling rate (and the mean over processes), the number to watch at scale."""
    mine, world = timing["per_rank"][0], len(timing["per_rank"])
    if mine["images_per_second"] is None:
        return "sampling: nothing generated on rank 0 (every image of its batches already exists)"
    line = (f"sampling: {mine['images_generated']} images in {mine['wall_s']:.1f} s on rank 0 = "
            f"{mine['images_per_second']:.2f} images/s per process")
    if world > 1:
        line += f" (mean of {world} processes: {timing['images_per_second']:.2f})"
    return line + ", wall clock incl. warm-up and PNG writing"


def format_table(result: dict[str, Any]) -> str:
    s, t, f = result["settings"], result["timing"], result["flops"]
    rows = [("model", s["model"]), ("accel", s["accel"] or "none"),
            ("steps / cfg / schedule / temp", f"{s['num_iter']} / {s['cfg']:g} / {s['cfg_schedule']} / "
                                              f"{s['temperature']:g}"),
            ("images / processes", f"{s['num_images']} / {s['world_size']}"),
            ("GFLOPs per image (no VAE)", f"{f['per_image'] / 1e9:.2f}"),
            ("GFLOPs per image (with VAE)", f"{f['per_image_with_vae'] / 1e9:.2f}")]
    if "speedup_vs_plain" in f:
        rows.append(("FLOPs reduction", f"{f['speedup_vs_plain']:.2f}x"))
    if "cspd" in result:
        from lazymar.cspd import describe
        rows.append(("CSpD (draft %s)" % s["draft_model"], describe(result["cspd"])))
    if t["latency_s_per_image"] is not None:
        rows += [("latency s/image (bsz %d)" % t["batch_size"], f"{t['latency_s_per_image']:.4f}"),
                 ("latency s/image incl. VAE", f"{t['latency_with_vae_s_per_image']:.4f}"),
                 ("throughput images/s (all)", f"{t['throughput_images_per_s']:.2f}")]
    if t["images_per_second"] is not None:
        rows.append(("images/s per process (wall)", f"{t['images_per_second']:.2f}"))
    rows.append(("peak memory GiB", f"{t['peak_memory_gib']:.2f}"))
    for k, v in result.get("metrics", {}).items():
        rows.append((k, f"{v:.4f}" if isinstance(v, float) else str(v)))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)
