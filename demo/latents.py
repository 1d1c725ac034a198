"""Encode a demo dataset split once with the tokenizer and cache the posterior (mean, std).

The cache file is keyed by the tokenizer file's SHA-256 and the dataset parameters (num_per_class,
seed, image size), so changing any of them builds a new cache and an unchanged setup reuses it.
Training draws ``latent_scale * (mean + std * randn)`` afresh at every step (the VAE posterior
sample MAR trains on, :func:`util.latents.draw_latents`), from torch's RNG. No flips (shapes such as
the arrow and the letter are not flip-invariant classes of the same kind, and the released recipe's
flip is not needed here).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from demo.dataset import DEFAULT_STYLE, make_split, shape_style, to_model_input
from demo.tokenizer import load_demo_tokenizer
from util.checkpoint import atomic_save, read_checkpoint
from util.hashing import file_sha256

DEFAULT_CACHE_DIR = Path("output/latent_cache")  # git-ignored


def cache_path(tokenizer_sha: str, num_per_class: int, seed: int, image_size: int,
               cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, style: str = DEFAULT_STYLE) -> Path:
    shape_style(style)  # a known name: the file name must say which images it holds
    tag = "" if style == DEFAULT_STYLE else f"_{style}"  # the varied style keeps the earlier file names
    return Path(cache_dir) / f"latents_{tokenizer_sha[:16]}_n{num_per_class}_s{seed}_px{image_size}{tag}.pt"


@torch.no_grad()
def encode_split(vae: torch.nn.Module, num_per_class: int, seed: int, image_size: int,
                 batch_size: int = 200, style: str = DEFAULT_STYLE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) float32 (N, C, h, w) and labels int64 (N,) of a demo split."""
    images, labels = make_split(num_per_class, seed, size=image_size, style=style)
    vae.eval()
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        x = to_model_input(images[i:i + batch_size]).to(next(vae.parameters()).device)
        post = vae.encode(x)
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds), torch.from_numpy(labels)


def load_or_build_latents(tokenizer_path: str | os.PathLike, num_per_class: int, seed: int,
                          cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, verbose: bool = True,
                          device: str | torch.device = "cpu", style: str = DEFAULT_STYLE) -> dict[str, Any]:
    """The cached latents of a split in a data ``style`` (:data:`demo.dataset.STYLES`), building the
    cache on first use (encoding on ``device``).

    Returns:
        ``{'mean', 'std', 'labels', 'latent_scale', 'tokenizer_sha', 'image_size', 'num_per_class',
        'seed', 'style', 'path', 'built'}`` (``built`` is True when this call encoded the data).
    """
    sha = file_sha256(tokenizer_path)
    ckpt = read_checkpoint(tokenizer_path)
    image_size = int(ckpt.get("image_size", 64))
    path = cache_path(sha, num_per_class, seed, image_size, cache_dir, style)
    if path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("tokenizer_sha") == sha and data.get("style", DEFAULT_STYLE) == style:
            data.update(path=str(path), built=False)
            return data
    t0 = time.perf_counter()
    vae, scale = load_demo_tokenizer(tokenizer_path, device)
    mean, std, labels = encode_split(vae, num_per_class, seed, image_size, style=style)
    data = dict(mean=mean, std=std, labels=labels, latent_scale=float(scale), tokenizer_sha=sha,
                image_size=image_size, num_per_class=int(num_per_class), seed=int(seed), style=style)
    atomic_save(data, path)
    if verbose:
        print(f"encoded {len(labels)} images into {path} in {time.perf_counter() - t0:.1f}s")
    data.update(path=str(path), built=True)
    return data
