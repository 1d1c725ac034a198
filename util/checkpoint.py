"""Loading released (and project-trained) checkpoints, with errors that say what to do.

Released formats:
- MAR: ``{'model': state_dict, 'model_ema': state_dict, ...}``; sampling uses the EMA weights.
- KL-16 VAE: ``{'model': state_dict, ...}``, possibly with training-only keys (loss, discriminator)
  that are ignored; a missing key is an error.

Files are read with ``weights_only=True`` (plus ``argparse.Namespace``, which training scripts store
as ``args``), so loading a checkpoint cannot run arbitrary code.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

PRETRAINED_DIR = Path("pretrained_models")
VAE_RELPATH = Path("vae/kl16.ckpt")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; it replaces ``path`` when the block ends cleanly.

    A run killed while writing leaves the previous file intact, never a truncated one under the name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves neither a half file nor litter
        raise
    os.replace(tmp, path)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the model it is loaded into."""


def mar_checkpoint_path(name: str, root: Path | str = PRETRAINED_DIR) -> Path:
    """Where the released checkpoint of ``name`` (e.g. ``mar_base``) is expected."""
    return Path(root) / "mar" / name / "checkpoint-last.pth"


def vae_checkpoint_path(root: Path | str = PRETRAINED_DIR) -> Path:
    return Path(root) / VAE_RELPATH


def _download_hint(download_name: str | None, path: Path) -> str:
    if download_name is None:
        return ""
    from util.download import RELEASED_FILES
    url = RELEASED_FILES[download_name].url
    return (f" Download it with `python -m util.download {download_name}` (it goes to "
            f"pretrained_models/{RELEASED_FILES[download_name].relpath}), or fetch {url} by hand "
            f"and put it at {path}.")


def read_checkpoint(path: Path | str, *, download_name: str | None = None) -> dict[str, Any]:
    """``torch.load`` a checkpoint dict on the CPU, turning every failure into a :class:`CheckpointError`.

    Args:
        path: the file.
        download_name: registry name in ``util.download`` to mention when the file is missing or broken.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}.{_download_hint(download_name, path)}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f"{path} ({path.stat().st_size} bytes) is truncated or not a PyTorch checkpoint: {e}. "
            f"Delete it and fetch it again.{_download_hint(download_name, path)}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def describe_mar_state_dict(sd: dict[str, torch.Tensor]) -> str:
    """Short description of a MAR state dict's size, e.g. ``'width 768, 12+12 blocks (MAR-B)'``."""
    if "z_proj.weight" not in sd:
        kind = "a VAE" if any(k.startswith("encoder.conv_in") for k in sd) else "not a MAR model"
        return f"{kind} (first keys: {', '.join(list(sd)[:3])})"
    width = sd["z_proj.weight"].shape[0]
    enc = len({k.split(".")[1] for k in sd if k.startswith("encoder_blocks.")})
    dec = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
    head = len({k.split(".")[3] for k in sd if k.startswith("diffloss.net.res_blocks.")})
    head_w = sd["diffloss.net.input_proj.weight"].shape[0] if "diffloss.net.input_proj.weight" in sd else "?"
    known = {(768, 12): "MAR-B", (1024, 16): "MAR-L", (1280, 20): "MAR-H"}
    label = known.get((width, enc))
    return (f"width {width}, {enc}+{dec} blocks, head {head}x{head_w}" + (f" ({label})" if label else ""))


def load_mar_weights(model: nn.Module, path: Path | str, *, use_ema: bool = True,
                     model_name: str | None = None) -> dict[str, Any]:
    """Load a released-format MAR checkpoint into ``model`` (``strict=True``).

    Args:
        model: a :class:`models.mar.MAR` of the right size.
        path: checkpoint file.
        use_ema: load ``model_ema`` (what sampling should use) rather than the raw ``model`` weights.
        model_name: registry name used in messages (e.g. ``mar_base``).

    Returns:
        The checkpoint dict (for its other entries, such as a stored ``config``).
    """
    ckpt = read_checkpoint(path, download_name=model_name if model_name in _released_names() else None)
    key = "model_ema" if use_ema else "model"
    if key not in ckpt:
        hint = " (pass --no_ema to use the raw weights)" if use_ema and "model" in ckpt else ""
        raise CheckpointError(f"{path} has no '{key}' entry{hint}; it holds {sorted(ckpt)}. "
                              f"Expected a MAR checkpoint with 'model' and 'model_ema'.")
    sd = ckpt[key]
    check_state_dict(model, sd, path, describe=describe_mar_state_dict, model_name=model_name)
    model.load_state_dict(sd, strict=True)
    return ckpt


def load_vae_weights(vae: nn.Module, path: Path | str) -> None:
    """Load a ``kl16.ckpt``-format file into ``vae``: extra keys ignored, missing keys an error."""
    ckpt = read_checkpoint(path, download_name="vae")
    if "model" not in ckpt:
        raise CheckpointError(f"{path} has no 'model' entry (it holds {sorted(ckpt)}); expected a VAE "
                              f"checkpoint like kl16.ckpt.")
    sd = ckpt["model"]
    own = vae.state_dict()
    extra = [k for k in sd if k not in own]
    if extra:
        logger.info("ignoring %d training-only keys in %s (e.g. %s)", len(extra), path, extra[0])
    sd = {k: v for k, v in sd.items() if k in own}
    check_state_dict(vae, sd, path, describe=lambda s: f"{len(s)} matching tensors")
    vae.load_state_dict(sd, strict=True)


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path | str, *,
                     describe=describe_mar_state_dict, model_name: str | None = None) -> None:
    """Raise a :class:`CheckpointError` naming both sides when ``sd`` does not fit ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    what = model_name or type(model).__name__
    parts = []
    if mismatched:
        k = mismatched[0]
        parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: file {tuple(sd[k].shape)}, "
                     f"model {tuple(own[k].shape)})")
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    raise CheckpointError(
        f"{path} does not fit {what}: the file is {describe(sd)}, the model is {describe(own)}; "
        f"{'; '.join(parts)}. Pick the model size that matches the file (e.g. --model), or the right file.")


def _released_names() -> set[str]:
    from util.download import RELEASED_FILES
    return set(RELEASED_FILES)
