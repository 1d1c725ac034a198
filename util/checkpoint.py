"""Loading released (and project-trained) checkpoints, with errors that say what to do.

Released formats:
- MAR: ``{'model': state_dict, 'model_ema': state_dict, ...}``; sampling uses the EMA weights.
- KL-16 VAE: ``{'model': state_dict, ...}``, possibly with training-only keys (loss, discriminator)
  that are ignored; a missing key is an error.

Files are read with ``weights_only=True`` (plus ``argparse.Namespace``, which training scripts store
as ``args``), so loading a checkpoint cannot run arbitrary code.

``.safetensors`` files (e.g. the community upload on the Hugging Face Hub, ``python -m util.download
--source hf``) hold one flat state dict and no record of whether it is the EMA or the raw weights: they
load as that one state dict whatever ``use_ema`` says, with a warning, through the same schema check.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import safetensors
import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

PRETRAINED_DIR = Path("pretrained_models")
VAE_RELPATH = Path("vae/kl16.ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
FIRST_DIFFERENCES = 3  # keys named per kind of difference in a schema error; the counts say how many more
# Why a .safetensors MAR file loads with a warning: the format holds one state dict and no EMA flag.
UNKNOWN_WEIGHTS_NOTE = (
    "a .safetensors file holds one state dict and does not record whether it is the EMA (`model_ema`, what "
    "the MAR papers sample with) or the raw (`model`) weights, so --no_ema / use_ema has no effect on it; for "
    "the community upload on the Hugging Face Hub (jadechoghari/mar) which one it holds is not stated, and "
    "this project has not measured its FID. For the EMA weights of the paper, use the released .pth files "
    "(`python -m util.download NAME`).")

_SIZE_ADVICE = "Pick the model size that matches the file (e.g. --model), or the right file."
# Keys renamed by a conversion (a prefix, another naming) are refused, never remapped by guess.
_SAFETENSORS_ADVICE = (
    "Pick the model size that matches the file (e.g. --model), or the right file. A .safetensors file "
    "whose keys differ from the released layout was converted with another naming, which this project "
    "does not remap: use the released .pth files (`python -m util.download NAME`) instead.")

Shapes = Mapping[str, tuple[int, ...]]


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


def is_safetensors(path: Path | str) -> bool:
    """Whether ``path`` names a ``.safetensors`` file (by its suffix, as the Hub and users name them)."""
    return Path(path).suffix == SAFETENSORS_SUFFIX


def _download_hint(download_name: str | None, path: Path) -> str:
    if download_name is None:
        return ""
    if is_safetensors(path):
        return (f" Download it with `python -m util.download --source hf {download_name}` (it goes to the "
                f"Hugging Face cache; the command prints the path to pass here).")
    from util.download import RELEASED_FILES
    url = RELEASED_FILES[download_name].url
    return (f" Download it with `python -m util.download {download_name}` (it goes to "
            f"pretrained_models/{RELEASED_FILES[download_name].relpath}), or fetch {url} by hand "
            f"and put it at {path}.")


@contextmanager
def _reading(path: Path, kind: str, errors: tuple[type[BaseException], ...],
             download_name: str | None) -> Iterator[None]:
    """A missing file, and a read that fails with one of ``errors``, as a :class:`CheckpointError` that
    says what to do (``kind``: what the file should have been)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}.{_download_hint(download_name, path)}")
    try:
        yield
    except errors as e:
        raise CheckpointError(
            f"{path} ({path.stat().st_size} bytes) is truncated or not a {kind}: {e}. "
            f"Delete it and fetch it again.{_download_hint(download_name, path)}") from e


def read_checkpoint(path: Path | str, *, download_name: str | None = None) -> dict[str, Any]:
    """``torch.load`` a checkpoint dict on the CPU, turning every failure into a :class:`CheckpointError`.

    Args:
        path: the file.
        download_name: registry name in ``util.download`` to mention when the file is missing or broken.
    """
    path = Path(path)
    with _reading(path, "PyTorch checkpoint",
                  (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError), download_name):
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def read_safetensors(path: Path | str, *, download_name: str | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file on the CPU: ``(state dict, header metadata)``; failures become
    :class:`CheckpointError`.

    Args:
        path: the file.
        download_name: registry name in ``util.download`` to mention when the file is missing or broken.
    """
    path = Path(path)
    with _reading(path, "safetensors file", (safetensors.SafetensorError, OSError), download_name):
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    return sd, metadata


def read_safetensors_shapes(path: Path | str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key -> shape and key -> dtype (``'F32'``, ``'BF16'``, ...) of a ``.safetensors`` file from its header
    alone (no tensor is read, so checking a 4 GB file costs milliseconds); failures become
    :class:`CheckpointError`."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return ({k: tuple(s.get_shape()) for k, s in slices.items()},
                    {k: s.get_dtype() for k, s in slices.items()})
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or not a safetensors file: {e}. "
                              f"Delete it and fetch it again.") from e


def shapes_of(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a state dict (meta tensors included): the schema the checks compare."""
    return {k: tuple(v.shape) for k, v in sd.items()}


def schema_differences(expected: Shapes, found: Shapes, *, allow_extra: bool = False) -> str | None:
    """None when ``found`` has exactly ``expected``'s keys and shapes, else what differs, first
    :data:`FIRST_DIFFERENCES` keys of each kind in ``expected``'s (module) order, then the file's order.

    Args:
        expected: key -> shape the model has.
        found: key -> shape the file has.
        allow_extra: keys of ``found`` that ``expected`` lacks are not a difference (the VAE loader drops
            the training-only keys of ``kl16.ckpt``).
    """
    missing = [k for k in expected if k not in found]
    unexpected = [] if allow_extra else [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    parts = []
    if mismatched:
        first = ", ".join(f"{k}: file {tuple(found[k])}, model {tuple(expected[k])}"
                          for k in mismatched[:FIRST_DIFFERENCES])
        parts.append(f"{len(mismatched)} shape mismatches (first: {first})")
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:FIRST_DIFFERENCES])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:FIRST_DIFFERENCES])})")
    return "; ".join(parts) or None


