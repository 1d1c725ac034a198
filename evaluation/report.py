"""What an eval.py run reports besides its metrics: timing over the processes, FLOPs, the summary table."""
from __future__ import annotations

import argparse
import resource
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


def flops_summary(gen, args: argparse.Namespace, accel: str | None) -> dict[str, Any]:
    from lazymar.flops import estimate
    rep = estimate(gen.mar, num_iter=args.num_iter, cfg=args.cfg, accel=accel, bsz=args.eval_bsz, vae=gen.vae)
    out = {"per_image": rep.total, "per_image_with_vae": rep.total_with_vae,
           "components": {k: float(v) for k, v in rep.components.items()}}
    if accel is not None:
        base = estimate(gen.mar, num_iter=args.num_iter, cfg=args.cfg, accel=None, bsz=args.eval_bsz)
        out["plain_per_image"] = base.total
        out["speedup_vs_plain"] = base.total / rep.total
    return out


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
