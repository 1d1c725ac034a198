"""Seeded class-conditional generation: the one loop behind eval.py, sample.py and the demo tables.

Batch ``b`` of a run holds images ``[b * batch_size, (b + 1) * batch_size)`` and draws all its
randomness (orders, diffusion noise) from ``torch.Generator(device).manual_seed(batch_seed(seed, b))``.
An image therefore depends on the seed, the batch size and its index, not on which other batches run,
in which order or in which process: a run can be split over processes or resumed batch by batch.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from util.loading import SAMPLING_KEYS, Generator, model_choices, sampling_defaults
from util.precision import autocast
from util.timing import synchronize

SEED_RULE = "sha256('lazymar-eval:{seed}:{batch}')[:8] little-endian >> 1"  # recorded with results


@dataclass(frozen=True)
class SamplingSettings:
    """Everything besides the model, labels and seed that changes the sampled images.

    Attributes:
        num_iter: MAR steps.
        cfg: classifier-free guidance scale (at the end of the linear schedule).
        cfg_schedule: ``'linear'`` or ``'constant'``.
        temperature: scale of the diffusion head's injected noise (orders are uniform permutations, never tempered).
        accel: acceleration preset name or config; ``None`` is plain MAR.
        precision: autocast for sampling and decoding (``util.precision.PRECISIONS``).
    """

    num_iter: int
    cfg: float
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    accel: Any = None
    precision: str = "fp32"


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """``--num_iter``, ``--cfg``, ``--cfg_schedule``, ``--temperature``; a flag left out takes the model's
    default (:func:`sampling_flags`), which the help lists per model."""
    def by_model(key: str) -> str:
        groups: dict[Any, list[str]] = {}
        for model in model_choices():
            groups.setdefault(sampling_defaults(model)[key], []).append(model)
        return "None: the --model's default: " + ", ".join(f"{v} ({', '.join(ms)})" for v, ms in groups.items())

    parser.add_argument("--num_iter", type=int, default=None, help=f"MAR steps; {by_model('num_iter')}")
    parser.add_argument("--cfg", type=float, default=None, help=f"guidance scale; {by_model('cfg')}")
    parser.add_argument("--cfg_schedule", default=None, choices=["linear", "constant"], help=by_model("cfg_schedule"))
    parser.add_argument("--temperature", type=float, default=None, help=by_model("temperature"))


def sampling_flags(model: str, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sampling settings of :func:`add_sampling_args`' flags: ``model``'s defaults
    (:func:`util.loading.sampling_defaults`) overridden by the flags given; and the defaults it used (the
    settings no flag gave), to be recorded beside the results."""
    settings = sampling_defaults(model)
    given = {k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k, None) is not None}
    return settings | given, {k: v for k, v in settings.items() if k not in given}


@dataclass(frozen=True)
class GeneratedBatch:
    """One global batch: its index, the global index of its first image, the images and its timing."""

    index: int
    start: int
    images: np.ndarray  # (B, H, W, 3) uint8
    tokens: np.ndarray  # (B, C, h, w) float32: the sampled latent tokens the images decode
    sample_s: float  # sampling only, synchronized
    total_s: float  # sampling + decoding to uint8 on the CPU


def batch_seed(seed: int, batch: int) -> int:
    """The seed of global batch ``batch``: a hash of (seed, batch), 63 bits."""
    return int.from_bytes(hashlib.sha256(f"lazymar-eval:{seed}:{batch}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def decode_images(gen: Generator, tokens: torch.Tensor) -> np.ndarray:
    """Decode MAR tokens (B, C, h, w) to uint8 images (B, H, W, 3), as upstream MAR saves them.

    Raises ``FloatingPointError`` on non-finite tokens rather than writing black images that would
    silently enter a FID (fp16 autocast can overflow in an untrained or unusual model).
    """
    if not torch.isfinite(tokens).all():
        raise FloatingPointError("sampling produced non-finite tokens; with --precision fp16 the products can "
                                 "overflow: use bf16 or fp32")
    vae_dtype = next(gen.vae.parameters()).dtype
    images = gen.vae.decode(tokens.to(vae_dtype) / gen.latent_scale)
    images = ((images.float().clamp(-1, 1) + 1) / 2 * 255).round()
    return images.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def num_batches(num_images: int, batch_size: int) -> int:
    return math.ceil(num_images / batch_size)


def generate_batches(gen: Generator, labels: torch.Tensor | np.ndarray, settings: SamplingSettings, *,
                     seed: int, batch_size: int, batches: Iterable[int] | None = None) -> Iterator[GeneratedBatch]:
    """Generate the global batches ``batches`` (default: all, in order) of images with class ``labels``.

    Args:
        gen: the model, on the device to sample on.
        labels: class of every image of the run (N,); batch ``b`` takes its slice.
        settings: the sampler settings.
        seed: run seed; batch ``b`` uses :func:`batch_seed` ``(seed, b)``.
        batch_size: images per global batch (the last one may be smaller).
        batches: which batch indices to generate, e.g. one process's share or the ones not yet on disk.
    """
    device = next(gen.mar.parameters()).device
    labels = torch.as_tensor(labels)
    for b in range(num_batches(len(labels), batch_size)) if batches is None else batches:
        start = b * batch_size
        batch_labels = labels[start:start + batch_size].to(device)  # (B,)
        g = torch.Generator(device).manual_seed(batch_seed(seed, b))
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(device, settings.precision):
            tokens = gen.mar.sample_tokens(len(batch_labels), num_iter=settings.num_iter, cfg=settings.cfg,
                                           cfg_schedule=settings.cfg_schedule, labels=batch_labels,
                                           temperature=settings.temperature, generator=g, accel=settings.accel)
            synchronize(device)
            t1 = time.perf_counter()
            images = decode_images(gen, tokens)  # ends with a copy to the CPU (synchronizes)
        total_s = time.perf_counter() - t0
        yield GeneratedBatch(b, start, images, tokens.float().cpu().numpy(), t1 - t0, total_s)


@dataclass(frozen=True)
class GeneratedSet:
    """Every batch of a run put together: images (N, H, W, 3) uint8, their tokens (N, C, h, w) float32, and
    seconds per image (sampling and decoding) excluding the first batch, the warm-up (NaN when there is
    only one batch)."""

    images: np.ndarray
    tokens: np.ndarray
    seconds_per_image: float


def generate_set(gen: Generator, labels: torch.Tensor | np.ndarray, settings: SamplingSettings, *,
                 seed: int, batch_size: int, progress: Any = None) -> GeneratedSet:
    """All batches of :func:`generate_batches` as one :class:`GeneratedSet`.

    Args:
        progress: optional tqdm-like bar, advanced by one per batch.
    """
    images, tokens, timed_s, timed_n = [], [], 0.0, 0
    for batch in generate_batches(gen, labels, settings, seed=seed, batch_size=batch_size):
        images.append(batch.images)
        tokens.append(batch.tokens)
        if batch.index > 0:
            timed_s += batch.total_s
            timed_n += len(batch.images)
        if progress is not None:
            progress.update(1)
    return GeneratedSet(np.concatenate(images), np.concatenate(tokens), timed_s / timed_n if timed_n else float("nan"))


def generate_images(gen: Generator, labels: torch.Tensor | np.ndarray, settings: SamplingSettings, *,
                    seed: int, batch_size: int, progress: Any = None) -> tuple[np.ndarray, float]:
    """The images and seconds per image of :func:`generate_set`."""
    out = generate_set(gen, labels, settings, seed=seed, batch_size=batch_size, progress=progress)
    return out.images, out.seconds_per_image