def _shape(value: torch.Tensor | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def describe_mar_state_dict(sd: Mapping[str, torch.Tensor | tuple[int, ...]]) -> str:
    """Short description of a MAR state dict's (or key -> shape map's) size, e.g.
    ``'width 768, 12+12 blocks (MAR-B)'``."""
    if "z_proj.weight" not in sd:
        kind = "a VAE" if any(k.startswith("encoder.conv_in") for k in sd) else "not a MAR model"
        return f"{kind} (first keys: {', '.join(list(sd)[:3])})"
    width = _shape(sd["z_proj.weight"])[0]
    enc = len({k.split(".")[1] for k in sd if k.startswith("encoder_blocks.")})
    dec = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
    head = len({k.split(".")[3] for k in sd if k.startswith("diffloss.net.res_blocks.")})
    head_w = (_shape(sd["diffloss.net.input_proj.weight"])[0] if "diffloss.net.input_proj.weight" in sd
              else "?")
    known = {(768, 12): "MAR-B", (1024, 16): "MAR-L", (1280, 20): "MAR-H"}
    label = known.get((width, enc))
    return (f"width {width}, {enc}+{dec} blocks, head {head}x{head_w}" + (f" ({label})" if label else ""))


def load_mar_weights(model: nn.Module, path: Path | str, *, use_ema: bool = True,
                     model_name: str | None = None) -> dict[str, Any]:
    """Load a released-format MAR checkpoint, or a ``.safetensors`` state dict, into ``model`` (``strict=True``).

    A ``.safetensors`` file is one state dict with no record of EMA or raw: it is loaded as it is, whatever
    ``use_ema`` says, and a warning says so (:data:`UNKNOWN_WEIGHTS_NOTE`); which weights the community
    Hub upload holds is not stated by it.

    Args:
        model: a :class:`models.mar.MAR` of the right size.
        path: checkpoint file (``.pth`` in the released layout, or ``.safetensors``).
        use_ema: load ``model_ema`` (what sampling should use) rather than the raw ``model`` weights
            (``.pth`` only).
        model_name: registry name used in messages (e.g. ``mar_base``).

    Returns:
        The checkpoint dict (for its other entries, such as a stored ``config``); for a ``.safetensors``
        file ``{'metadata': <its header metadata>}``.
    """
    download_name = model_name if model_name in _released_names() else None
    if is_safetensors(path):
        sd, metadata = read_safetensors(path, download_name=download_name)
        logger.warning("loading %s as one state dict: %s", path, UNKNOWN_WEIGHTS_NOTE)
        check_state_dict(model, sd, path, describe=describe_mar_state_dict, model_name=model_name,
                         advice=_SAFETENSORS_ADVICE)
        model.load_state_dict(sd, strict=True)
        return {"metadata": metadata}
    ckpt = read_checkpoint(path, download_name=download_name)
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
    """Load a ``kl16.ckpt``-format file, or a ``.safetensors`` state dict, into ``vae``: extra keys
    ignored, missing keys an error."""
    if is_safetensors(path):
        sd, _ = read_safetensors(path, download_name="vae")
        advice = _SAFETENSORS_ADVICE
    else:
        ckpt = read_checkpoint(path, download_name="vae")
        if "model" not in ckpt:
            raise CheckpointError(f"{path} has no 'model' entry (it holds {sorted(ckpt)}); expected a VAE "
                                  f"checkpoint like kl16.ckpt.")
        sd, advice = ckpt["model"], None
    own = vae.state_dict()
    extra = [k for k in sd if k not in own]
    if extra:
        logger.info("ignoring %d training-only keys in %s (e.g. %s)", len(extra), path, extra[0])
    sd = {k: v for k, v in sd.items() if k in own}
    check_state_dict(vae, sd, path, describe=lambda s: f"{len(s)} matching tensors", advice=advice)
    vae.load_state_dict(sd, strict=True)


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path | str, *,
                     describe: Callable[[Mapping[str, torch.Tensor]], str] = describe_mar_state_dict,
                     model_name: str | None = None, advice: str | None = None) -> None:
    """Raise a :class:`CheckpointError` naming both sides, and the first differing keys and shapes, when
    ``sd`` does not fit ``model``; ``advice`` (what to do) replaces the default "pick the right size"."""
    own = model.state_dict()
    differences = schema_differences(shapes_of(own), shapes_of(sd))
    if differences is None:
        return
    what = model_name or type(model).__name__
    raise CheckpointError(
        f"{path} does not fit {what}: the file is {describe(sd)}, the model is {describe(own)}; "
        f"{differences}. {advice or _SIZE_ADVICE}")


def _released_names() -> set[str]:
    from util.download import RELEASED_FILES
    return set(RELEASED_FILES)
