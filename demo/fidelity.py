"""torch-fidelity integration of the demo classifier: "demo FID", demo IS and class accuracy.

Why: the project reports FID through torch-fidelity for the ImageNet models; the demo setting
should use the same code path (same Frechet-distance implementation, same input conventions) and
only swap the feature extractor. torch-fidelity 0.4.0 supports that through its registry:
:class:`FeatureExtractorDemoClassifier` subclasses ``torch_fidelity.FeatureExtractorBase`` and is
registered as ``lazymar-demo-classifier`` when this module is imported. It provides

* ``'features'``        - penultimate features (D=128), used for FID / KID / PRC;
* ``'logits_unbiased'`` - logits without the head bias (Inception convention), default for ISC;
* ``'logits'``          - the classifier's actual logits (with bias), used for class accuracy.

What torch-fidelity expects of an extractor, and why we disable its cache unless ``cache_root`` is
given (its key ignores the weights), is written up in docs/torch_fidelity.md.

Inputs for evaluation code: a folder of PNGs named ``<global_index>.png`` plus a label array indexed
by global index (see :class:`IndexedPNGFolder`), an in-memory uint8 array, or a torch Dataset.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
import torch_fidelity
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from demo.classifier import DEFAULT_CLASSIFIER_PATH, load_classifier
from demo.dataset import DEFAULT_SIZE, DEFAULT_STYLE, FLOOR_SEED, HELDOUT_SEED, make_split
from util.hashing import file_sha256

logger = logging.getLogger(__name__)

FEATURE_EXTRACTOR_NAME = "lazymar-demo-classifier"
FID_LAYER = "features"
ISC_LAYER = "logits_unbiased"
ACCURACY_LAYER = "logits"
DEFAULT_REFERENCE_PER_CLASS = 1000  # 12k held-out images: FID reference
DEFAULT_FLOOR_PER_CLASS = 1000

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------
# feature extractor
# ----------------------------------------------------------------------------------------------

class FeatureExtractorDemoClassifier(FeatureExtractorBase):
    """torch-fidelity feature extractor wrapping :class:`demo.classifier.DemoClassifier`.

    Args:
        name: registry name (``lazymar-demo-classifier``).
        features_list: requested subset of :meth:`get_provided_features_list`.
        feature_extractor_weights_path: classifier checkpoint; ``None`` means
            the shipped ``pretrained_models/demo/classifier.pt`` of this clone.
        feature_extractor_internal_dtype: ``'float32'`` (default) or ``'float64'``.
        **kwargs: the remaining ``calculate_metrics`` keywords (ignored).
    """

    def __init__(self, name: str, features_list: Sequence[str],
                 feature_extractor_weights_path: PathLike | None = None,
                 feature_extractor_internal_dtype: str | None = None, **kwargs: Any) -> None:
        super().__init__(name, list(features_list))
        vassert(feature_extractor_internal_dtype in (None, "float32", "float64"),
                "Only float32 and float64 internal dtypes are supported by the demo classifier")
        # NB: torch_fidelity.helpers.text_to_dtype maps 'float64' to torch.float32, so map it here.
        self.internal_dtype = torch.float64 if feature_extractor_internal_dtype == "float64" else torch.float32
        path = Path(feature_extractor_weights_path or DEFAULT_CLASSIFIER_PATH)
        self.weights_path = str(path)
        self.model = load_classifier(path).to(self.internal_dtype)
        ckpt_size = torch.load(path, map_location="cpu", weights_only=True)["config"].get("size", DEFAULT_SIZE)
        self.input_size = int(ckpt_size)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits_unbiased", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": ISC_LAYER, "fid": FID_LAYER, "kid": FID_LAYER, "prc": FID_LAYER}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False  # tiny CNN: compilation costs more than it saves

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, DEFAULT_SIZE, DEFAULT_SIZE, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        h = x.to(self.internal_dtype) / 127.5 - 1.0
        if h.shape[-2:] != (self.input_size, self.input_size):
            h = F.interpolate(h, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        feats = self.model.features(h)
        out = {"features": feats}
        if "logits_unbiased" in self.features_list:
            out["logits_unbiased"] = F.linear(feats, self.model.head.weight)
        if "logits" in self.features_list:
            out["logits"] = self.model.head(feats)
        return tuple(out[name].to(torch.float32) for name in self.features_list)


def register() -> None:
    """Register the extractor with torch-fidelity (idempotent; done on import of this module)."""
    if FEATURE_EXTRACTORS_REGISTRY.get(FEATURE_EXTRACTOR_NAME) is FeatureExtractorDemoClassifier:
        return
    if FEATURE_EXTRACTOR_NAME in FEATURE_EXTRACTORS_REGISTRY:  # module re-imported / reloaded
        FEATURE_EXTRACTORS_REGISTRY[FEATURE_EXTRACTOR_NAME] = FeatureExtractorDemoClassifier
        return
    torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR_NAME, FeatureExtractorDemoClassifier)


register()


# ----------------------------------------------------------------------------------------------
# datasets of uint8 (3, H, W) tensors, the input format torch-fidelity expects
# ----------------------------------------------------------------------------------------------

class Uint8ImageDataset(Dataset):
    """In-memory uint8 images as a torch-fidelity input.

    Args:
        images: uint8 array/tensor (N, H, W, 3) or (N, 3, H, W) (layout detected by the channel axis).
    """

    def __init__(self, images: np.ndarray | torch.Tensor) -> None:
        t = torch.as_tensor(images)
        if t.dtype != torch.uint8 or t.dim() != 4:
            raise TypeError(f"expected uint8 (N, H, W, 3) or (N, 3, H, W), got {t.dtype} {tuple(t.shape)}")
        if t.shape[-1] == 3 and t.shape[1] != 3:
            t = t.permute(0, 3, 1, 2)
        self.images = t.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class ShapesUint8Dataset(Uint8ImageDataset):
    """A procedural split (see :func:`demo.dataset.make_split`) as uint8 tensors, plus its labels.

    Args:
        num_per_class: images per class.
        seed: split seed (default :data:`demo.dataset.HELDOUT_SEED`, the FID reference).
        size: resolution.
        style: data style (:data:`demo.dataset.STYLES`).
    """

    def __init__(self, num_per_class: int, seed: int = HELDOUT_SEED, size: int = DEFAULT_SIZE,
                 style: str = DEFAULT_STYLE) -> None:
        images, labels = make_split(num_per_class, seed, size, style)
        super().__init__(images)
        self.labels = labels
        self.seed, self.num_per_class, self.size, self.style = seed, num_per_class, size, style


_INDEX_PNG = re.compile(r"^(\d+)\.png$")


class IndexedPNGFolder(Dataset):
    """A folder of ``<global_index>.png`` files, ordered by the integer index (not by file name).

    Files with other names are ignored. ``self.indices[j]`` is the global index of item ``j``;
    with a label array ``labels`` indexed by global index, item ``j`` was requested as
    ``labels[self.indices[j]]``.

    Args:
        folder: directory with the PNG files.
    """

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"sample folder not found: {self.folder}")
        found = []
        for name in os.listdir(self.folder):
            m = _INDEX_PNG.match(name)
            if m:
                found.append((int(m.group(1)), name))
        if not found:
            raise ValueError(f"no '<index>.png' files in {self.folder}")
        found.sort()
        self.indices = np.array([i for i, _ in found], dtype=np.int64)
        self.files = [self.folder / n for _, n in found]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, j: int) -> torch.Tensor:
        with Image.open(self.files[j]) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class _FirstItem(Dataset):
    """Adapts a dataset of ``(image, label, ...)`` tuples to return only the image."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.base[i][0]


