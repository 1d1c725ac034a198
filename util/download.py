"""Fetch the released MAR / VAE checkpoints.

Usage::

    python -m util.download vae mar_base [--dest pretrained_models] [--overwrite]
    python -m util.download all
    python -m util.download --source hf vae mar_base [--revision REV] [--cache_dir DIR] [--offline]

Files land under ``--dest`` (default ``pretrained_models``) in the layout the
rest of the project expects::

    pretrained_models/vae/kl16.ckpt
    pretrained_models/mar/mar_base/checkpoint-last.pth
    pretrained_models/mar/mar_large/checkpoint-last.pth
    pretrained_models/mar/mar_huge/checkpoint-last.pth

Why this is more than a one-line ``urlretrieve``:

* The checkpoints are large (0.25 to 7 GB). Bytes are streamed into
  ``<final>.part`` and only renamed with ``os.replace`` (atomic on one file
  system) once the size matches what the server announced. A file under the
  final name is therefore always complete; a crash or Ctrl-C can never leave a
  truncated checkpoint that would later fail to load in a confusing way.
* An interrupted download is resumed: if ``<final>.part`` exists, the request
  carries ``Range: bytes=<size>-``. A ``206`` reply is appended, a ``200``
  (server ignored the range) restarts from zero, and a ``416`` with the part
  already at full size is simply finalized.
* Dropbox serves the file itself (instead of an HTML preview page) for
  ``dl=0`` links when the client looks like wget, so the upstream
  ``User-Agent`` header is sent.

``--source hf`` fetches the community ``.safetensors`` upload on the Hugging
Face Hub instead (for users who cannot reach Dropbox) through
``huggingface_hub``: its cache (``HF_HUB_CACHE`` / ``HF_HOME`` or
``--cache_dir``), its resume of interrupted transfers, and its offline mode
(``HF_HUB_OFFLINE=1`` or ``--offline``: the cache only, no network). The
files stay in that cache; each one's header is checked against the released
key layout and shapes before its path is printed, and a file that differs is
refused with its first differences. Which weights the upload holds (EMA or
raw) is not stated by it and cannot be read from the files; this project has
not measured their FID (see :data:`HUB_FILES`).
"""

from __future__ import annotations

import argparse
import functools
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, NamedTuple, Optional, Sequence

import huggingface_hub
import huggingface_hub.constants
import torch
import torch.nn as nn
from huggingface_hub.utils import (  # where 0.24 to 2.x all export them
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm import tqdm

from models.mar import build_released
from models.vae import KL16_CONFIG, AutoencoderKL
from util.checkpoint import (
    UNKNOWN_WEIGHTS_NOTE,
    CheckpointError,
    describe_mar_state_dict,
    read_safetensors_shapes,
    schema_differences,
    shapes_of,
)

logger = logging.getLogger(__name__)

USER_AGENT = "Wget/1.16 (linux-gnu)"
DEFAULT_DEST = Path("pretrained_models")
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: few syscalls, small memory footprint.
DEFAULT_TIMEOUT = 60.0  # seconds without data before giving up on a socket.
PART_SUFFIX = ".part"
ALL = "all"

_CONTENT_RANGE_RE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.IGNORECASE)


class DownloadError(RuntimeError):
    """A download failed; the message says what happened and what to do next."""


@dataclass(frozen=True)
class ReleasedFile:
    """One released checkpoint.

    Args:
        name: CLI name of the file (e.g. ``mar_base``).
        relpath: Location relative to the destination root, POSIX style.
        url: Direct download link.
        approx_mb: Approximate size in megabytes, for the user's information.
    """

    name: str
    relpath: str
    url: str
    approx_mb: int


def _registry(*files: ReleasedFile) -> dict[str, ReleasedFile]:
    """Index released files by name (keeps the table below free of repetition)."""
    return {f.name: f for f in files}


