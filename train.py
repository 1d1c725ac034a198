"""Train a MAR on cached demo-tokenizer latents (single process, or DDP under ``torchrun``).

The demo MAR recipe (2 CPU cores; demo/TRAINING.md has what it reaches, its wall time and why each flag)::

    python train.py --model demo --patch_size 2 --data_style simple --num_per_class 5000 --epochs 10 \
        --batch_size 64 --lr 1e-3 --min_lr_ratio 0.05 --warmup_steps 200 --ema_rate 0.999 --ema_warmup \
        --noise_schedule linear --pos_init sincos --precision auto --diffusion_batch_mul 1 --threads 2 \
        --output_dir output/demo_mar --save_every_minutes 10

Several processes: ``torchrun --standalone --nproc_per_node=N train.py ...`` (``--batch_size`` is per
process; gloo on CPU, nccl on GPU).

Export the EMA weights for sampling (``demo.registry.load_demo`` reads this file)::

    python train.py --output_dir output/demo_mar --export pretrained_models/demo/mar.pt --export_dtype fp32

Faster steps (demo/TRAINING.md, "One GPU window"): ``--mask_buckets N`` draws the mask ratio from N fixed
values so every step has one of N static shapes (``demo.train_step``), ``--compile step`` compiles that
whole step (two compilations) and ``--cuda_graph`` replays it as CUDA graphs; the cached latents
stay on the device. ``--lr`` is absolute: a larger ``--batch_size`` needs its own (see TRAINING.md).

A resume must be the same run: the checkpoint stores the run's settings (every flag but
``RESUME_EXEMPT``, plus the process count) and a resume that changes one is refused, naming it, unless
``--allow_changed NAME,...`` (or ``all``) says it is intended; the change is printed and recorded.

Reproducibility: every random draw of a training step (posterior noise, masks, mask ratio, label
dropout, diffusion noise/timesteps, dropout) comes from torch's global RNG re-seeded at the start of
the step from ``(seed, step, rank)``, and the data order of an epoch is a ``DistributedSampler``
permutation seeded by ``(seed, epoch)``. So a run stopped after any step and auto-resumed from
``<output_dir>/checkpoint-last.pth`` continues with exactly the losses and weights of an
uninterrupted run, provided the kernels are the same: same ``--threads``, CPU capability and torch
(``execution``). With another thread count (or CPU, or torch) the run goes on with the same settings
and random draws, but float sums round differently from that step on (LayerNorm's and softmax's
backward split their sums by thread): the losses then agree to float rounding, not bit for bit, and
the resume says so and records it (``execution_changes``; demo/TRAINING.md, "Resume and the CPU's
kernels"). The RNG state is also stored (``rng``) and restored.

``--precision auto`` (the default) is resolved once, when the run starts, to ``bf16`` on a CPU that
multiplies bf16 natively (AVX-512 BF16 or AMX) and to ``fp32`` elsewhere (``util.precision``); the
resolved name is what the checkpoint's ``args`` and ``settings`` hold, and a resume with ``auto``
keeps the checkpoint's precision (another precision would be another run).

Checkpoints (written atomically: tmp file + ``os.replace``) hold ``{'model', 'model_ema',
'optimizer', 'step', 'epoch', 'config' (MAR kwargs without norm_layer), 'args' (plain dict), 'settings',
'setting_changes', 'execution', 'execution_changes', 'rng', 'ema_state' (EMA counters), 'latent_scale',
'tokenizer_sha'}``. Per-step losses go to ``<output_dir>/log.jsonl``; its ``time`` is seconds since the
start when the step was queued (on GPU the device may still be running it; losses are read back every
``--log_every`` steps, and the times are exact at those points).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DistributedSampler

from models.mar import MAR, mar_from_config
from demo.train_step import MODEL_SIZES, BucketedMaskStep, compile_for_training, compile_step  # noqa: F401
from demo.dataset import STYLES
from util.checkpoint import CheckpointError, atomic_save
from util.cli import check_positive
from util.distributed import barrier, init_distributed, shutdown
from util.ema import ParamEMA
from util.lr import warmup_cosine
from util.pos_embed import init_mar_pos_embed_sincos
from util.precision import AUTO, autocast, resolve_precision

CHECKPOINT_NAME = "checkpoint-last.pth"

# Flags that may differ between the processes (windows) of one run, with the reason. Every other flag,
# and the process count, is a run setting: a resume must repeat it (check_resume_settings), because it
# decides what is trained (model, data, LR schedule, data order, random draws).
RESUME_EXEMPT: dict[str, str] = {
    "time_limit": "how long this window lasts",
    "stop_after": "where this window stops",
    "save_every": "checkpoint frequency: bookkeeping",
    "save_every_minutes": "checkpoint frequency: bookkeeping",
    "log_every": "how often losses are read back; the log keeps every step either way",
    "no_progress": "progress bar",
    "threads": "CPU threads of this machine; another count rounds float sums differently, so the run continues "
               "to float rounding rather than bit for bit (said and recorded as an execution change)",
    "compile": "how the same step is executed: the compiled step draws the eager random stream "
               "(demo.train_step.eager_random_stream) and sums equal to float tolerance (tests/test_train_step.py)",
    "cuda_graph": "how the same step is executed (GPU only)",
    "output_dir": "a run folder may be moved or carried to another machine",
    "cache_dir": "where the latent cache lives; its content is keyed by tokenizer SHA-256 and split",
    "tokenizer": "a path; the tokenizer's content is checked by SHA-256 (tokenizer_sha)",
    "init_from": "read only when a run starts; a resume continues from its checkpoint",
    "export": "export mode exits before training",
    "export_dtype": "export mode exits before training",
    "allow_changed": "this flag says which settings may change",
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train MAR on cached demo latents", add_help=True)
    # data
    p.add_argument("--tokenizer", default="pretrained_models/demo/tokenizer.pt")
    p.add_argument("--num_per_class", type=int, default=1500, help="training images per class")
    p.add_argument("--data_seed", type=int, default=0, help="dataset split seed (0 = demo.dataset.TRAIN_SEED)")
    p.add_argument("--data_style", default="simple", choices=sorted(STYLES),
                   help="the shapes' nuisance factors (demo.dataset.STYLES): 'simple' is the demo MAR's data "
                        "(demo/TRAINING.md), 'varied' the full distribution the classifier and tokenizer see")
    p.add_argument("--cache_dir", default="output/latent_cache")
    # model
    p.add_argument("--model", default="demo", choices=sorted(MODEL_SIZES))
    p.add_argument("--width", type=int, default=None, help="override encoder and decoder width")
    p.add_argument("--depth", type=int, default=None, help="override encoder and decoder depth")
    p.add_argument("--num_heads", type=int, default=None)
    p.add_argument("--buffer_size", type=int, default=None)
    p.add_argument("--diffloss_d", type=int, default=None)
    p.add_argument("--diffloss_w", type=int, default=None)
    p.add_argument("--patch_size", type=int, default=1,
                   help="latent patch size grouped into one MAR token (demo tokenizer: stride 2, 16x16x4 "
                        "latents -> 16x16 tokens of 4 dims, 256 tokens as in the released models)")
    p.add_argument("--diffusion_batch_mul", type=int, default=4)
    p.add_argument("--num_sampling_steps", default="100")
    p.add_argument("--noise_schedule", default="cosine", choices=["cosine", "linear"],
                   help="the head's diffusion schedule: cosine as the released models; linear samples "
                        "stably after far less training (the demo model, see demo/TRAINING.md)")
    p.add_argument("--label_drop_prob", type=float, default=0.1)
    p.add_argument("--mask_ratio_min", type=float, default=0.7)
    p.add_argument("--dropout", type=float, default=0.0, help="attention and projection dropout")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--compile", nargs="?", const="blocks", default="off", choices=["off", "blocks", "step"],
                   help="blocks (also plain --compile): torch.compile the transformer blocks and the DiffLoss MLP "
                        "in place; step: compile the whole forward and backward of the bucketed step (needs "
                        "--mask_buckets; two compilations). Checkpoint keys are unchanged either way; the "
                        "first steps are slow while it compiles")
    p.add_argument("--cuda_graph", action="store_true",
                   help="replay the compiled step as CUDA graphs (torch.compile mode reduce-overhead; needs a "
                        "CUDA GPU, --compile step and --mask_buckets)")
    p.add_argument("--mask_buckets", type=int, default=0,
                   help="draw the training mask ratio from N fixed values (midpoint quantiles of the truncated "
                        "Gaussian) so the encoder sees N token counts: static shapes for --compile step and "
                        "--cuda_graph (demo.train_step); 0 = MAR.forward's continuous ratio")
    p.add_argument("--pos_init", default="normal", choices=["normal", "sincos"],
                   help="start of the learned position embeddings: normal (upstream) or the 2-D sin-cos "
                        "grid (util.pos_embed; the demo model: locality from step 0)")
    p.add_argument("--init_from", default=None,
                   help="start a new run from these weights (an exported mar.pt or a training checkpoint; "
                        "its EMA weights start both the model and the EMA) instead of from scratch; the "
                        "model config and tokenizer must match; ignored when --output_dir holds a checkpoint")
    p.add_argument("--high_t_fraction", type=float, default=0.0,
                   help="fraction of head training tokens with t drawn from the last 10 diffusion steps "
                        "(models.diffloss.DiffLoss.high_t_fraction; 0 = upstream objective)")
    # optimisation
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--lr_schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--precision", default=AUTO, choices=[AUTO, "fp32", "bf16"],
                   help="bf16: autocast the forward pass (CPU or GPU; weights and optimizer stay fp32). auto: bf16 "
                        "on a CPU that multiplies bf16 natively (AVX-512 BF16 or AMX), else fp32 (on an AVX2 CPU "
                        "bf16 is slower: demo/TRAINING.md); resolved once and recorded as the resolved name; a "
                        "resume with auto keeps the checkpoint's precision")
    p.add_argument("--weight_decay", type=float, default=0.02)
    p.add_argument("--grad_clip", type=float, default=3.0, help="max grad norm (0 = off)")
    p.add_argument("--ema_rate", type=float, default=0.998)
    p.add_argument("--ema_warmup", action="store_true", help="timm-style EMA warm-up (min(rate,(1+n)/(10+n)))")
    p.add_argument("--seed", type=int, default=0)
    # bookkeeping
    p.add_argument("--output_dir", default="output/demo_mar")
    p.add_argument("--save_every", type=int, default=100, help="checkpoint every N steps (and each epoch end)")
    p.add_argument("--stop_after", type=int, default=None,
                   help="stop (after saving) once this many steps are done in total (resume later)")
    p.add_argument("--time_limit", type=float, default=None,
                   help="stop (after saving) this many minutes after the process started (setup, data encoding "
                        "and compilation included, so a GPU window's budget is one number)")
    p.add_argument("--save_every_minutes", type=float, default=None,
                   help="also checkpoint when this many minutes have passed since the last save (a window cut "
                        "short loses at most that much)")
    p.add_argument("--allow_changed", default="",
                   help="comma-separated run settings a resume may change (e.g. epochs,lr), or 'all'; each "
                        "change is printed and recorded in the checkpoint (see RESUME_EXEMPT for the flags "
                        "that may always change)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--log_every", type=int, default=20,
                   help="read losses back from the device every N steps (one sync; the log still has one "
                        "line per step); also how often a multi-process run checks --time_limit")
    p.add_argument("--export", default=None, help="write the EMA weights of the last checkpoint here and exit")
    p.add_argument("--export_dtype", default="fp32", choices=["fp16", "fp32"],
                   help="fp32 by default: the first sampling step amplifies head errors ~316x")
    return p


def model_config(args: argparse.Namespace, latent_channels: int, image_size: int, vae_stride: int,
                 class_num: int) -> dict[str, Any]:
    """MAR constructor kwargs (without ``norm_layer``) as plain values."""
    cfg = dict(MODEL_SIZES[args.model])
    if args.width is not None:
        cfg["encoder_embed_dim"] = cfg["decoder_embed_dim"] = args.width
    if args.depth is not None:
        cfg["encoder_depth"] = cfg["decoder_depth"] = args.depth
    if args.num_heads is not None:
        cfg["encoder_num_heads"] = cfg["decoder_num_heads"] = args.num_heads
    for k in ("buffer_size", "diffloss_d", "diffloss_w"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    cfg.update(img_size=image_size, vae_stride=vae_stride, patch_size=args.patch_size,
               vae_embed_dim=latent_channels,
               class_num=class_num, mask_ratio_min=args.mask_ratio_min, label_drop_prob=args.label_drop_prob,
               attn_dropout=args.dropout, proj_dropout=args.dropout, num_sampling_steps=str(args.num_sampling_steps),
               diffusion_batch_mul=args.diffusion_batch_mul, grad_checkpointing=bool(args.grad_checkpointing),
               noise_schedule=args.noise_schedule)
    return cfg



def posterior_sample(mean: torch.Tensor, std: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (mean + std * eps)`` with ``eps`` drawn on the latents' device (as
    ``util.latents.draw_latents``, which draws on the CPU; on the CPU the two are the same draw)."""
    eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
    return (mean + std * eps) * scale


