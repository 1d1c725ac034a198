"""One entry point for "give me a generator": MAR + VAE + latent scale, for the scripts.

``load_generator(name)`` understands

* ``mar_base`` / ``mar_large`` / ``mar_huge`` - the released architectures with the released weights
  (default paths from :mod:`util.checkpoint`; ``ckpt`` / ``vae_path`` override them, with ``.pth`` files or
  the ``.safetensors`` ones ``python -m util.download --source hf`` prints, one state dict each, EMA or raw
  unknown). Missing or malformed files raise :class:`util.checkpoint.CheckpointError`, whose message says
  how to download.
* ``tiny-random`` - a tiny randomly initialised MAR (32x32 images, VAE stride 4 -> 8x8 = 64 tokens,
  2+2 blocks of width 32, head 2x32, 10 classes) with a tiny random KL autoencoder of matching stride.
  Deterministic (seeded, without touching the global RNG state). Used by the tests and as the
  documented fallback of ``sample.py`` when the demo files are missing. Its images are noise.
* any name a higher layer registered with :func:`register_generator`: importing :mod:`demo.registry`
  registers ``demo``, the small model trained on the demo data set. ``util`` never imports ``demo``.

:func:`sampling_defaults` gives each model's default sampling settings, the one source every script
(eval.py, sample.py) takes the settings its flags leave out from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

from models.mar import MAR, MAR_FACTORIES, build_released
from models.vae import KL16_CONFIG, VAE_LATENT_SCALE, AutoencoderKL

RELEASED_MODELS = tuple(sorted(MAR_FACTORIES))  # ('mar_base', 'mar_huge', 'mar_large')
TINY_MODEL = "tiny-random"

TINY_SEED = 0
DEFAULT_SAMPLING_STEPS = 100  # the head's respaced steps in the MAR papers' evaluations
TINY_MAR = dict(img_size=32, vae_stride=4, patch_size=1, vae_embed_dim=16, class_num=10,
                encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=4,
                decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
                mlp_ratio=2.0, buffer_size=4, diffloss_d=2, diffloss_w=32)
TINY_VAE = dict(embed_dim=16, ch_mult=(1, 2, 2), ch=32, num_res_blocks=1, resolution=32)
# Default sampling settings of the released models: the LazyMAR evaluation's (MAR-H, 64 steps, cfg 3.25
# linear, temperature 1; docs/REPRODUCING.md gives MAR's guidance per size for its own tables). The
# untrained tiny model takes them at 16 steps: its images are noise at any setting, so it samples fast.
RELEASED_SAMPLING = dict(num_iter=64, cfg=3.25, cfg_schedule="linear", temperature=1.0)
TINY_SAMPLING = dict(RELEASED_SAMPLING, num_iter=16)
SAMPLING_KEYS = tuple(RELEASED_SAMPLING)


@dataclass(frozen=True)
class Generator:
    """A ready-to-sample model: ``vae.decode(mar.sample_tokens(...) / latent_scale)`` gives images.

    Attributes:
        mar: the MAR, in eval mode, on the requested device.
        vae: the matching autoencoder, in eval mode, same device.
        latent_scale: factor between VAE latents and MAR tokens (tokens = latents * scale).
        name: the model name it was loaded as.
        is_random: True for untrained weights (``tiny-random``): its images carry no meaning.
        files: the weight files it was loaded from, by role (``{'mar': path, 'vae': path}``); empty
            for weights made in memory. A run records their digests to prove what it sampled.
    """

    mar: MAR
    vae: nn.Module
    latent_scale: float
    name: str
    is_random: bool
    files: dict[str, Path] = field(default_factory=dict)


class LoadedModel(NamedTuple):
    """What a registered loader returns: modules on the CPU and the files they came from."""

    mar: MAR
    vae: nn.Module
    latent_scale: float
    files: dict[str, Path]


# name -> loader(ckpt=..., vae_path=..., use_ema=...) -> LoadedModel; filled by higher layers.
_REGISTERED: dict[str, Callable[..., LoadedModel]] = {}
# name -> its default sampling settings, for the registered models that have their own.
_SAMPLING: dict[str, dict[str, Any]] = {}


def register_generator(name: str, loader: Callable[..., LoadedModel], *,
                       sampling: dict[str, Any] | None = None) -> None:
    """Make ``load_generator(name)`` call ``loader(ckpt=..., vae_path=..., use_ema=...)``.

    How a higher layer (the demo) adds a model without this module importing it. The loader raises
    ``FileNotFoundError`` when its files are missing and ``ValueError`` for flags it cannot honour.
    ``sampling``: the model's default sampling settings (the keys of :data:`RELEASED_SAMPLING`), read by
    :func:`sampling_defaults` when called (not copied); None: the released models'.
    """
    if name in RELEASED_MODELS or name == TINY_MODEL:
        raise ValueError(f"{name!r} is a built-in model name")
    if sampling is not None and set(sampling) != set(SAMPLING_KEYS):
        raise ValueError(f"sampling defaults of {name!r} must give exactly {list(SAMPLING_KEYS)}, got {sorted(sampling)}")
    _REGISTERED[name] = loader
    if sampling is not None:
        _SAMPLING[name] = sampling


def sampling_defaults(model: str) -> dict[str, Any]:
    """The sampling settings (``num_iter``, ``cfg``, ``cfg_schedule``, ``temperature``) a script uses for
    ``model`` where no flag gives them: a registered model's own, :data:`TINY_SAMPLING` for the tiny model,
    else :data:`RELEASED_SAMPLING`. A new dict."""
    if model == TINY_MODEL:
        return dict(TINY_SAMPLING)
    return dict(_SAMPLING.get(model, RELEASED_SAMPLING))


def model_choices() -> tuple[str, ...]:
    """Every name :func:`load_generator` accepts now (registered ones included), for ``choices=``."""
    return (*RELEASED_MODELS, *_REGISTERED, TINY_MODEL)


def _tiny_random(num_sampling_steps: int) -> tuple[MAR, AutoencoderKL]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        mar = MAR(norm_layer=partial(nn.LayerNorm, eps=1e-6), num_sampling_steps=str(num_sampling_steps),
                  **TINY_MAR)
        # adaLN-Zero init makes the head output exactly 0; perturb it so samples depend on the model
        # (and an acceleration preset visibly changes them).
        with torch.no_grad():
            for name, p in mar.diffloss.named_parameters():
                if "adaLN_modulation" in name or "final_layer.linear" in name:
                    p.normal_(0, 0.02)
        vae = AutoencoderKL(**TINY_VAE)
    return mar, vae


def check_sampling_steps(num_sampling_steps: int) -> None:
    """``ValueError`` unless the head can respace ``num_sampling_steps`` from its 1000 training steps."""
    if not 1 <= num_sampling_steps <= 1000:
        raise ValueError(f"--num_sampling_steps must be in [1, 1000] (respaced from the 1000 training steps), "
                         f"got {num_sampling_steps}")


def load_generator(model: str, *, ckpt: str | Path | None = None, vae_path: str | Path | None = None,
                   use_ema: bool = True, device: str | torch.device = "cpu",
                   num_sampling_steps: int | None = None) -> Generator:
    """Build and load a generator by name (see the module docstring).

    Args:
        model: one of :func:`model_choices`.
        ckpt: MAR checkpoint override (released models; registered loaders decide for themselves).
        vae_path: VAE checkpoint override (likewise).
        use_ema: load the EMA weights of the MAR checkpoint (what the papers evaluate).
        device: where to put the modules.
        num_sampling_steps: diffusion steps of the head; ``None``: the model's own (100 for the released
            and tiny models, the demo's from its checkpoint).
    """
    device = torch.device(device)
    if num_sampling_steps is not None:
        check_sampling_steps(num_sampling_steps)
    steps = DEFAULT_SAMPLING_STEPS if num_sampling_steps is None else num_sampling_steps
    files: dict[str, Path] = {}
    if model in RELEASED_MODELS:
        from util.checkpoint import load_mar_weights, load_vae_weights, mar_checkpoint_path, vae_checkpoint_path
        files = {"mar": Path(ckpt if ckpt is not None else mar_checkpoint_path(model)),
                 "vae": Path(vae_path if vae_path is not None else vae_checkpoint_path())}
        mar = build_released(model, num_sampling_steps=str(steps))
        load_mar_weights(mar, files["mar"], use_ema=use_ema, model_name=model)
        vae = AutoencoderKL(**KL16_CONFIG)
        load_vae_weights(vae, files["vae"])
        scale, is_random = VAE_LATENT_SCALE, False
    elif model == TINY_MODEL:
        if ckpt is not None or vae_path is not None:
            raise ValueError("tiny-random has no checkpoint; drop --ckpt / --vae_path")
        if not use_ema:
            raise ValueError("tiny-random has random weights, no EMA and raw ones; drop --no_ema")
        mar, vae = _tiny_random(steps)
        scale, is_random = VAE_LATENT_SCALE, True
    elif model in _REGISTERED:
        mar, vae, scale, files = _REGISTERED[model](ckpt=ckpt, vae_path=vae_path, use_ema=use_ema)
        is_random = False
    else:
        raise ValueError(f"unknown model {model!r}; choose one of {list(model_choices())}")
    if num_sampling_steps is not None:
        mar.diffloss.set_sampling_steps(num_sampling_steps)  # registered models' too: never ignored
    mar = mar.to(device).eval()
    vae = vae.to(device).eval()
    return Generator(mar=mar, vae=vae, latent_scale=float(scale), name=model, is_random=is_random,
                     files={role: Path(p) for role, p in files.items()})


def load_draft(model: str, target: Generator, *, ckpt: str | Path | None = None, vae_path: str | Path | None = None,
               use_ema: bool = True) -> Generator:
    """The draft model of speculative decoding for ``target`` (``--draft_model``): ``model`` loaded as
    :func:`load_generator` does, on ``target``'s device and with ``target``'s diffusion step count, since
    trajectory alignment pairs the two heads' steps. Only its MAR samples; ``vae_path`` is passed on to a
    released draft (a registered model finds its own files) so that it reads the target's VAE file."""
    device = next(target.mar.parameters()).device
    return load_generator(model, ckpt=ckpt, vae_path=vae_path if model in RELEASED_MODELS else None,
                          use_ema=use_ema, device=device, num_sampling_steps=target.mar.diffloss.num_sampling_steps)