RELEASED_FILES: dict[str, ReleasedFile] = _registry(
    ReleasedFile(
        "vae",
        "vae/kl16.ckpt",
        "https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt"
        "?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=0",
        254,
    ),
    ReleasedFile(
        "mar_base",
        "mar/mar_base/checkpoint-last.pth",
        "https://www.dropbox.com/scl/fi/f6dpuyjb7fudzxcyhvrhk/checkpoint-last.pth"
        "?rlkey=a6i4bo71vhfo4anp33n9ukujb&dl=0",
        1587,
    ),
    ReleasedFile(
        "mar_large",
        "mar/mar_large/checkpoint-last.pth",
        "https://www.dropbox.com/scl/fi/pxacc5b2mrt3ifw4cah6k/checkpoint-last.pth"
        "?rlkey=m48ovo6g7ivcbosrbdaz0ehqt&dl=0",
        3650,
    ),
    ReleasedFile(
        "mar_huge",
        "mar/mar_huge/checkpoint-last.pth",
        "https://www.dropbox.com/scl/fi/1qmfx6fpy3k7j9vcjjs3s/checkpoint-last.pth"
        "?rlkey=4lae281yzxb406atp32vzc83o&dl=0",
        7191,
    ),
)


# --------------------------------------------------------------------------- #
# The community upload on the Hugging Face Hub (``--source hf``)
# --------------------------------------------------------------------------- #

SOURCES = ("dropbox", "hf")
HUB_REPO_ID = "jadechoghari/mar"
HUB_REVISION = "main"  # no later commit hash is known here; the report prints the one resolved


@dataclass(frozen=True)
class HubFile:
    """One file of the Hub upload and the released layout it must have.

    Args:
        name: CLI name, the same as in ``RELEASED_FILES``.
        filename: Path inside the Hub repository.
        build: Constructor of the module whose state-dict keys and shapes the file must have; called on the
            meta device (shapes only, no memory). These are the released layouts, which
            ``tests/test_reference.py`` holds equal to ``tests/data/*.state_dict.txt``.
        flag: The sampling flag that takes the file (``--ckpt`` or ``--vae_path``).
        approx_mb: Approximate size in megabytes, for the user's information.
        extra_keys_ok: Keys the module lacks are not a difference (the VAE loader drops the
            training-only keys of ``kl16.ckpt``); for the MAR every key must match (``strict=True``).
    """

    name: str
    filename: str
    build: Callable[[], nn.Module]
    flag: str
    approx_mb: int
    extra_keys_ok: bool = False


# File names and sizes as the Hub's pages listed them for jadechoghari/mar at ``main`` (read from stored
# copies of those pages; nothing was downloaded here). What this project has not verified: that the keys
# follow upstream's names (so each file is checked before use, and refused with its first differences if
# not), and whether the MAR files hold the EMA or the raw weights (the upload does not say; its single
# state dict per file, half the size of the two-dict .pth, is one of them). Override with --repo_id,
# --revision and --filename.
HUB_FILES: dict[str, HubFile] = {
    "vae": HubFile("vae", "kl16.safetensors", functools.partial(AutoencoderKL, **KL16_CONFIG),
                   "--vae_path", 266, extra_keys_ok=True),
    "mar_base": HubFile("mar_base", "mar-base.safetensors", functools.partial(build_released, "mar_base"),
                        "--ckpt", 832),
    "mar_large": HubFile("mar_large", "mar-large.safetensors", functools.partial(build_released, "mar_large"),
                         "--ckpt", 1913),
    "mar_huge": HubFile("mar_huge", "mar-huge.safetensors", functools.partial(build_released, "mar_huge"),
                        "--ckpt", 3770),
}


class HubCheckout(NamedTuple):
    """A Hub file found in the cache and checked against the released layout.

    Attributes:
        name: CLI name.
        path: The file in the Hugging Face cache (``.../snapshots/<commit>/<filename>``).
        repo_id: Repository it came from.
        commit: Commit hash the revision resolved to (pass it as ``--revision`` to pin it).
        filename: Path inside the repository.
        tensors: Number of tensors in the file.
        dtypes: The tensor dtypes it holds, sorted (``'F32'`` for the released weights).
    """

    name: str
    path: Path
    repo_id: str
    commit: str
    filename: str
    tensors: int
    dtypes: tuple[str, ...]


