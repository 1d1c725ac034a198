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
* ``run_name`` encodes every setting that changes the images (see :func:`run_name`): a changed sampler
  setting, seed, batch size, precision or preset definition gets a NEW folder.
* A resume is the same run or nothing: a new run folder gets ``run.json`` (:func:`run_identity`: weight
  file digests, settings, preset definition, seed rule, sampling-code digest, library versions, device).
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
* What the metrics need is loaded on rank 0 before the weights and before any image (:func:`prepare_metrics`):
  the FID statistics or reference folder, and the Inception network (``--inception_weights FILE``, else
  torch-fidelity's download into the torch.hub cache), which then computes the metrics; for the demo model,
  its classifier. A missing or unusable file ends the run in one ``error:`` line saying how to provide it,
  in seconds rather than after hours of sampling. ``--no_metrics`` loads none of it.
* The progress bar counts images (rate and ETA); the last line and ``timing.images_per_second`` give each
  process's rate: images it generated / wall seconds of its generation loop (warm-up and PNG writing included).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import PIL
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from lazymar.config import PRESETS
from models.schedules import check_sampling_settings
from demo.registry import DEMO_MODEL, demo_path  # also registers the demo model with util.loading
from util.checkpoint import CheckpointError, atomic_path
from util.generate import SEED_RULE, SamplingSettings, generate_batches
from util.generate import num_batches as batch_count
from util.hashing import cached_file_sha256, state_dict_sha256
from util.compile import add_compile_args, apply_compile, compile_mode
from util.loading import Generator, load_generator, model_choices
from util.precision import PRECISIONS

INCEPTION_NAME = "inception-v3-compat"
FID_LAYER = "2048"
ISC_LAYER = "logits_unbiased"
FID_DIM = 2048
DEFAULT_FID_STATS = Path("fid_stats/adm_in256_stats.npz")
DIST_TIMEOUT_MIN = 30
# tqdm's default bar, but always in img/s (tqdm flips to s/img below 1 img/s, which reads as another unit).
PROGRESS_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
ERROR_DETAIL_CHARS = 300  # of a library's exception text quoted in a one-line error
TMP_MARK = ".tmp-"
IDENTITY_FILE = "run.json"  # in the run folder: what made its images (see run_identity)
DIGEST_CACHE = "sha256_cache.json"  # in --output_dir: checkpoint digests (util.hashing.cached_file_sha256)
ROOT = Path(__file__).resolve().parent
# The sources whose edits can change the images; their digest is part of a run's identity. This script is
# one of them (class labels, the folder layout, PNG writing), and so is how weights are read. Benchmarks
# and reports under these folders cannot change an image, so editing them does not refuse a resume.
IMAGE_CODE = ("eval.py", "models", "lazymar", "util/generate.py", "util/loading.py", "util/checkpoint.py",
              "util/precision.py", "util/compile.py", "demo/registry.py", "demo/tokenizer.py")
NOT_IMAGE_CODE = frozenset({"lazymar/bench.py", "lazymar/throughput.py", "lazymar/throughput_report.py",
                            "lazymar/flops.py"})


# ------------------------------------------------------------------------------------------- args
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mar_huge", choices=model_choices())
    p.add_argument("--num_images", type=int, default=50000)
    p.add_argument("--eval_bsz", type=int, default=64, help="images per global batch (per process)")
    p.add_argument("--num_iter", type=int, default=64, help="MAR steps")
    p.add_argument("--cfg", type=float, default=3.25)
    p.add_argument("--cfg_schedule", default="linear", choices=["linear", "constant"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--num_sampling_steps", type=int, default=100, help="diffusion steps of the head")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="autocast sampling and decoding (weights stay float32; see docs/REPRODUCING.md on "
                        "upstream's fp16 autocast); part of the output folder name unless fp32")
    p.add_argument("--lazy_mar", action="store_true", help="same as --accel lazymar")
    p.add_argument("--accel", default=None, choices=sorted(PRESETS), help="acceleration preset")
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


def sampling_settings(args: argparse.Namespace, accel: str | None) -> SamplingSettings:
    return SamplingSettings(num_iter=args.num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                            temperature=args.temperature, accel=accel, precision=args.precision)


def accel_name(args: argparse.Namespace) -> str | None:
    if args.lazy_mar and args.accel not in (None, "lazymar"):
        raise SystemExit(f"--lazy_mar conflicts with --accel {args.accel}")
    return "lazymar" if args.lazy_mar else args.accel


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _fmt(x: float) -> str:
    return f"{x:g}"


def run_name(args: argparse.Namespace, device: torch.device) -> str:
    """Subfolder name: every setting that changes the images.

    ``<model>[-ckpt<hash>][-raw]-it<num_iter>-cfg<cfg>-<schedule>-temp<T>-ds<diffusion steps>[-<precision>]-<accel>[-<cfg hash>]
    -bsz<eval_bsz>-<device type>-seed<seed>-n<num_images>``; ``accel`` is ``base`` without acceleration, else the
    preset name plus a hash of the preset's config ``repr`` (so editing a preset changes the folder).
    """
    accel = accel_name(args)
    parts = [args.model]
    if args.ckpt is not None or args.vae_path is not None:
        parts.append("ckpt" + _short_hash(f"{Path(args.ckpt).resolve() if args.ckpt else ''}|"
                                          f"{Path(args.vae_path).resolve() if args.vae_path else ''}", 6))
    if args.no_ema:
        parts.append("raw")
    parts += [f"it{args.num_iter}", f"cfg{_fmt(args.cfg)}", args.cfg_schedule, f"temp{_fmt(args.temperature)}",
              f"ds{args.num_sampling_steps}"]
    if args.precision != "fp32":  # fp32 is the default and gets no name part
        parts.append(args.precision)
    if args.compile or args.cuda_graph:  # compiled arithmetic rounds differently: another run
        parts.append("cudagraph" if args.cuda_graph else "compiled")
    parts.append("base" if accel is None else f"{accel}-{_short_hash(repr(PRESETS[accel]))}")
    parts += [f"bsz{args.eval_bsz}", device.type, f"seed{args.seed}", f"n{args.num_images}"]
    return "-".join(parts)


def index_width(num_images: int) -> int:
    return max(6, len(str(max(num_images - 1, 0))))


def class_labels(num_images: int, num_classes: int) -> np.ndarray:
    """Image ``i`` gets class ``i % num_classes``."""
    return np.arange(num_images, dtype=np.int64) % num_classes


# ------------------------------------------------------------------------------------- run identity
def code_sha256(root: Path = ROOT, sources: tuple[str, ...] = IMAGE_CODE,
                exclude: frozenset[str] = NOT_IMAGE_CODE) -> str:
    """Digest of the Python files under ``sources`` but not in ``exclude`` (relative paths and contents)."""
    h = hashlib.sha256()
    for source in sources:
        files = sorted((root / source).rglob("*.py")) if (root / source).is_dir() else [root / source]
        for f in files:
            name = f.relative_to(root).as_posix()
            if name not in exclude:
                h.update(f"{name}\0".encode() + f.read_bytes() + b"\0")
    return h.hexdigest()


def run_identity(args: argparse.Namespace, accel: str | None, gen: Generator, device: torch.device,
                 num_classes: int) -> dict[str, Any]:
    """Everything that makes a run's images what they are, as JSON values.

    The weights by content (each file's SHA-256, cached in ``<output_dir>/sha256_cache.json`` by path,
    size, mtime, inode and ctime, so a resume does not re-read GBs; in-memory weights by their tensors), the sampler
    settings, the preset's full definition, the seed rule, the sampling code and library versions, and
    the device. Two runs with equal identities write byte-identical images on the same machine.
    """
    cache = Path(args.output_dir) / DIGEST_CACHE
    weights = {f"{role}_sha256": cached_file_sha256(path, cache) for role, path in sorted(gen.files.items())}
    if not weights:
        weights = {"weights_sha256": state_dict_sha256(gen.mar, gen.vae)}
    return {
        "model": args.model, **weights, "ema": not args.no_ema, "latent_scale": gen.latent_scale,
        "num_iter": args.num_iter, "cfg": args.cfg, "cfg_schedule": args.cfg_schedule,
        "temperature": args.temperature, "num_sampling_steps": gen.mar.diffloss.num_sampling_steps,
        "precision": args.precision, "compile": compile_mode(args, device), "accel": accel,
        "accel_config": repr(PRESETS[accel]) if accel else None,
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


# ------------------------------------------------------------------------------------ distributed
def init_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=DIST_TIMEOUT_MIN),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return rank, world, device


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _raise_everywhere(problem: BaseException | None, world: int) -> None:
    """Raise rank 0's ``problem`` (if any) on every rank, so that none waits at a collective for a rank that stopped."""
    if world > 1:
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise problem


# ---------------------------------------------------------------------------------------- writing
def _save_png(image: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def _remove_stale_tmp(folder: Path) -> int:
    n = 0
    for name in os.listdir(folder):
        if TMP_MARK in name:
            (folder / name).unlink(missing_ok=True)
            n += 1
    return n


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------- metrics
def load_fid_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` (2048,) and ``sigma`` (2048, 2048) from an ``.npz``, with a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--fid_stats {path}: no such file (MAR's ADM statistics live in the MAR "
                                f"repository under fid_stats/adm_in256_stats.npz)")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:  # zip/format errors of all kinds
        raise ValueError(f"--fid_stats {path} is not a readable .npz file ({type(e).__name__}: {e})") from e
    missing = [k for k in ("mu", "sigma") if k not in data]
    if missing:
        raise ValueError(f"--fid_stats {path} lacks {missing}; it holds {sorted(data)}. Expected 'mu' "
                         f"({FID_DIM},) and 'sigma' ({FID_DIM}, {FID_DIM}) of Inception pool features.")
    mu, sigma = data["mu"], data["sigma"]
    if mu.shape != (FID_DIM,) or sigma.shape != (FID_DIM, FID_DIM):
        raise ValueError(f"--fid_stats {path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected "
                         f"({FID_DIM},) and ({FID_DIM}, {FID_DIM}) (Inception-v3 2048-d pool features)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"--fid_stats {path} contains non-finite values")
    return mu.astype(np.float64), sigma.astype(np.float64)


def _one_line(err: BaseException) -> str:
    """``err`` as ``Type: text`` on one line, shortened: for quoting a library's error in our own message."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= ERROR_DETAIL_CHARS else text[:ERROR_DETAIL_CHARS - 3] + "..."


@dataclass(frozen=True)
class MetricInputs:
    """What rank 0's metrics need besides the images, loaded before sampling by :func:`prepare_metrics`.

    A missing or unusable file then stops the run in seconds instead of after hours of sampling, and nothing
    is loaded twice: the Inception network built here is the one that computes the metrics.
    """
    inception: torch.nn.Module | None = None  # torch-fidelity's inception-v3-compat, on the CPU until the metrics
    fid_stats_path: Path | None = None
    fid_stats: tuple[np.ndarray, np.ndarray] | None = None  # (mu, sigma) read from fid_stats_path
    fid_ref_dir: Path | None = None  # a checked folder of reference images (instead of fid_stats)
    demo_classifier: Path | None = None  # the demo model's metrics network (demo.fidelity loads it itself)
    # The demo FID's real images are rendered as the model generates (its resolution and data style): filled in
    # once the model is loaded.
    demo_reference: dict[str, Any] = field(default_factory=dict)


def inception_download() -> tuple[str, Path]:
    """torch-fidelity's Inception-v3 weights URL, and where torch.hub caches that download (under $TORCH_HOME).

    Read from the installed torch-fidelity, so that the error messages name the file it actually wants.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    return URL_INCEPTION_V3, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(URL_INCEPTION_V3).path).name


def load_inception(weights: str | Path | None, verbose: bool = False) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 (``inception-v3-compat``, FID and IS layers) on the CPU.

    From ``weights`` when given; else from torch-fidelity's download, fetched now into the torch.hub cache (where
    torch-fidelity would put it itself) unless it is there already. It stays on the CPU during sampling so that the
    reported peak GPU memory is the sampler's alone.

    Raises:
        CheckpointError: one line saying how to provide the weights, when the file is missing, unreadable, not
            Inception-v3 weights, or cannot be downloaded (an offline machine).
    """
    from torch_fidelity.utils import create_feature_extractor
    url, cached = inception_download()
    advice = (f"download {url} on a machine with internet and pass it as --inception_weights FILE, or copy it to "
              f"{cached} (torch-fidelity's download cache, under $TORCH_HOME), or pass --no_metrics")
    if weights is not None:
        path, source = Path(weights), f"--inception_weights {weights}"
        if not path.is_file():
            raise CheckpointError(f"{source}: no such file; {advice}")
    else:
        path, source = cached, f"{cached} (torch-fidelity's cached download; delete it to download again)"
        if not path.is_file():
            print(f"downloading torch-fidelity's Inception-v3 weights: {url} -> {cached}", flush=True)
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(cached), progress=verbose)
            except Exception as e:  # offline, proxy, HTTP error, unwritable cache: all end the same way
                raise CheckpointError(f"cannot download torch-fidelity's Inception-v3 weights for IS/FID "
                                      f"({_one_line(e)}); {advice}") from e
    try:
        return create_feature_extractor(INCEPTION_NAME, [FID_LAYER, ISC_LAYER], cuda=False, verbose=verbose,
                                        feature_extractor_weights_path=str(path))
    except Exception as e:  # unpickling, zip, truncation and state-dict key errors of all kinds
        raise CheckpointError(f"{source} is not usable as torch-fidelity's Inception-v3 weights ({_one_line(e)}); "
                              f"{advice}") from e


def check_fid_ref_dir(path: str | Path) -> Path:
    """``path`` if it is a folder with images torch-fidelity will read (its defaults: not recursive, png/jpg/jpeg)."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.utils import glob_samples_paths
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--fid_ref_dir {path}: no such folder (give a folder of reference images, or "
                                f"--fid_stats FILE.npz)")
    if not glob_samples_paths(str(path), DEFAULTS["samples_find_deep"], DEFAULTS["samples_find_ext"], verbose=False):
        raise ValueError(f"--fid_ref_dir {path} holds no {DEFAULTS['samples_find_ext']} files directly inside "
                         f"(subfolders are not searched)")
    return path


def check_demo_classifier(path: Path) -> Path:
    """``path`` if it holds a loadable demo classifier (the demo model's metrics network), else a one-line error.

    Loading the small classifier once more costs milliseconds; :func:`demo.fidelity.demo_metrics` loads it itself.
    """
    from demo.classifier import TRAIN_COMMAND, load_classifier
    advice = f"train it with `{TRAIN_COMMAND}` (minutes on a CPU), or pass --no_metrics"
    if not path.is_file():
        raise CheckpointError(f"the demo model's metrics need the demo classifier {path}, which does not exist: "
                              f"{advice}")
    try:
        load_classifier(path)
    except Exception as e:  # unpickling, zip and state-dict errors
        raise CheckpointError(f"demo classifier {path} cannot be loaded ({_one_line(e)}): {advice}") from e
    return path


def prepare_metrics(args: argparse.Namespace) -> MetricInputs:
    """Check and load what the metrics of ``args.model`` will use, before any sampling.

    The demo model is scored by :func:`demo.fidelity.demo_metrics` with its own classifier, so only that file is
    checked; an ImageNet model gets its FID reference (``--fid_stats``, else ``--fid_ref_dir``, else
    ``fid_stats/adm_in256_stats.npz`` if present, else IS only) and the Inception network (:func:`load_inception`).
    """
    if args.model == DEMO_MODEL:
        return MetricInputs(demo_classifier=check_demo_classifier(demo_path("classifier")))
    stats_path = Path(args.fid_stats) if args.fid_stats is not None else None
    ref_dir = check_fid_ref_dir(args.fid_ref_dir) if args.fid_ref_dir is not None else None
    if stats_path is None and ref_dir is None:
        if DEFAULT_FID_STATS.is_file():
            stats_path = DEFAULT_FID_STATS
        else:
            print(f"warning: no --fid_stats / --fid_ref_dir (and no {DEFAULT_FID_STATS}); computing IS only")
    stats = load_fid_stats(stats_path) if stats_path is not None else None
    return MetricInputs(inception=load_inception(args.inception_weights), fid_stats_path=stats_path,
                        fid_stats=stats, fid_ref_dir=ref_dir)


def inception_metrics(image_dir: Path, inputs: MetricInputs, *, device: torch.device, batch_size: int,
                      isc_splits: int, verbose: bool = False) -> dict[str, Any]:
    """IS and FID with torch-fidelity's Inception-v3 (as in MAR's evaluation), using ``inputs.inception``.

    Features come from torch-fidelity's own loader; IS is its ``isc_featuresdict_to_metric`` and FID its
    ``fid_statistics_to_metric``, against the ``--fid_stats`` mu/sigma or the statistics of the ``--fid_ref_dir``
    images (read as ``torch_fidelity.calculate_metrics`` reads a folder, so the numbers are that function's).
    """
    import torch_fidelity
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.utils import extract_featuresdict_from_input_id, get_featuresdict_from_dataset

    from demo.fidelity import IndexedPNGFolder

    if inputs.inception is None:
        raise TypeError("inception_metrics needs MetricInputs.inception (see prepare_metrics)")
    cuda = device.type == "cuda"
    fe = inputs.inception.to(device)
    samples = IndexedPNGFolder(image_dir)
    feats = get_featuresdict_from_dataset(samples, fe, batch_size, cuda, True, verbose)  # True: no workers
    isc = isc_featuresdict_to_metric(feats, ISC_LAYER, isc_splits=isc_splits, samples_shuffle=True,
                                     rng_seed=2020, verbose=verbose)
    out: dict[str, Any] = {"num_samples": len(samples),
                           "inception_score": float(isc[torch_fidelity.KEY_METRIC_ISC_MEAN]),
                           "inception_score_std": float(isc[torch_fidelity.KEY_METRIC_ISC_STD])}
    if inputs.fid_stats is not None:
        ours = {k: v.astype(np.float64) for k, v in fid_features_to_statistics(feats[FID_LAYER]).items()}
        ref = {"mu": inputs.fid_stats[0], "sigma": inputs.fid_stats[1]}
        out.update(fid=float(fid_statistics_to_metric(ours, ref, verbose)[torch_fidelity.KEY_METRIC_FID]),
                   fid_reference=str(inputs.fid_stats_path))
    elif inputs.fid_ref_dir is not None:
        ref_feats = extract_featuresdict_from_input_id(2, fe, input2=str(inputs.fid_ref_dir), batch_size=batch_size,
                                                       cuda=cuda, save_cpu_ram=True, verbose=verbose)
        fid = fid_statistics_to_metric(fid_features_to_statistics(feats[FID_LAYER]),
                                       fid_features_to_statistics(ref_feats[FID_LAYER]), verbose)
        out.update(fid=float(fid[torch_fidelity.KEY_METRIC_FID]), fid_reference=str(inputs.fid_ref_dir))
    return out


# ------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    accel = accel_name(args)
    if args.num_images < 1 or args.eval_bsz < 1:
        raise SystemExit("--num_images and --eval_bsz must be >= 1")
    check_sampling_settings(args.num_iter, args.cfg, args.cfg_schedule, args.temperature)  # before loading
    if args.fid_stats is not None and args.fid_ref_dir is not None:
        raise SystemExit("give --fid_stats or --fid_ref_dir, not both")
    rank, world, device = init_distributed(args.device)
    try:
        return _run(args, accel, rank, world, device)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, accel: str | None, rank: int, world: int,
         device: torch.device) -> dict[str, Any]:
    sampling_compile = compile_mode(args, device)  # a bad --cuda_graph fails before anything loads
    # Metric files first, before the weights and the run folder: fail before hours of sampling, not after.
    metric_inputs: MetricInputs | None = None
    problem: BaseException | None = None
    if rank == 0 and not args.no_metrics:
        try:
            metric_inputs = prepare_metrics(args)
        except Exception as e:  # every rank must stop, not wait for rank 0 at a collective
            problem = e
    _raise_everywhere(problem, world)

    gen = load_generator(args.model, ckpt=args.ckpt, vae_path=args.vae_path, use_ema=not args.no_ema,
                         device=device, num_sampling_steps=args.num_sampling_steps)
    mar = gen.mar
    if metric_inputs is not None and metric_inputs.demo_classifier is not None:
        metric_inputs.demo_reference = dict(reference_size=mar.img_size,
                                            reference_style=getattr(mar, "data_style", "varied"))
    apply_compile(mar, sampling_compile)
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
            identity = run_identity(args, accel, gen, device, num_classes)
            claim_run_dir(run_dir, identity)
        except Exception as e:  # every rank must stop, not wait for rank 0 at a barrier
            problem = e
        if problem is None:
            stale = _remove_stale_tmp(image_dir)
            if stale:
                print(f"removed {stale} partial files from an interrupted run")
    _raise_everywhere(problem, world)

    width = index_width(args.num_images)
    num_batches = batch_count(args.num_images, args.eval_bsz)
    mine = list(range(rank, num_batches, world))
    existing = set(os.listdir(image_dir))

    def paths(b: int) -> list[Path]:
        return [image_dir / f"{i:0{width}d}.png" for i in range(b * args.eval_bsz,
                                                                 min((b + 1) * args.eval_bsz, args.num_images))]

    todo = [b for b in mine if not all(p.name in existing for p in paths(b))]
    if rank == 0:
        print(f"{run_dir}: {num_batches} batches of {args.eval_bsz}, {world} process(es); "
              f"{len(mine) - len(todo)} of rank 0's {len(mine)} batches already done")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    timed_images, sample_s, total_s, generated = 0, 0.0, 0.0, 0
    now = todo if args.stop_after_batches is None else todo[:args.stop_after_batches]
    # Counted in images, so that the bar's rate and ETA read in images whatever the batch size.
    bar = tqdm(total=sum(len(paths(b)) for b in now), unit="img", desc="sampling", bar_format=PROGRESS_FORMAT,
               disable=rank != 0)
    start = time.perf_counter()
    for k, batch in enumerate(generate_batches(gen, labels_all, sampling_settings(args, accel), seed=args.seed,
                                               batch_size=args.eval_bsz, batches=now)):
        if k > 0:  # the first batch of each process is warm-up
            timed_images += len(batch.images)
            sample_s += batch.sample_s
            total_s += batch.total_s
        for img, p in zip(batch.images, paths(batch.index)):
            _save_png(img, p)
        generated += len(batch.images)
        bar.update(len(batch.images))
    wall_s = time.perf_counter() - start
    bar.close()
    if len(now) < len(todo):
        print(f"rank {rank}: stopping after {len(now)} batches (--stop_after_batches)", flush=True)
        sys.exit(3)

    timing = {"images_generated": generated, "images_timed": timed_images, "sample_s": sample_s,
              "sample_vae_s": total_s, "wall_s": wall_s,
              "images_per_second": generated / wall_s if generated else None,
              "peak_memory_bytes": _peak_memory_bytes(device),
              "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process RSS peak"}
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, timing)
    else:
        gathered = [timing]
    _barrier()
    if rank != 0:
        return {}

    missing = [i for i in range(args.num_images) if not (image_dir / f"{i:0{width}d}.png").is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} images missing after generation (e.g. {missing[:5]})")
    result: dict[str, Any] = {
        "settings": {**{k: v for k, v in vars(args).items() if k != "stop_after_batches"}, "accel": accel,
                     "accel_config": repr(PRESETS[accel]) if accel else None, "world_size": world,
                     "device": str(device), "device_name": (torch.cuda.get_device_name(device)
                                                          if device.type == "cuda" else "cpu"),
                     "run_dir": str(run_dir), "image_name": f"<index zero-padded to {width}>.png",
                     "labels": "image i has class i % num_classes", "num_classes": num_classes},
        "identity": identity,
        "timing": _summarize_timing(gathered, args.eval_bsz),
        "flops": _flops(gen, args, accel),
    }
    if metric_inputs is not None:
        result["metrics"] = _metrics(args, metric_inputs, image_dir, labels_all, device)
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    print(format_table(result))
    print(f"wrote {run_dir / 'metrics.json'}")
    print(rate_line(result["timing"]))
    return result


def _summarize_timing(per_rank: list[dict[str, Any]], eval_bsz: int) -> dict[str, Any]:
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


def _flops(gen, args: argparse.Namespace, accel: str | None) -> dict[str, Any]:
    from lazymar.flops import estimate
    rep = estimate(gen.mar, num_iter=args.num_iter, cfg=args.cfg, accel=accel, bsz=args.eval_bsz, vae=gen.vae)
    out = {"per_image": rep.total, "per_image_with_vae": rep.total_with_vae,
           "components": {k: float(v) for k, v in rep.components.items()}}
    if accel is not None:
        base = estimate(gen.mar, num_iter=args.num_iter, cfg=args.cfg, accel=None, bsz=args.eval_bsz)
        out["baseline_per_image"] = base.total
        out["speedup_vs_baseline"] = base.total / rep.total
    return out


def _metrics(args: argparse.Namespace, inputs: MetricInputs, image_dir: Path, labels_all: np.ndarray,
             device: torch.device) -> dict[str, Any]:
    if inputs.demo_classifier is not None:
        from demo.fidelity import demo_metrics
        return demo_metrics(image_dir, inputs.demo_classifier, labels=labels_all, batch_size=args.metrics_bsz,
                            device=device, isc_splits=args.isc_splits, **inputs.demo_reference)
    return inception_metrics(image_dir, inputs, device=device, batch_size=args.metrics_bsz,
                             isc_splits=args.isc_splits)


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
    if "speedup_vs_baseline" in f:
        rows.append(("FLOPs reduction", f"{f['speedup_vs_baseline']:.2f}x"))
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


if __name__ == "__main__":
    from util import cli
    cli.run(main, build_parser().parse_args())
