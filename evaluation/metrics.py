"""The metrics of an eval.py run and what they need: FID statistics, torch-fidelity's Inception-v3, the
demo model's classifier. :func:`prepare_metrics` loads all of it before the first image, so that a
missing or unusable file stops a run in seconds, not after hours of sampling.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from demo.registry import DEMO_MODELS, demo_path
from util.checkpoint import CheckpointError

INCEPTION_NAME = "inception-v3-compat"
FID_LAYER = "2048"
ISC_LAYER = "logits_unbiased"
FID_DIM = 2048
DEFAULT_FID_STATS = Path("fid_stats/adm_in256_stats.npz")
ERROR_DETAIL_CHARS = 300  # of a library's exception text quoted in a one-line error


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


def one_line(err: BaseException) -> str:
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
                                      f"({one_line(e)}); {advice}") from e
    try:
        return create_feature_extractor(INCEPTION_NAME, [FID_LAYER, ISC_LAYER], cuda=False, verbose=verbose,
                                        feature_extractor_weights_path=str(path))
    except Exception as e:  # unpickling, zip, truncation and state-dict key errors of all kinds
        raise CheckpointError(f"{source} is not usable as torch-fidelity's Inception-v3 weights ({one_line(e)}); "
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
        raise CheckpointError(f"demo classifier {path} cannot be loaded ({one_line(e)}): {advice}") from e
    return path


def prepare_metrics(args: argparse.Namespace) -> MetricInputs:
    """Check and load what the metrics of ``args.model`` will use, before any sampling.

    The demo models (``demo`` and its draft ``demo_draft``) are scored by :func:`demo.fidelity.demo_metrics`
    with the demo classifier, so only that file is
    checked; an ImageNet model gets its FID reference (``--fid_stats``, else ``--fid_ref_dir``, else
    ``fid_stats/adm_in256_stats.npz`` if present, else IS only) and the Inception network (:func:`load_inception`).
    """
    if args.model in DEMO_MODELS:
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


def compute_metrics(args: argparse.Namespace, inputs: MetricInputs, image_dir: Path, labels_all: np.ndarray,
                    device: torch.device) -> dict[str, Any]:
    """The run's metrics: the demo model's (demo FID, IS, class accuracy) or IS and FID."""
    if inputs.demo_classifier is not None:
        from demo.fidelity import demo_metrics
        return demo_metrics(image_dir, inputs.demo_classifier, labels=labels_all, batch_size=args.metrics_bsz,
                            device=device, isc_splits=args.isc_splits, **inputs.demo_reference)
    return inception_metrics(image_dir, inputs, device=device, batch_size=args.metrics_bsz,
                             isc_splits=args.isc_splits)