class _WritePlan(NamedTuple):
    """How to consume a response: where it starts, expected total, file mode."""

    offset: int
    total: Optional[int]
    mode: str


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #


def part_path(dest: Path) -> Path:
    """Return the temporary ``<dest>.part`` path that collects bytes in flight.

    Args:
        dest: Final file path.
    """
    return dest.with_name(dest.name + PART_SUFFIX)


def _file_size(path: Path) -> int:
    """Size of ``path`` in bytes, 0 if it does not exist.

    Args:
        path: File to measure.
    """
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _build_request(url: str, offset: int) -> urllib.request.Request:
    """Build the GET request, asking for the tail of the file when resuming.

    Args:
        url: Source URL.
        offset: Bytes already on disk; 0 requests the whole file.
    """
    headers = {"User-Agent": USER_AGENT}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.Request(url, headers=headers)


def _parse_content_range(value: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """Parse ``Content-Range`` into ``(start, total)``; unknown parts are None.

    Args:
        value: Header value such as ``bytes 100-299/300`` or ``bytes */300``.
    """
    match = _CONTENT_RANGE_RE.match(value.strip()) if value else None
    if match is None:
        return None, None
    start, _end, total = match.groups()
    return (
        int(start) if start is not None else None,
        int(total) if total != "*" else None,
    )


def _content_length(response: http.client.HTTPResponse) -> Optional[int]:
    """Return the announced ``Content-Length`` or None when absent/invalid.

    Args:
        response: Open HTTP response.
    """
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _interrupted(url: str, part: Path, size: int, total: Optional[int]) -> DownloadError:
    """Error for a transfer that stopped early; the part file is kept for resuming.

    Args:
        url: Source URL.
        part: Partial file that holds the bytes received so far.
        size: Bytes received so far.
        total: Expected size, if known.
    """
    of_total = f" of {total}" if total is not None else ""
    return DownloadError(
        f"download of {url} interrupted after {size}{of_total} bytes; "
        f"run the same command again to resume (partial data kept in {part})"
    )


# --------------------------------------------------------------------------- #
# Download steps
# --------------------------------------------------------------------------- #


def _open(url: str, dest: Path, offset: int, timeout: float) -> http.client.HTTPResponse:
    """Send the request and translate network failures into ``DownloadError``.

    ``HTTPError`` is re-raised untouched so the caller can handle 416.

    Args:
        url: Source URL.
        dest: Final path (quoted in the manual-download hint).
        offset: Bytes already on disk.
        timeout: Socket timeout in seconds.
    """
    try:
        return urllib.request.urlopen(_build_request(url, offset), timeout=timeout)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"could not reach {url} ({reason}). Check your network connection, "
            f"or download the file manually from {url} and place it at {dest}"
        ) from err


def _http_error(err: urllib.error.HTTPError, url: str, dest: Path) -> DownloadError:
    """Explain an HTTP error status in a user-actionable way.

    Args:
        err: The error raised by urllib.
        url: Source URL.
        dest: Final path (quoted in the manual-download hint).
    """
    return DownloadError(
        f"HTTP {err.code} {err.reason} while downloading {url}. The link may have "
        f"changed; download the file manually from {url} and place it at {dest}"
    )


def _plan(response: http.client.HTTPResponse, offset: int, part: Path, url: str) -> _WritePlan:
    """Decide whether the response continues the part file or replaces it.

    Args:
        response: Successful HTTP response.
        offset: Bytes already in ``part`` (what the Range asked for).
        part: Partial file.
        url: Source URL (for messages).
    """
    status = response.status
    if status == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range"))
        if start is None:  # Malformed header: trust Content-Length instead.
            length = _content_length(response)
            start, total = offset, (offset + length if length is not None else None)
        if start != offset:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"server answered {url} with bytes from {start} instead of {offset}; "
                "the partial file was discarded, run the same command again"
            )
        return _WritePlan(offset, total, "ab")
    if status == 200:
        if offset > 0:
            logger.info("server ignored the resume request; restarting from zero")
        return _WritePlan(0, _content_length(response), "wb")
    raise DownloadError(f"unexpected HTTP status {status} from {url}")


