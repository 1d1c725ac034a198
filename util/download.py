"""Fetch the released MAR / VAE checkpoints.

Usage::

    python -m util.download vae mar_base [--dest pretrained_models] [--overwrite]
    python -m util.download all

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
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from tqdm import tqdm

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
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST,
                        help=f"destination root (default: {DEFAULT_DEST})")
    parser.add_argument("--overwrite", action="store_true",
                        help="re-download files that already exist")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the process exit code.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in resolve_names(args.names):
            download(name, args.dest, overwrite=args.overwrite)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
