"""Seconds per training step of a train.py model in each way of executing it (an entry point, like train.py).

    python -m benchmarks.step_timing --batch_size 32 --threads 2                        # CPU
    python -m benchmarks.step_timing --batch_size 512 --precision bf16 --modes eager,buckets,step,graph   # GPU

Modes: ``eager`` (MAR.forward), ``buckets`` (the static-shape step of demo.train_step, eager),
``blocks`` (``--compile blocks``), ``step`` (``--compile step``), ``graph`` (``--compile step
--cuda_graph``, GPU only). Each times what train.py does per step (forward, backward, grad clipping,
AdamW, EMA) on random latents, so the data pipeline is left out, and compilation is left out too: every
mode first runs one step per bucket. The timed steps take turns (a step of each mode per round), so a
load that comes and goes on a shared machine hits every mode alike. One JSON line per mode: median
wall and process (CPU) seconds per step, and the wall seconds of each round.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from demo.train_step import MODEL_SIZES, BucketedMaskStep, compile_for_training, compile_step
from models.mar import mar_from_config
from util.ema import ParamEMA

MODES = ("eager", "buckets", "blocks", "step", "graph")


def prepare(mode: str, args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], None], float]:
    """A function that runs one training step of ``mode``, and the seconds its warm-up took."""
    torch.manual_seed(0)
    config = dict(MODEL_SIZES[args.model], img_size=32, vae_stride=2, vae_embed_dim=4, class_num=12,
                  diffusion_batch_mul=args.diffusion_batch_mul, noise_schedule="linear",
                  attn_dropout=0.0, proj_dropout=0.0)
    model = mar_from_config(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    ema = ParamEMA(model, 0.9995)
    bucketed = BucketedMaskStep(model, args.mask_buckets) if mode in ("buckets", "step", "graph") else None
    if mode == "blocks":
        compile_for_training(model)
    step_fn = bucketed if bucketed is not None else model
    if mode in ("step", "graph"):
        step_fn = compile_step(step_fn, args.mask_buckets, cuda_graph=mode == "graph")
    x = torch.randn(args.batch_size, 4, 16, 16, device=device)
    y = torch.arange(args.batch_size, device=device) % 12

    def one_step(count: int | None) -> None:
        if mode == "graph":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            if bucketed is None:
                loss = step_fn(x, y)
            else:
                orders = bucketed.draw_orders(x.shape[0], device)
                loss = step_fn(x, y, orders, bucketed.draw_num_masked() if count is None else count)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        ema.update(model)

    t0 = time.perf_counter()
    for count in (bucketed.counts if bucketed is not None else [None] * 2):  # compile / warm up
        one_step(count)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (lambda: one_step(None)), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Seconds per train.py step in each execution mode")
    p.add_argument("--model", default="demo", choices=sorted(MODEL_SIZES))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode (after the warm-up)")
    p.add_argument("--mask_buckets", type=int, default=8)
    p.add_argument("--diffusion_batch_mul", type=int, default=4)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--modes", default="eager,buckets,blocks,step")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        raise ValueError(f"--modes: {sorted(set(modes) - set(MODES))} unknown; choose from {MODES}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "graph" in modes and device.type != "cuda":
        raise ValueError("--modes graph needs a CUDA GPU and this machine has none")
    torch.set_num_threads(args.threads)
    steps = {mode: prepare(mode, args, device) for mode in modes}
    walls: dict[str, list[float]] = {mode: [] for mode in modes}
    cpus: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.steps):
        for mode, (one_step, _) in steps.items():
            w, c = time.perf_counter(), time.process_time()
            one_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            walls[mode].append(time.perf_counter() - w)
            cpus[mode].append(time.process_time() - c)
    for mode, (_, warmup) in steps.items():
        print(json.dumps(dict(mode=mode, model=args.model, batch_size=args.batch_size, device=str(device),
                              precision=args.precision, threads=torch.get_num_threads(),
                              wall_s_per_step=round(statistics.median(walls[mode]), 4),
                              cpu_s_per_step=round(statistics.median(cpus[mode]), 4), warmup_s=round(warmup, 1),
                              wall_s_rounds=[round(v, 3) for v in walls[mode]])), flush=True)


if __name__ == "__main__":
    from util import cli
    cli.run(main)