def _stream(
    response: http.client.HTTPResponse,
    part: Path,
    plan: _WritePlan,
    url: str,
    chunk_size: int,
    progress: bool,
) -> None:
    """Copy the response body into ``part`` with a progress bar.

    Args:
        response: Response positioned at the start of the body.
        part: Partial file to write or append to.
        plan: Offset, expected total and open mode.
        url: Source URL (for messages).
        chunk_size: Bytes per read.
        progress: Show a tqdm bar.
    """
    bar = tqdm(
        total=plan.total,
        initial=plan.offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=part.name[: -len(PART_SUFFIX)],
        disable=not progress,
    )
    try:
        with bar, open(part, plan.mode) as fh:
            while chunk := _read(response, chunk_size, url, part, plan.total):
                fh.write(chunk)
                bar.update(len(chunk))
    except OSError as err:  # Local problem: disk full, permissions, ...
        raise DownloadError(f"could not write {part}: {err}") from err


def _read(
    response: http.client.HTTPResponse, size: int, url: str, part: Path, total: Optional[int]
) -> bytes:
    """Read one chunk; a dropped connection becomes a resumable-download error.

    Args:
        response: Open HTTP response.
        size: Maximum bytes to read.
        url: Source URL (for messages).
        part: Partial file (for messages).
        total: Expected size, if known (for messages).
    """
    try:
        return response.read(size)
    except (OSError, http.client.HTTPException) as err:
        raise _interrupted(url, part, _file_size(part), total) from err


def _finalize(part: Path, dest: Path, total: Optional[int], url: str) -> Path:
    """Atomically move a complete part file to ``dest``; refuse incomplete ones.

    Args:
        part: Partial file.
        dest: Final path.
        total: Expected size, or None when the server did not say.
        url: Source URL (for messages).
    """
    size = _file_size(part)
    if total is not None and size < total:
        raise _interrupted(url, part, size, total)
    if total is not None and size > total:
        part.unlink()
        raise DownloadError(
            f"{part} grew to {size} bytes but {url} is {total} bytes; "
            "the partial file was discarded, run the same command again"
        )
    os.replace(part, dest)
    logger.info("saved %s (%d bytes)", dest, size)
    return dest


