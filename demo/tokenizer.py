"""Demo tokenizer: a small KL autoencoder (``models.vae.AutoencoderKL``) for the shapes dataset.

``DEMO_VAE_CONFIG`` maps a 32x32 image to a 4x16x16 latent (stride 2). The demo MAR takes every
latent position as a token (``patch_size=1``): 256 tokens of 4 dims, as many as the released models
have, so the 64-step schedules of the acceleration methods behave as on ImageNet. Stride 2 with 4
channels keeps the finest classes (ring periods of 2.5-4 px) that a stride-4 latent loses; the
measurements behind these choices are in demo/TRAINING.md ("Tokenizer").
The architecture is tiny (``ch=32``, one residual block per level, ~0.7M parameters) and GroupNorm
uses 8 groups (see :data:`DEMO_NORM_GROUPS`).

Training objective: ``L1 + L2`` reconstruction (per element) plus ``kl_weight * KL / (#pixel values)``
(a small KL, as the LDM/MAR tokenizers, keeps the latent smooth and bounded). After training, the
latent scale (``1 / std`` of posterior samples over training images) is measured and stored, so MAR
trains on unit-variance latents ``posterior.sample() * latent_scale`` (0.2325 plays that role for KL-16).

CLI::

    python -m demo.tokenizer --out pretrained_models/demo/tokenizer.pt

writes ``{'model': state_dict, 'config': DEMO_VAE_CONFIG, 'latent_scale': float, 'recon_psnr': float}``.
Training is deterministic given ``--seed`` (data order and init from torch RNG) and resumes from its
own training-state file ``<out>.train.pth`` at epoch boundaries.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.vae import AutoencoderKL
from util.checkpoint import atomic_save
from util.lr import warmup_cosine

DEMO_IMAGE_SIZE = 32  # demo resolution (see the module docstring and demo/TRAINING.md)
DEMO_VAE_CONFIG: dict[str, Any] = dict(embed_dim=4, ch_mult=(1, 2), ch=32, num_res_blocks=1, resolution=32)
# GroupNorm groups of the demo tokenizer. ``models.vae``'s 32 groups at ch=32 are one channel per group
# (instance norm), which erases each image's global colour; 8 groups keep it. Build the demo tokenizer
# with :func:`build_demo_vae` / :func:`load_demo_tokenizer` (which apply this), not
# ``AutoencoderKL(**DEMO_VAE_CONFIG)``.
DEMO_NORM_GROUPS = 8


def build_demo_vae(config: dict[str, Any] | None = None) -> AutoencoderKL:
    """An (untrained) demo tokenizer for ``config`` (default :data:`DEMO_VAE_CONFIG`)."""
    cfg = dict(DEMO_VAE_CONFIG if config is None else config)
    cfg["ch_mult"] = tuple(cfg["ch_mult"])
    groups = int(cfg.pop("norm_groups", DEMO_NORM_GROUPS))
    embed_dim, ch_mult = cfg.pop("embed_dim"), cfg.pop("ch_mult")
    vae = AutoencoderKL(embed_dim, ch_mult, **cfg)
    for m in vae.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.num_groups = groups
    return vae


def _plain_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def load_demo_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu"
                        ) -> tuple[AutoencoderKL, float]:
    """Load a tokenizer written by this module: ``(vae in eval mode, latent_scale)``."""
    from util.checkpoint import CheckpointError, read_checkpoint
    ckpt = read_checkpoint(path)
    for key in ("model", "config", "latent_scale"):
        if key not in ckpt:
            raise CheckpointError(f"{path} has no '{key}' entry (it holds {sorted(ckpt)}); expected a demo "
                                  f"tokenizer written by `python -m demo.tokenizer`")
    vae = build_demo_vae(ckpt["config"])
    vae.load_state_dict(ckpt["model"], strict=True)
    return vae.to(device).eval(), float(ckpt["latent_scale"])


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) between two uint8 image batches."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * math.log10(255.0 ** 2 / max(mse, 1e-10)))


@torch.no_grad()
def measure_psnr(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 100) -> float:
    """Reconstruction PSNR (posterior mean, decoded, quantised to uint8) on uint8 NHWC images."""
    from demo.dataset import to_model_input, to_uint8
    vae.eval()
    recs = []
    for i in range(0, len(images), batch_size):
        x = to_model_input(images[i:i + batch_size])
        recs.append(to_uint8(vae.decode(vae.encode(x).mean)))
    return psnr_uint8(np.concatenate(recs), images)


@torch.no_grad()
def measure_latent_scale(vae: AutoencoderKL, images: np.ndarray, seed: int = 0, batch_size: int = 100) -> float:
    """``1 / std`` of posterior samples over ``images`` (all channels and positions pooled)."""
    from demo.dataset import to_model_input
    vae.eval()
    gen = torch.Generator().manual_seed(seed)
    s, s2, n = 0.0, 0.0, 0
    for i in range(0, len(images), batch_size):
        z = vae.encode(to_model_input(images[i:i + batch_size])).sample(gen).double()
        s += z.sum().item()
        s2 += (z * z).sum().item()
        n += z.numel()
    mean = s / n
    std = math.sqrt(max(s2 / n - mean * mean, 1e-12))
    return float(1.0 / std)


def tokenizer_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    rec, post = vae(x)
    l1 = (rec - x).abs().mean()
    l2 = (rec - x).pow(2).mean()
    kl = post.kl().mean() / x[0].numel()
    loss = l1 + l2 + kl_weight * kl
    return loss, dict(l1=l1.item(), l2=l2.item(), kl=kl.item())


def train_tokenizer(out: str | os.PathLike, *, num_per_class: int = 800, seed: int = 0, epochs: int = 5,
                    batch_size: int = 16, lr: float = 2e-3, warmup_steps: int = 100, kl_weight: float = 1e-4,
                    weight_decay: float = 0.0, psnr_images: int = 600, max_steps: int | None = None,
                    progress: bool = True, save_final: bool = True,
                    image_size: int = DEMO_IMAGE_SIZE, init_from: str | os.PathLike | None = None,
                    norm_groups: int = DEMO_NORM_GROUPS, logvar_init: float | None = -6.0) -> dict[str, Any]:
    """Train the demo tokenizer and write the final checkpoint to ``out``.

    Args:
        out: final checkpoint path; the resumable training state lives at ``<out>.train.pth``.
        num_per_class: training images per class (training split, :data:`demo.dataset.TRAIN_SEED`).
        seed: torch seed (init and per-epoch data order ``seed * 1000 + epoch``).
        epochs, batch_size, lr, warmup_steps, kl_weight, weight_decay: optimisation (AdamW, cosine decay).
        norm_groups: GroupNorm groups (stored in the checkpoint's config).
        init_from: initial weights (a tokenizer checkpoint), when not resuming.
        logvar_init: initial bias of the posterior log-variance channels of ``quant_conv`` (``None``
            keeps PyTorch's init, i.e. std ~ 1). With the tiny KL weight the decoder otherwise spends its
            first thousand steps seeing mostly noise; -6 (std 0.05) starts near-deterministic.
        psnr_images: held-out images (:data:`demo.dataset.HELDOUT_SEED`) for the reported PSNR.
        max_steps: stop after this many steps in total (tests); the final checkpoint is still written.
        save_final: write the final checkpoint (measures the latent scale and PSNR).

    Returns:
        A summary dict (losses, latent_scale, recon_psnr, seconds).
    """
    from demo.dataset import HELDOUT_SEED, NUM_CLASSES, TRAIN_SEED, make_split, to_model_input
    from util.cli import check_positive
    check_positive(epochs=epochs, num_per_class=num_per_class, batch_size=batch_size,
                   psnr_images=psnr_images)  # an untrained tokenizer must never overwrite the shipped one
    if max_steps is not None:
        check_positive(max_steps=max_steps)
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    out = Path(out)
    state_path = out.with_name(out.name + ".train.pth")
    t0 = time.perf_counter()
    images, _ = make_split(num_per_class, TRAIN_SEED, size=image_size)
    n = len(images)
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch_size {batch_size} is larger than the {n} training images")
    total_steps = steps_per_epoch * epochs

    torch.manual_seed(seed)
    vae = build_demo_vae(dict(DEMO_VAE_CONFIG, norm_groups=norm_groups))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    start_epoch, step, history = 0, 0, []
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start_epoch, step, history = st["epoch"], st["step"], list(st["history"])
        print(f"resumed tokenizer training from {state_path} at epoch {start_epoch}, step {step}")
    elif init_from is not None:
        vae.load_state_dict(torch.load(init_from, map_location="cpu", weights_only=True)["model"])
        print(f"initialised from {init_from}")
    elif logvar_init is not None:
        with torch.no_grad():
            vae.quant_conv.bias[vae.embed_dim:].fill_(float(logvar_init))

    stop = False
    for epoch in range(start_epoch, epochs):
        vae.train()
        torch.manual_seed(seed * 1000 + epoch)  # data order and posterior noise: a function of (seed, epoch)
        perm = torch.randperm(n)
        bar = tqdm(range(steps_per_epoch), desc=f"tokenizer epoch {epoch}", disable=not progress)
        for i in bar:
            idx = perm[i * batch_size:(i + 1) * batch_size].numpy()
            x = to_model_input(images[idx])
            for g in opt.param_groups:
                g["lr"] = warmup_cosine(step, total_steps, lr, warmup_steps, floor=0.1)
            loss, parts = tokenizer_loss(vae, x, kl_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            history.append(float(loss.item()))
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", l1=f"{parts['l1']:.4f}", kl=f"{parts['kl']:.2f}")
            if max_steps is not None and step >= max_steps:
                stop = True
                break
        if not stop:
            atomic_save(dict(model=vae.state_dict(), optimizer=opt.state_dict(), epoch=epoch + 1, step=step,
                             history=history), state_path)
        if stop:
            break

    summary: dict[str, Any] = dict(steps=step, losses=history, train_seconds=time.perf_counter() - t0)
    if save_final:
        vae.eval()
        scale_images = images[: min(n, 2400)]
        latent_scale = measure_latent_scale(vae, scale_images, seed=seed)
        held, _ = make_split(max(1, psnr_images // NUM_CLASSES), HELDOUT_SEED, size=image_size)
        psnr = measure_psnr(vae, held)
        atomic_save(dict(model=vae.state_dict(), config=dict(_plain_config(DEMO_VAE_CONFIG), norm_groups=norm_groups),
                         latent_scale=latent_scale, recon_psnr=psnr, image_size=image_size), out)
        summary.update(latent_scale=latent_scale, recon_psnr=psnr)
        print(f"wrote {out}: latent_scale {latent_scale:.4f}, held-out PSNR {psnr:.2f} dB "
              f"({len(held)} images), {time.perf_counter() - t0:.0f}s total")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="pretrained_models/demo/tokenizer.pt")
    p.add_argument("--num_per_class", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--kl_weight", type=float, default=1e-4)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--norm_groups", type=int, default=DEMO_NORM_GROUPS)
    p.add_argument("--logvar_init", type=float, default=-6.0, help="initial posterior log-variance bias")
    p.add_argument("--init_from", default=None, help="start from the weights of this tokenizer checkpoint")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_tokenizer(args.out, num_per_class=args.num_per_class, seed=args.seed, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                    kl_weight=args.kl_weight, max_steps=args.max_steps, init_from=args.init_from,
                    norm_groups=args.norm_groups, logvar_init=args.logvar_init)


if __name__ == "__main__":
    from util import cli
    cli.run(main)