def as_uint8_dataset(samples: PathLike | Dataset | np.ndarray | torch.Tensor) -> Dataset:
    """Normalise the accepted sample containers to a Dataset of uint8 (3, H, W) tensors.

    Args:
        samples: a folder of ``<index>.png``; a uint8 array/tensor (N, H, W, 3) or (N, 3, H, W);
            or a Dataset whose items are uint8 (3, H, W) tensors or tuples starting with one.
    """
    if isinstance(samples, (str, os.PathLike)):
        return IndexedPNGFolder(samples)
    if isinstance(samples, (np.ndarray, torch.Tensor)):
        return Uint8ImageDataset(samples)
    if isinstance(samples, Dataset):
        first = samples[0]
        if isinstance(first, (tuple, list)):
            samples, first = _FirstItem(samples), first[0]
        if not (torch.is_tensor(first) and first.dtype == torch.uint8 and first.dim() == 3 and first.shape[0] == 3):
            raise TypeError("dataset items must be uint8 (3, H, W) tensors (torch-fidelity's input format); "
                            f"got {type(first).__name__} {getattr(first, 'dtype', '')} {tuple(getattr(first, 'shape', ()))}")
        return samples
    raise TypeError(f"unsupported samples type {type(samples).__name__}")


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------

def _device_is_cuda(device: str | torch.device | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _check_classifier(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        load_classifier(path)  # raises FileNotFoundError with the training command
    return path


def extract_features(samples: PathLike | Dataset | np.ndarray | torch.Tensor,
                     classifier_path: PathLike = DEFAULT_CLASSIFIER_PATH,
                     layers: Sequence[str] = (FID_LAYER, ACCURACY_LAYER), batch_size: int = 256,
                     device: str | torch.device | None = None, verbose: bool = False) -> dict[str, np.ndarray]:
    """Features of ``samples`` from the registered extractor, via torch-fidelity's own loader.

    The outputs are exactly what ``calculate_metrics`` sees, in dataset order.

    Args:
        samples: anything :func:`as_uint8_dataset` accepts.
        classifier_path: demo classifier checkpoint.
        layers: subset of ``('features', 'logits_unbiased', 'logits')``.
        batch_size: images per forward pass.
        device: ``'cpu'`` / ``'cuda'``; default: cuda if available.
        verbose: torch-fidelity progress output.

    Returns:
        ``{layer: float32 array (N, dim)}``
    """
    dataset = as_uint8_dataset(samples)
    cuda = _device_is_cuda(device)
    fe = create_feature_extractor(FEATURE_EXTRACTOR_NAME, list(layers), cuda=cuda, verbose=verbose,
                                  feature_extractor_weights_path=str(_check_classifier(classifier_path)))
    out = get_featuresdict_from_dataset(dataset, fe, batch_size, cuda, True, verbose)  # True: no workers
    return {k: v.numpy() for k, v in out.items()}


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians, with ``scipy.linalg.sqrtm`` (pytorch-fid style).

    Independent of torch-fidelity's eigenvalue-based implementation; used to cross-check it.

    Args:
        mu1, sigma1: mean (D,) and covariance (D, D) of the first set.
        mu2, sigma2: mean and covariance of the second set.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features, as torch-fidelity computes them.

    Args:
        features: (N, D) array.
    """
    f = np.asarray(features)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label.

    Args:
        logits: (N, C) scores.
        labels: (N,) int labels.
    """
    labels = np.asarray(labels)
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} samples but {len(labels)} labels")
    if len(labels) == 0:
        return float("nan")
    return float((np.asarray(logits).argmax(axis=1) == labels).mean())


def reference_dataset(num_per_class: int = DEFAULT_REFERENCE_PER_CLASS, seed: int = HELDOUT_SEED,
                      size: int = DEFAULT_SIZE, style: str = DEFAULT_STYLE) -> ShapesUint8Dataset:
    """The real reference split of the demo FID (held-out, never used for training).

    Render it like the model's samples: at the generator's resolution (the classifier upsamples both the
    same way) and in the style it learned, or the distance measures the mismatch, not the generator.

    Args:
        num_per_class: images per class.
        seed: split seed (default :data:`demo.dataset.HELDOUT_SEED`).
        size: resolution.
        style: data style (:data:`demo.dataset.STYLES`).
    """
    return ShapesUint8Dataset(num_per_class, seed, size, style)


def demo_metrics(samples: PathLike | Dataset | np.ndarray | torch.Tensor,
                 classifier_path: PathLike = DEFAULT_CLASSIFIER_PATH,
                 labels: Sequence[int] | np.ndarray | None = None,
                 reference: PathLike | Dataset | np.ndarray | torch.Tensor | None = None,
                 reference_per_class: int = DEFAULT_REFERENCE_PER_CLASS,
                 batch_size: int = 256, device: str | torch.device | None = None,
                 compute_is: bool = True, isc_splits: int = 10,
                 cache_root: PathLike | None = None, verbose: bool = False,
                 reference_size: int = DEFAULT_SIZE, reference_style: str = DEFAULT_STYLE,
                 reference_cache_name: str | None = None) -> dict[str, Any]:
    """Demo FID (and IS) through ``torch_fidelity.calculate_metrics``, and class accuracy.

    Args:
        samples: generated images: a folder of ``<global_index>.png`` files, a uint8 array/tensor
            (N, H, W, 3) / (N, 3, H, W), or a Dataset of uint8 (3, H, W) tensors.
        classifier_path: demo classifier checkpoint (``feature_extractor_weights_path``).
        labels: requested class per sample, for ``class_accuracy``. For a folder it is indexed by the
            global index in the file name (``labels[i]`` for ``i.png``); otherwise by position.
        reference: real reference images (same kinds as ``samples``); default: the held-out split
            (:data:`demo.dataset.HELDOUT_SEED`) with ``reference_per_class`` images per class.
        reference_per_class: size of the default reference split.
        reference_size / reference_style: resolution and data style of the default reference split:
            those of the generator (see :func:`reference_dataset`).
        batch_size: images per forward pass.
        device: ``'cpu'`` / ``'cuda'``; default cuda when available.
        compute_is: also report ``demo_is`` (Inception-Score formula on the classifier's
            ``logits_unbiased``; at most the number of classes). Skipped for fewer than
            ``2 * isc_splits`` samples.
        isc_splits: torch-fidelity ``isc_splits``.
        cache_root: if given, torch-fidelity caches the features/statistics of the DEFAULT reference
            there (keyed by the classifier file hash and split parameters), and those of an explicit
            ``reference`` when ``reference_cache_name`` names it; otherwise nothing is cached.
        reference_cache_name: the cache name of an explicit ``reference``: the caller makes it say what the
            images are (split, size, style); the classifier file hash is added here.
        verbose: torch-fidelity's progress output.

    Returns:
        ``{'demo_fid', 'demo_is' (optional), 'class_accuracy' (if labels), 'num_samples',
        'num_reference'}``.
    """
    classifier_path = _check_classifier(classifier_path)
    sample_ds = as_uint8_dataset(samples)
    cuda = _device_is_cuda(device)

    kwargs: dict[str, Any] = dict(
        fid=True, feature_extractor=FEATURE_EXTRACTOR_NAME, feature_layer_fid=FID_LAYER,
        feature_extractor_weights_path=str(classifier_path), cuda=cuda, batch_size=batch_size,
        verbose=verbose, cache=False, save_cpu_ram=True,
    )
    if reference is None:
        ref_ds: Dataset = reference_dataset(reference_per_class, size=reference_size, style=reference_style)
        if cache_root is not None:
            kwargs.update(cache=True, cache_root=str(cache_root),
                          input2_cache_name=(f"lazymar-demo-heldout-s{HELDOUT_SEED}-n{reference_per_class}"
                                             f"-{reference_size}px-{reference_style}"
                                             f"-clf{file_sha256(classifier_path)[:12]}"))
    else:
        ref_ds = as_uint8_dataset(reference)
        if cache_root is not None and reference_cache_name is not None:
            kwargs.update(cache=True, cache_root=str(cache_root),
                          input2_cache_name=f"{reference_cache_name}-clf{file_sha256(classifier_path)[:12]}")
    do_is = compute_is and len(sample_ds) >= 2 * isc_splits
    if do_is:
        kwargs.update(isc=True, feature_layer_isc=ISC_LAYER, isc_splits=isc_splits)

    logger.info("demo metrics: %d samples vs %d reference images (classifier %s)", len(sample_ds),
                len(ref_ds), classifier_path)
    metrics = torch_fidelity.calculate_metrics(input1=sample_ds, input2=ref_ds, **kwargs)
    out: dict[str, Any] = {"demo_fid": float(metrics[torch_fidelity.KEY_METRIC_FID]),
                           "num_samples": len(sample_ds), "num_reference": len(ref_ds)}
    if do_is:
        out["demo_is"] = float(metrics[torch_fidelity.KEY_METRIC_ISC_MEAN])

    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if isinstance(sample_ds, IndexedPNGFolder):
            if sample_ds.indices.max() >= len(labels):
                raise ValueError(f"file index {sample_ds.indices.max()} has no label ({len(labels)} labels)")
            wanted = labels[sample_ds.indices]
        else:
            wanted = labels
        logits = extract_features(sample_ds, classifier_path, (ACCURACY_LAYER,), batch_size, device)[ACCURACY_LAYER]
        out["class_accuracy"] = class_accuracy(logits, wanted)
    logger.info("demo metrics: %s", {k: v for k, v in out.items()})
    return out


def demo_floor(classifier_path: PathLike = DEFAULT_CLASSIFIER_PATH,
               num_per_class: int = DEFAULT_FLOOR_PER_CLASS,
               reference_per_class: int = DEFAULT_REFERENCE_PER_CLASS, batch_size: int = 256,
               device: str | torch.device | None = None, cache_root: PathLike | None = None,
               verbose: bool = False, size: int = DEFAULT_SIZE, style: str = DEFAULT_STYLE) -> dict[str, Any]:
    """The best a generator can score: real held-out images measured like generated ones.

    Demo FID of a second real split (:data:`demo.dataset.FLOOR_SEED`) against the reference split,
    and the classifier's accuracy on it. Compare generated sets of the SAME size, since FID is
    biased upwards for small sets.

    Args:
        classifier_path: demo classifier checkpoint.
        num_per_class: size of the real "generated" stand-in per class.
        reference_per_class: size of the reference split per class.
        batch_size: images per forward pass.
        device: ``'cpu'`` / ``'cuda'``.
        cache_root: see :func:`demo_metrics`.
        verbose: torch-fidelity progress output.
        size / style: resolution and data style of both real splits (the generator's).

    Returns:
        ``{'demo_fid', 'demo_is', 'class_accuracy', 'num_samples', 'num_reference'}``.
    """
    floor = ShapesUint8Dataset(num_per_class, FLOOR_SEED, size, style)
    return demo_metrics(floor, classifier_path, labels=floor.labels, reference_per_class=reference_per_class,
                        batch_size=batch_size, device=device, cache_root=cache_root, verbose=verbose,
                        reference_size=size, reference_style=style)


__all__ = [
    "FEATURE_EXTRACTOR_NAME", "FeatureExtractorDemoClassifier", "register", "Uint8ImageDataset",
    "ShapesUint8Dataset", "IndexedPNGFolder", "as_uint8_dataset", "extract_features", "frechet_distance",
    "gaussian_stats", "class_accuracy", "reference_dataset", "demo_metrics", "demo_floor",
]