def _finish_after_416(
    err: urllib.error.HTTPError, url: str, dest: Path, part: Path, offset: int
) -> bool:
    """Finish if the part already holds the whole file, else discard it.

    A 416 ("range not satisfiable") usually means the previous run received
    every byte but stopped before the rename. Returns True when finalized,
    False when the part was discarded and the caller should restart from zero.

    Args:
        err: The 416 error.
        url: Source URL.
        dest: Final path.
        part: Partial file.
        offset: Size of ``part``.
    """
    _start, total = _parse_content_range(err.headers.get("Content-Range"))
    if total == offset:
        _finalize(part, dest, total, url)
        return True
    logger.info("server rejected the resume offset %d; restarting from zero", offset)
    part.unlink(missing_ok=True)
    return False


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def download_file(
    url: str,
    dest: Path,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download ``url`` to ``dest`` via ``<dest>.part``, resuming if possible.

    Args:
        url: Source URL (any scheme urllib supports; tests use loopback http).
        dest: Final file path; parent directories are created.
        chunk_size: Bytes per read.
        progress: Show a tqdm progress bar.
        timeout: Socket timeout in seconds.

    Returns:
        ``dest``, which exists and is complete.

    Raises:
        DownloadError: on HTTP errors, unreachable hosts and short transfers.
    """
    dest = Path(dest)
    part = part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = _file_size(part)
    if offset:
        logger.info("resuming %s from byte %d", dest, offset)
    try:
        response = _open(url, dest, offset, timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code != 416 or offset == 0:
            raise _http_error(err, url, dest) from err
        if _finish_after_416(err, url, dest, part, offset):
            return dest
        # The part file was discarded: one more attempt, now from zero.
        return download_file(
            url, dest, chunk_size=chunk_size, progress=progress, timeout=timeout
        )
    with response:
        plan = _plan(response, offset, part, url)
        _stream(response, part, plan, url, chunk_size, progress)
    return _finalize(part, dest, plan.total, url)


def download(
    name: str, dest_root: Path = DEFAULT_DEST, overwrite: bool = False, *, progress: bool = True
) -> Path:
    """Download one released file by registry name into ``dest_root``.

    An existing final file is kept (and no request is made) unless
    ``overwrite`` is set; thanks to the atomic rename it is known complete.

    Args:
        name: Key of ``RELEASED_FILES`` (e.g. ``vae``).
        dest_root: Root folder; the file goes to ``dest_root / relpath``.
        overwrite: Re-download even if the final file exists.
        progress: Show a tqdm progress bar.

    Returns:
        Path of the final file.
    """
    try:
        entry = RELEASED_FILES[name]
    except KeyError:
        raise DownloadError(
            f"unknown file {name!r}; choose from {', '.join(RELEASED_FILES)}"
        ) from None
    dest = Path(dest_root) / entry.relpath
    if dest.exists() and not overwrite:
        logger.info("%s already exists at %s; skipping (use --overwrite to re-download)", name, dest)
        return dest
    logger.info("downloading %s (~%d MB) to %s", name, entry.approx_mb, dest)
    return download_file(entry.url, dest, progress=progress)


def expected_shapes(entry: HubFile) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released layout of ``entry`` (its module built on the meta device).

    Args:
        entry: The Hub file.
    """
    with torch.device("meta"):
        return shapes_of(entry.build().state_dict())


def _commit_of(path: Path, filename: str) -> str:
    """The snapshot folder name (the commit hash) of a cached ``.../snapshots/<commit>/<filename>``."""
    return path.parents[len(PurePosixPath(filename).parts) - 1].name


def verify_hub_file(entry: HubFile, path: Path, *, repo_id: str, filename: str) -> HubCheckout:
    """Check the header of a downloaded Hub file against the released layout; refuse a file that differs.

    Only the header is read (keys, shapes, dtypes), so this costs milliseconds for any size.

    Args:
        entry: What the file should be.
        path: The file in the cache.
        repo_id: Repository it came from (for messages).
        filename: Path inside the repository (for messages).

    Raises:
        DownloadError: the file is unreadable, or its keys or shapes differ from the released ones; the
            message names the first differences and what to do.
    """
    commit = _commit_of(path, filename)
    try:
        shapes, dtypes = read_safetensors_shapes(path)
    except CheckpointError as err:
        raise DownloadError(f"{filename} of {repo_id}@{commit}: {err} (run with --overwrite to fetch it again)"
                            ) from err
    differences = schema_differences(expected_shapes(entry), shapes, allow_extra=entry.extra_keys_ok)
    if differences is not None:
        raise DownloadError(
            f"{filename} of {repo_id}@{commit} ({path}) does not have the released {entry.name} layout: "
            f"{differences}. The file holds {len(shapes)} tensors ({describe_mar_state_dict(shapes)}). "
            "This project loads upstream's key names and shapes only and does not rename keys by guess, so "
            "the file is not used (it stays in the Hugging Face cache). Check --repo_id / --revision / "
            "--filename, or use the released files: `--source dropbox`.")
    return HubCheckout(entry.name, path, repo_id, commit, filename, len(shapes), tuple(sorted(set(dtypes.values()))))


def _hub_error(err: Exception, *, filename: str, repo_id: str, revision: str, cache_dir: Path,
               offline: bool) -> DownloadError:
    """Explain a ``huggingface_hub`` failure in a user-actionable way.

    Args:
        err: What ``hf_hub_download`` raised.
        filename: Path inside the repository.
        repo_id: Repository.
        revision: Revision asked for.
        cache_dir: The cache searched.
        offline: Offline mode was on (``--offline`` or ``HF_HUB_OFFLINE``).
    """
    what = f"{filename} of {repo_id} (revision {revision})"
    if isinstance(err, LocalEntryNotFoundError) and offline:
        return DownloadError(
            f"{what} is not in the Hugging Face cache {cache_dir}, and offline mode is on (--offline or "
            f"HF_HUB_OFFLINE=1), so nothing was downloaded. Run the same command once where the Hub is "
            f"reachable, without --offline and with HF_HUB_OFFLINE unset, to fill the cache (or copy the "
            f"cache folder from a machine that has the file), then run offline again.")
    if isinstance(err, LocalEntryNotFoundError):
        return DownloadError(
            f"could not reach {huggingface_hub.constants.ENDPOINT} for {what}, and it is not in the cache "
            f"{cache_dir}. Check your network (huggingface_hub honours HTTPS_PROXY, and HF_ENDPOINT for a "
            f"mirror), or use the released files: `--source dropbox`.")
    if isinstance(err, RevisionNotFoundError):
        return DownloadError(f"{repo_id} has no revision {revision!r}; pass an existing branch, tag or commit "
                             f"with --revision.")
    if isinstance(err, RepositoryNotFoundError):
        return DownloadError(f"repository {repo_id} not found on the Hub (or private / gated: log in with "
                             f"`hf auth login`); check --repo_id.")
    if isinstance(err, EntryNotFoundError):
        return DownloadError(f"{what} does not exist on the Hub; the upload may have renamed it: pass the "
                             f"current name with --filename.")
    return DownloadError(f"Hugging Face Hub error for {what}: {err}")


def download_from_hub(
    name: str,
    *,
    repo_id: str = HUB_REPO_ID,
    revision: str = HUB_REVISION,
    filename: Optional[str] = None,
    cache_dir: Optional[Path] = None,
    offline: bool = False,
    overwrite: bool = False,
) -> HubCheckout:
    """Fetch one file of the Hub upload into the Hugging Face cache and check it before use.

    ``huggingface_hub`` does the transfer: a cached file is not fetched again, an interrupted one resumes,
    and offline mode reads the cache only.

    Args:
        name: Key of ``HUB_FILES`` (e.g. ``mar_base``).
        repo_id: Hub repository.
        revision: Branch, tag or commit hash.
        filename: Path inside the repository; None: ``HUB_FILES[name].filename``.
        cache_dir: Hugging Face cache; None: huggingface_hub's (``HF_HUB_CACHE``, ``HF_HOME``).
        offline: Cache only, no network; ``HF_HUB_OFFLINE=1`` turns it on as well.
        overwrite: Fetch again even if cached.

    Returns:
        The verified file.

    Raises:
        DownloadError: the file cannot be had (message says what to do) or does not fit the released layout.
    """
    try:
        entry = HUB_FILES[name]
    except KeyError:
        raise DownloadError(f"unknown file {name!r}; choose from {', '.join(HUB_FILES)}") from None
    filename = filename or entry.filename
    offline = offline or huggingface_hub.constants.HF_HUB_OFFLINE
    cache = Path(cache_dir) if cache_dir is not None else Path(huggingface_hub.constants.HF_HUB_CACHE)
    logger.info("%s: %s of %s (revision %s, ~%d MB) via the Hugging Face cache %s%s", name, filename, repo_id,
                revision, entry.approx_mb, cache, " (offline)" if offline else "")
    try:
        path = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache,
                                               local_files_only=offline, force_download=overwrite)
    # Hub errors before ValueError: in huggingface_hub 0.x LocalEntryNotFoundError is a ValueError too.
    except (EntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise _hub_error(err, filename=filename, repo_id=repo_id, revision=revision, cache_dir=cache,
                         offline=offline) from err
    except ValueError as err:  # huggingface_hub's validation of the repo id, revision or file name
        raise DownloadError(f"cannot ask the Hub for {filename} of {repo_id} (revision {revision}): {err}"
                            ) from err
    return verify_hub_file(entry, Path(path), repo_id=repo_id, filename=filename)


def hub_report(got: HubCheckout) -> str:
    """What the command prints for a verified Hub file: where it is, what was checked, how to use it.

    Args:
        got: The verified file.
    """
    entry = HUB_FILES[got.name]
    weights = ("" if entry.flag == "--vae_path" else
               "\n  weights: one state dict; EMA or raw is not stated by the upload (FID not measured here)")
    return (f"{got.name}: {got.filename} of {got.repo_id}@{got.commit} matches the released layout "
            f"({got.tensors} tensors, {'/'.join(got.dtypes)}){weights}\n"
            f"  path: {got.path}\n  use: {entry.flag} {got.path}")


def resolve_names(names: Sequence[str]) -> list[str]:
    """Expand ``all`` and drop duplicates, keeping the order given.

    Args:
        names: Names from the command line.
    """
    expanded = [n for name in names for n in (RELEASED_FILES if name == ALL else [name])]
    return list(dict.fromkeys(expanded))


def _parser() -> argparse.ArgumentParser:
    """Build the CLI parser (choices read from the registry at call time)."""
    parser = argparse.ArgumentParser(
        prog="python -m util.download",
        description="Download released MAR / VAE checkpoints (resumable).",
    )
    parser.add_argument("names", nargs="+", choices=[*RELEASED_FILES, ALL], metavar="name",
                        help=f"one or more of: {', '.join([*RELEASED_FILES, ALL])}")
    parser.add_argument("--source", choices=SOURCES, default="dropbox",
                        help="dropbox: upstream's .pth files (default); hf: the community .safetensors "
                             f"upload on the Hugging Face Hub ({HUB_REPO_ID}), checked against the released "
                             "layout; whether it holds EMA or raw weights is not stated")
    parser.add_argument("--dest", type=Path, default=None,
                        help=f"destination root of --source dropbox (default: {DEFAULT_DEST})")
    parser.add_argument("--overwrite", action="store_true",
                        help="re-download files that already exist")
    hub = parser.add_argument_group("--source hf")
    hub.add_argument("--repo_id", default=None, help=f"Hub repository (default: {HUB_REPO_ID})")
    hub.add_argument("--revision", default=None,
                     help=f"branch, tag or commit (default: {HUB_REVISION}); the report prints the commit")
    hub.add_argument("--filename", default=None,
                     help="file inside the repository, for a single name (default: the known name)")
    hub.add_argument("--cache_dir", type=Path, default=None,
                     help="Hugging Face cache (default: huggingface_hub's, from HF_HUB_CACHE / HF_HOME)")
    hub.add_argument("--offline", action="store_true",
                     help="the cache only, no network (as HF_HUB_OFFLINE=1)")
    return parser


_HUB_ONLY = ("repo_id", "revision", "filename", "cache_dir", "offline")


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, names: list[str]) -> None:
    """Refuse flags the chosen source would ignore, instead of ignoring them."""
    if args.source == "dropbox":
        given = [f"--{k}" for k in _HUB_ONLY if getattr(args, k) not in (None, False)]
        if given:
            parser.error(f"{', '.join(given)}: only with --source hf")
        return
    if args.dest is not None:
        parser.error("--dest applies to --source dropbox; Hub files stay in the Hugging Face cache "
                     "(--cache_dir), and the command prints their paths")
    if args.filename is not None and len(names) != 1:
        parser.error("--filename names the file of one name; give exactly one")
    if args.overwrite and (args.offline or huggingface_hub.constants.HF_HUB_OFFLINE):
        parser.error("--overwrite needs the network; drop --offline / HF_HUB_OFFLINE")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the process exit code.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    names = resolve_names(args.names)
    _check_flags(parser, args, names)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("huggingface_hub").propagate = False  # it has a handler of its own: no double lines
    try:
        for name in names:
            if args.source == "dropbox":
                download(name, args.dest or DEFAULT_DEST, overwrite=args.overwrite)
                continue
            got = download_from_hub(
                name, repo_id=args.repo_id or HUB_REPO_ID, revision=args.revision or HUB_REVISION,
                filename=args.filename, cache_dir=args.cache_dir, offline=args.offline,
                overwrite=args.overwrite)
            print(hub_report(got))
        if args.source == "hf" and any(HUB_FILES[n].flag == "--ckpt" for n in names):
            print(f"note: {UNKNOWN_WEIGHTS_NOTE}")
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