def run_settings(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint: every flag but RESUME_EXEMPT, plus
    the process count (``--batch_size`` is per process and the data order depends on the rank count)."""
    settings = {k: v for k, v in vars(args).items() if k not in RESUME_EXEMPT}
    settings["world_size"] = world_size
    return settings


def check_resume_settings(stored: dict[str, Any] | None, current: dict[str, Any], allow: str,
                          ckpt_path: Path) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume ``ckpt_path`` with settings other than those it was trained with.

    A setting the checkpoint lacks (a flag added after it was written) counts as its default.

    Returns:
        ``{name: (old, new)}``: the changes ``allow`` (``--allow_changed``) let through.
    """
    allowed = {a.strip() for a in allow.split(",") if a.strip()}
    if stored is None:
        if "all" in allowed:
            return {}
        raise ValueError(f"{ckpt_path} was written by a train.py that did not record its run settings, so "
                         f"this resume cannot be checked to continue the same run; pass --allow_changed all to "
                         f"resume it anyway (the settings of this command are then recorded), or start over in "
                         f"a fresh --output_dir")
    defaults = get_args_parser().parse_args([]).__dict__ | {"world_size": 1}
    changes = {k: (stored.get(k, defaults.get(k)), v) for k, v in current.items()
               if stored.get(k, defaults.get(k)) != v}
    refused = {k: ov for k, ov in changes.items() if k not in allowed and "all" not in allowed}
    if refused:
        listed = ", ".join(f"{_flag(k)} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ValueError(f"{ckpt_path} was trained with other settings ({listed}); rerun with its settings, "
                         f"pass --allow_changed {','.join(refused)} if the change is intended (the LR schedule "
                         f"and data order then change from the resumed step on), or use a fresh --output_dir")
    return changes


def run_precision(requested: str, device: torch.device, ck: dict[str, Any] | None) -> tuple[str, str]:
    """The precision this run trains in, and why: ``requested`` unless it is ``auto``; ``auto`` keeps a
    resumed checkpoint's precision (another one would be another run) and otherwise asks
    :func:`util.precision.resolve_precision` what this device multiplies fast."""
    if requested != AUTO:
        return requested, "asked"
    stored = ((ck.get("settings") or ck.get("args") or {}).get("precision") if ck else None)
    if stored in ("fp32", "bf16"):
        return stored, "the checkpoint's precision"
    resolved = resolve_precision(AUTO, device)
    if device.type != "cpu":
        return resolved, f"on {device.type} auto means fp32; ask for bf16 with --precision bf16"
    native = "multiplies bf16 natively" if resolved == "bf16" else "has no native bf16"
    return resolved, f"this CPU ({torch.backends.cpu.get_cpu_capability()}) {native}"


def execution_info(threads: int, device: torch.device) -> dict[str, Any]:
    """What decides the rounding of a step besides the run settings: the kernels (CPU capability, torch,
    device) and how the CPU work is split (threads). Equal between windows = bit-for-bit resume."""
    info: dict[str, Any] = dict(threads=threads, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                                torch=str(torch.__version__), device=device.type)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _flag(name: str) -> str:
    return "processes" if name == "world_size" else f"--{name}"


def lr_at(step: int, total_steps: int, args: argparse.Namespace) -> float:
    if args.lr_schedule == "constant" and step >= args.warmup_steps:
        return args.lr
    return warmup_cosine(step, total_steps, args.lr, args.warmup_steps, args.min_lr_ratio)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2 ** 63 - 1)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a resumed run starts from)."""
    if not log_path.is_file():
        return
    keep = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    log_path.write_text("".join(ln + "\n" for ln in keep))


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32") -> Path:
    """Write ``{'model_ema', 'config', 'latent_scale', 'tokenizer_sha', 'data_style', 'step', 'dtype'}`` from a
    training checkpoint (``data_style``: which shapes it learned, so that its demo FID is measured against
    real images of the same style; checkpoints of before the flag learned the varied style).

    ``fp16`` halves the file (:func:`demo.registry.load_demo_mar` loads it into an fp32 model), but
    its rounding alone is of the order of the eps precision the first sampling step needs.
    """
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"no training checkpoint at {checkpoint}: train first (train.py "
                                f"--output_dir {Path(checkpoint).parent}), then export")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = ckpt["model_ema"]
    if dtype == "fp16":
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    out = Path(out)
    atomic_save(dict(model_ema=sd, config=ckpt["config"], latent_scale=ckpt["latent_scale"],
                     tokenizer_sha=ckpt["tokenizer_sha"], data_style=ckpt.get("data_style", "varied"),
                     step=ckpt["step"], dtype=dtype), out)
    print(f"exported EMA weights of step {ckpt['step']} ({dtype}) to {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def init_weights(model: MAR, path: str | os.PathLike, config: dict[str, Any], tokenizer_sha: str) -> None:
    """Load the EMA weights of an export or training checkpoint into ``model`` (a warm start).

    Why: a run can continue from weights whose optimizer state is gone (an exported ``mar.pt``), e.g.
    to extend training in a later session; the new run gets a fresh optimizer and LR schedule.
    """
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if "model_ema" not in ck or "config" not in ck:
        raise ValueError(f"--init_from {path} holds {sorted(ck)}; expected an export or checkpoint of "
                         f"train.py ('model_ema' and 'config')")
    if dict(ck["config"]) != config:
        diff = sorted(k for k in set(config) | set(ck["config"]) if config.get(k) != ck["config"].get(k))
        raise ValueError(f"--init_from {path} has another model config (differs in {diff}); use the "
                         f"model flags it was trained with")
    if ck.get("tokenizer_sha") != tokenizer_sha:
        raise ValueError(f"--init_from {path} was trained on the latents of another tokenizer than "
                         f"--tokenizer; use the matching tokenizer")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["model_ema"].items()},
                          strict=True)


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values that would silently train something else than asked (before any work)."""
    if not 0.0 <= args.high_t_fraction <= 1.0:
        raise ValueError(f"--high_t_fraction must be in [0, 1], got {args.high_t_fraction}")
    check_positive(**{name: getattr(args, name) for name in ("epochs", "batch_size", "num_per_class", "threads",
                                                             "log_every", "save_every")})
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    for name, lo, hi in (("min_lr_ratio", 0.0, 1.0), ("ema_rate", 0.0, 1.0), ("label_drop_prob", 0.0, 1.0),
                         ("dropout", 0.0, 0.99), ("mask_ratio_min", 0.01, 1.0)):
        if not lo <= getattr(args, name) <= hi:
            raise ValueError(f"--{name} must be in [{lo}, {hi}], got {getattr(args, name)}")
    for name in ("warmup_steps", "weight_decay", "grad_clip"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.mask_buckets < 0:
        raise ValueError(f"--mask_buckets must be >= 0 (0 = off), got {args.mask_buckets}")
    if args.save_every_minutes is not None and not args.save_every_minutes > 0:
        raise ValueError(f"--save_every_minutes must be > 0, got {args.save_every_minutes}")
    if args.compile == "step" and not args.mask_buckets:
        raise ValueError("--compile step needs --mask_buckets N (a few static shapes instead of one per step); "
                         "use --compile blocks for the continuous mask ratio")
    if args.cuda_graph:
        if not torch.cuda.is_available():
            raise ValueError("--cuda_graph needs a CUDA GPU and this machine has none; drop the flag here "
                             "(--compile step works on CPU)")
        if args.compile != "step":
            raise ValueError("--cuda_graph replays the compiled step: add --compile step --mask_buckets N")
    settings = set(vars(args)) - set(RESUME_EXEMPT) | {"world_size", "all"}
    unknown = sorted({a.strip() for a in args.allow_changed.split(",") if a.strip()} - settings)
    if unknown:
        raise ValueError(f"--allow_changed: {unknown} are not run settings (exempt flags may always change: "
                         f"{sorted(RESUME_EXEMPT)})")
    if not Path(args.tokenizer).is_file():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file; the shipped one is "
                                f"pretrained_models/demo/tokenizer.pt (or train one: python -m demo.tokenizer)")
    if args.init_from and not Path(args.init_from).is_file():
        raise FileNotFoundError(f"--init_from {args.init_from}: no such file (an exported mar.pt or a "
                                f"checkpoint-last.pth of train.py)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    t_launch = time.perf_counter()  # --time_limit counts from here
    out_dir = Path(args.output_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    if args.export:
        export(ckpt_path, args.export, args.export_dtype)
        return {}
    check_args(args)

    torch.set_num_threads(args.threads)
    rank, world, device = init_distributed()  # this rank's GPU if there is one (util.distributed)
    distributed = world > 1
    main_proc = rank == 0
    # The settings check comes before any work: a refused resume must not encode data or build models.
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.is_file() else None
    requested_precision = args.precision
    args.precision, why = run_precision(args.precision, device, ck)  # recorded resolved, never "auto"
    settings = run_settings(args, world)
    changes = check_resume_settings(ck.get("settings"), settings, args.allow_changed, ckpt_path) if ck else {}

    from demo.dataset import NUM_CLASSES
    from demo.latents import load_or_build_latents
    if main_proc:
        data = load_or_build_latents(args.tokenizer, args.num_per_class, args.data_seed, args.cache_dir,
                                     device=device, style=args.data_style)
    barrier()
    if not main_proc:
        data = load_or_build_latents(args.tokenizer, args.num_per_class, args.data_seed, args.cache_dir,
                                     style=args.data_style)
    # The cached posteriors live on the device for the whole run: batches are gathered there by index.
    mean, std, labels = data["mean"].to(device), data["std"].to(device), data["labels"].to(device)
    scale = float(data["latent_scale"])
    n, c, h, _ = mean.shape
    image_size = int(data["image_size"])
    config = model_config(args, c, image_size, image_size // h, NUM_CLASSES)

    torch.manual_seed(args.seed)
    model = mar_from_config(config)
    if args.pos_init == "sincos":
        init_mar_pos_embed_sincos(model)
    model = model.to(device)
    model.diffloss.high_t_fraction = args.high_t_fraction
    if args.init_from and ck is None:
        init_weights(model, args.init_from, config, data["tokenizer_sha"])
        if main_proc:
            print(f"starting from the EMA weights of {args.init_from}")
    ema = ParamEMA(model, args.ema_rate, warmup=args.ema_warmup)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "pos_embed" in name or "token" in name or "fake_latent" in name
         else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")  # one kernel for all parameters on GPU

    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n} images over {world} processes give no batch of {args.batch_size}")
    total_steps = steps_per_epoch * args.epochs
    step = 0
    log_path = out_dir / "log.jsonl"
    setting_changes: list[dict[str, Any]] = []
    execution = execution_info(args.threads, device)
    execution_changes: list[dict[str, Any]] = []
    if main_proc and requested_precision == AUTO:
        print(f"--precision auto -> {args.precision} ({why})")
    if ck is not None:
        if ck.get("tokenizer_sha") != data["tokenizer_sha"] or dict(ck["config"]) != config:
            raise CheckpointError(
                f"{ckpt_path} was trained with another tokenizer or model config; use a fresh "
                f"--output_dir (or delete it) to start over")
        model.load_state_dict(ck["model"])
        # The averaged weights are stored once, as model_ema (older checkpoints repeat them in ema_state).
        ema.load_state_dict(dict(ck["ema_state"], shadow=ck["ema_state"].get("shadow", ck["model_ema"])))
        opt.load_state_dict(ck["optimizer"])
        for g in opt.param_groups:  # the saved groups carry the device choice of the run that saved them
            g["fused"] = device.type == "cuda"
        step = int(ck["step"])
        _set_rng_state(ck["rng"])
        setting_changes = list(ck.get("setting_changes", []))
        execution_changes = list(ck.get("execution_changes", []))
        before = ck.get("execution") or {}
        moved = {k: [before.get(k), v] for k, v in execution.items() if before.get(k) != v}
        if moved and before:  # same run, other kernels or split: bit-for-bit identity ends at this step
            execution_changes.append(dict(step=step, changes=moved))
        if changes or ck.get("settings") is None:  # let through by --allow_changed: said and recorded
            setting_changes.append(dict(step=step, changes={k: list(v) for k, v in changes.items()},
                                        unrecorded_before=ck.get("settings") is None))
        if main_proc:
            print(f"resumed from {ckpt_path} at step {step} (epoch {ck['epoch']})")
            for k, (old, new) in changes.items():
                print(f"changed by --allow_changed at step {step}: {_flag(k)} {old!r} -> {new!r}")
            if ck.get("settings") is None:
                print(f"{ckpt_path} recorded no run settings (older train.py); resumed by --allow_changed all")
            if moved and before:
                listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in moved.items())
                print(f"resumed with other execution ({listed}): the same run, but float sums round differently "
                      f"from step {step} on, so the losses match an uninterrupted run to float rounding, not bit "
                      f"for bit (recorded in execution_changes)")
            _truncate_log(log_path, step)
        del ck  # its tensors are in the model and optimizer now
    out_dir.mkdir(parents=True, exist_ok=True)
    barrier()

    n_params = sum(p.numel() for p in model.parameters())
    if main_proc:
        print(f"MAR {n_params / 1e6:.2f}M params; {n} latents {tuple(mean.shape[1:])}, scale {scale:.4f}; "
              f"{steps_per_epoch} steps/epoch x {args.epochs} epochs = {total_steps} steps; world {world}")
    # The module a step calls: MAR.forward, or the static-shape step around the same parameters.
    bucketed = BucketedMaskStep(model, args.mask_buckets) if args.mask_buckets else None
    if main_proc and bucketed is not None:
        print(f"--mask_buckets {args.mask_buckets}: masked-token counts {bucketed.counts} of {model.seq_len}")
    if args.compile == "blocks":
        compile_for_training(model)
    train_model: nn.Module = bucketed if bucketed is not None else model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile == "step":
        train_model = compile_step(train_model, args.mask_buckets, args.cuda_graph)

    last_save = time.perf_counter()

    def save(epoch: int) -> None:
        nonlocal last_save
        last_save = time.perf_counter()
        if not main_proc:
            return
        ema_state = {k: v for k, v in ema.full_state().items() if k != "shadow"}  # shadow = model_ema
        atomic_save(dict(model=model.state_dict(), model_ema=ema.state_dict(), ema_state=ema_state,
                         optimizer=opt.state_dict(), step=step, epoch=epoch, config=config, args=vars(args),
                         settings=settings, setting_changes=setting_changes, execution=execution,
                         execution_changes=execution_changes, rng=_rng_state(),
                         latent_scale=scale, tokenizer_sha=data["tokenizer_sha"], data_style=args.data_style,
                         n_params=n_params), ckpt_path)

    progress = None
    if main_proc and not args.no_progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    t_start = time.perf_counter()
    losses: list[float] = []
    pending: list[tuple[int, int, float, float, torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        """Write the pending steps to the log in one device sync, then check them for NaN/inf.

        Why batched: reading a loss (``float(loss)``) waits for the GPU to finish the step, so a
        read every step stops the host from queueing the next step's kernels while the GPU works;
        the small demo model is launch-bound, so that wait is a large share of each step.
        """
        if not pending:
            return
        vals = torch.stack([torch.stack([lo.float(), gn.float()]) for *_, lo, gn in pending])
        if distributed:
            dist.all_reduce(vals)
            vals /= world
        vals = vals.tolist()
        if main_proc:
            with open(log_path, "a") as f:
                for (st, ep, lr_, t, _, _), (lo, gn) in zip(pending, vals):
                    f.write(json.dumps(dict(step=st, epoch=ep, loss=lo, lr=lr_, grad_norm=gn, time=t)) + "\n")
            if progress is not None:
                progress.set_postfix(epoch=pending[-1][1], loss=f"{vals[-1][0]:.4f}", lr=f"{pending[-1][2]:.2e}")
        for (st, *_), (lo, _) in zip(pending, vals):
            losses.append(lo)
            if not math.isfinite(lo):
                raise FloatingPointError(f"loss is {lo} at step {st}")
        pending.clear()

    stopped = False
    model.train()
    while step < total_steps and not stopped:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.long, device=device)
        for i in range(step - epoch * steps_per_epoch, steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            torch.manual_seed(step_seed(args.seed, step, rank))
            x = posterior_sample(mean[idx], std[idx], scale)
            y = labels[idx]
            lr = lr_at(step, total_steps, args)
            for g in opt.param_groups:
                g["lr"] = lr
            if args.cuda_graph:  # a new iteration: the graphs' output buffers of the last one may be reused
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, args.precision):
                if bucketed is None:
                    loss = train_model(x, y)
                else:  # the draws of MAR.forward, in its order: token orders, then the mask ratio
                    orders = bucketed.draw_orders(x.shape[0], device)
                    loss = train_model(x, y, orders, bucketed.draw_num_masked())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                     if args.grad_clip > 0 else torch.zeros((), device=device))
            opt.step()
            ema.update(model)
            step += 1
            # Clones: a CUDA graph overwrites its outputs on the next replay, and these are read later.
            pending.append((step, epoch, lr, time.perf_counter() - t_start, loss.detach().clone(),
                            gnorm.detach().clone()))
            if progress is not None:
                progress.update(1)
            end_of_epoch = i == steps_per_epoch - 1
            will_save = step % args.save_every == 0 or end_of_epoch or step == total_steps
            stop_now = args.stop_after is not None and step >= args.stop_after
            timed = args.time_limit is not None or args.save_every_minutes is not None
            if timed and (not distributed or will_save or step % args.log_every == 0):
                now = time.perf_counter()
                clocks = [args.time_limit is not None and now - t_launch > 60 * args.time_limit,
                          args.save_every_minutes is not None and now - last_save > 60 * args.save_every_minutes]
                if distributed:  # every rank must stop and save at the same step
                    flags = torch.tensor([float(c) for c in clocks], device=device)
                    dist.all_reduce(flags)
                    clocks = (flags > 0).tolist()
                stop_now = stop_now or clocks[0]
                will_save = will_save or clocks[1]
            if will_save or stop_now or step % args.log_every == 0:
                flush()  # before saving: a checkpoint never holds a step whose loss was not finite
            if will_save or stop_now:
                save(epoch + 1 if end_of_epoch else epoch)
            if stop_now:
                stopped = True
                break
    flush()
    if progress is not None:
        progress.close()
    barrier()
    shutdown()
    if main_proc:
        print(f"done: step {step}/{total_steps} in {time.perf_counter() - t_start:.0f}s this run")
    return dict(step=step, losses=losses, checkpoint=str(ckpt_path), n_params=n_params)


if __name__ == "__main__":
    from util import cli
    cli.run(main, get_args_parser().parse_args())
