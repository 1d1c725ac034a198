"""What a run of eval.py is and where it writes: its folder name, its identity record, its images.

Everything here can change an image or the folder it lands in, so this module is part of the code
digest of a run (:data:`IMAGE_CODE`): a resumed run must have been made by the same code.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image

from lazymar.cspd import definition
from lazymar.names import CSPD_PRESETS, check_draft_flags
from lazymar.planned import check_planned_model, plan_origin
from util.checkpoint import atomic_path
from util.compile import compile_mode
from util.generate import SEED_RULE, sampling_flags
from util.hashing import cached_file_sha256, source_sha256, state_dict_sha256
from util.loading import Generator

TMP_MARK = ".tmp-"
IDENTITY_FILE = "run.json"  # in the run folder: what made its images (see run_identity)
DIGEST_CACHE = "sha256_cache.json"  # in --output_dir: checkpoint digests (util.hashing.cached_file_sha256)
ROOT = Path(__file__).resolve().parents[1]
# The sources whose edits can change the images; their digest is part of a run's identity: eval.py and this
# module (class labels, the folder layout, PNG writing), the sampler, and how weights are read. The FLOPs
# count under these folders cannot change an image, so editing it does not refuse a resume; the metrics and
# the benchmarks live elsewhere.
IMAGE_CODE = ("eval.py", "evaluation/run.py", "models", "lazymar", "util/generate.py", "util/loading.py",
              "util/checkpoint.py", "util/precision.py", "util/compile.py", "demo/registry.py", "demo/tokenizer.py")
NOT_IMAGE_CODE = frozenset({"lazymar/flops.py", "lazymar/search_space.py"})


def accel_name(args: argparse.Namespace) -> str | None:
    """The preset the flags ask for (``--lazy_mar`` is ``--accel lazymar``), None for plain MAR; a CSpD
    preset must come with ``--draft_model`` and ``--draft_model`` / ``--draft_ckpt`` with a CSpD preset."""
    if args.lazy_mar and args.accel not in (None, "lazymar"):
        raise SystemExit(f"--lazy_mar conflicts with --accel {args.accel}")
    accel = "lazymar" if args.lazy_mar else args.accel
    if args.draft_ckpt is not None and args.draft_model is None:
        raise ValueError("--draft_ckpt needs --draft_model (the model whose weights it holds)")
    check_draft_flags(accel, args.draft_model)
    check_planned_model(accel, args.model, other_model=args.plan_from_other_model)
    return accel


def accel_definition(args: argparse.Namespace, accel: str | None) -> str | None:
    """The acceleration's full definition as text (recorded, and hashed into the folder name):
    :func:`lazymar.cspd.definition`, None for plain MAR."""
    return None if accel is None else definition(accel)


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _fmt(x: float) -> str:
    return f"{x:g}"


def run_name(args: argparse.Namespace, device: torch.device) -> str:
    """Subfolder name: every setting that changes the images.

    ``<model>[-ckpt<hash>][-raw]-it<num_iter>-cfg<cfg>-<schedule>-temp<T>-ds<diffusion steps>[-<precision>]-<accel>[-<cfg hash>]
    -bsz<eval_bsz>-<device type>-seed<seed>-n<num_images>``; ``accel`` is ``base`` for plain MAR (the name of
    every earlier run's folder), else the preset name plus a hash of the preset's config ``repr`` (so editing
    a preset changes the folder); for CSpD the preset name, the draft model (with a hash of its
    ``--draft_ckpt`` path) and the hash of :func:`accel_definition`.
    """
    accel = accel_name(args)
    sampling, _ = sampling_flags(args.model, args)  # flags left out: the model's defaults, as eval.py fills them
    parts = [args.model]
    if args.ckpt is not None or args.vae_path is not None:
        parts.append("ckpt" + _short_hash(f"{Path(args.ckpt).resolve() if args.ckpt else ''}|"
                                          f"{Path(args.vae_path).resolve() if args.vae_path else ''}", 6))
    if args.no_ema:
        parts.append("raw")
    parts += [f"it{sampling['num_iter']}", f"cfg{_fmt(sampling['cfg'])}", sampling["cfg_schedule"],
              f"temp{_fmt(sampling['temperature'])}", f"ds{args.num_sampling_steps}"]
    if args.precision != "fp32":  # fp32 is the default and gets no name part
        parts.append(args.precision)
    if args.compile or args.cuda_graph:  # compiled arithmetic rounds differently: another run
        parts.append("cudagraph" if args.cuda_graph else "compiled")
    if accel in CSPD_PRESETS:
        parts += [accel, args.draft_model]
        if args.draft_ckpt is not None:
            parts.append("ckpt" + _short_hash(str(Path(args.draft_ckpt).resolve()), 6))
    elif accel is not None:
        parts.append(accel)
    parts.append("base" if accel is None else _short_hash(accel_definition(args, accel)))
    parts += [f"bsz{args.eval_bsz}", device.type, f"seed{args.seed}", f"n{args.num_images}"]
    return "-".join(parts)


def index_width(num_images: int) -> int:
    return max(6, len(str(max(num_images - 1, 0))))


def class_labels(num_images: int, num_classes: int) -> np.ndarray:
    """Image ``i`` gets class ``i % num_classes``."""
    return np.arange(num_images, dtype=np.int64) % num_classes


def code_sha256(root: Path = ROOT, sources: tuple[str, ...] = IMAGE_CODE,
                exclude: frozenset[str] = NOT_IMAGE_CODE) -> str:
    """Digest of the sampling code (:func:`util.hashing.source_sha256` of ``sources`` less ``exclude``)."""
    return source_sha256(root, sources, exclude)


def run_identity(args: argparse.Namespace, accel: str | None, gen: Generator, device: torch.device,
                 num_classes: int, draft: Generator | None = None) -> dict[str, Any]:
    """Everything that makes a run's images what they are, as JSON values.

    The weights by content (each file's SHA-256, cached in ``<output_dir>/sha256_cache.json`` by path,
    size, mtime, inode and ctime, so a resume does not re-read GBs; in-memory weights by their tensors), the sampler
    settings, the preset's full definition, the seed rule, the sampling code and library versions, and
    the device. Two runs with equal identities write byte-identical images on the same machine.
    With speculative decoding, the draft model (``draft``) too: its name and its MAR weights' digest
    (``draft_mar_sha256``; its VAE decodes nothing), so a resume with another draft is refused.
    """
    cache = Path(args.output_dir) / DIGEST_CACHE
    weights = {f"{role}_sha256": cached_file_sha256(path, cache) for role, path in sorted(gen.files.items())}
    if not weights:
        weights = {"weights_sha256": state_dict_sha256(gen.mar, gen.vae)}
    if draft is not None:
        weights["draft_model"] = args.draft_model
        weights["draft_mar_sha256"] = (cached_file_sha256(draft.files["mar"], cache) if "mar" in draft.files
                                       else state_dict_sha256(draft.mar))
    return {
        "model": args.model, **weights, "ema": not args.no_ema, "latent_scale": gen.latent_scale,
        "num_iter": args.num_iter, "cfg": args.cfg, "cfg_schedule": args.cfg_schedule,
        "temperature": args.temperature, "num_sampling_steps": gen.mar.diffloss.num_sampling_steps,
        "precision": args.precision, "compile": compile_mode(args, device), "accel": accel,
        "accel_config": accel_definition(args, accel),
        # A planned preset used on a model it was not chosen on (--plan_from_other_model): what it was chosen on.
        "plan_from_other_model": (plan_origin(accel) if args.plan_from_other_model and accel is not None
                                  else None),
        "seed": args.seed, "seed_rule": SEED_RULE, "eval_bsz": args.eval_bsz, "num_images": args.num_images,
        "labels": f"image i has class i % {num_classes}",
        "device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "code_sha256": code_sha256(), "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "pillow": PIL.__version__,
    }


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text[:13] + "..." if len(text) > 16 else text


def claim_run_dir(run_dir: Path, identity: dict[str, Any]) -> None:
    """Record ``identity`` in a new run folder, or check that an existing one was made by the same.

    Raises ``ValueError`` (one line, naming what differs) when the folder holds images of another setup
    or images without a record (written before records existed): they would mix into one FID.
    """
    path, identity = run_dir / IDENTITY_FILE, json.loads(json.dumps(identity))
    advice = "use another --output_dir, or delete the folder to start over"
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = [k for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k)]
        if diff:
            what = "; ".join(f"{k}: {_short(saved.get(k))} there, {_short(identity.get(k))} now" for k in diff)
            raise ValueError(f"{run_dir} holds images of another setup ({what}); resuming would mix them: {advice}")
        return
    if any(name.endswith(".png") for name in os.listdir(run_dir / "images")):
        raise ValueError(f"{run_dir} holds images but no {IDENTITY_FILE} recording what made them (an older "
                         f"eval.py); they cannot be proven to match this run: {advice}")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(identity, indent=2) + "\n")


def save_png(image: np.ndarray, path: Path) -> None:
    """Write ``image`` (H, W, 3) uint8 at ``path`` atomically (a kill leaves a temporary file, not a PNG)."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def remove_stale_tmp(folder: Path) -> int:
    """Delete the temporary files an interrupted run left in ``folder``; how many there were."""
    n = 0
    for name in os.listdir(folder):
        if TMP_MARK in name:
            (folder / name).unlink(missing_ok=True)
            n += 1
    return n
