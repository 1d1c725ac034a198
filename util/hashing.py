"""SHA-256 digests of files and in-memory weights, to record what produced a result.

A multi-GB checkpoint takes seconds to hash, so :func:`cached_file_sha256` keeps digests in a small
JSON file keyed by (resolved path, size, modification time, inode, status-change time): a rerun on an
untouched file reads the digest back, and a file replaced at the same path is hashed again, even one
copied over with its size and modification time preserved (``cp -p``, ``rsync -t``, ``os.replace`` of a
file whose mtime was set back): a new file has a new inode, and writing or renaming sets the ctime, which
no user call can set back.

:func:`source_sha256` digests source files, so that a saved result records the code that produced it
(eval.py's run identity, the planner's results file).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn


def source_sha256(root: str | os.PathLike, sources: tuple[str, ...], exclude: frozenset[str] = frozenset()) -> str:
    """Digest of the Python files under ``sources`` (files or folders, relative to ``root``) but not in
    ``exclude`` (relative paths): their relative paths and contents, in sorted order per source."""
    root = Path(root)
    h = hashlib.sha256()
    for source in sources:
        files = sorted((root / source).rglob("*.py")) if (root / source).is_dir() else [root / source]
        for f in files:
            name = f.relative_to(root).as_posix()
            if name not in exclude:
                h.update(f"{name}\0".encode() + f.read_bytes() + b"\0")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_file_sha256(path: str | os.PathLike, cache_file: str | os.PathLike) -> str:
    """:func:`file_sha256` of ``path``, read from / recorded in the JSON ``cache_file``."""
    path, cache_file = Path(path).resolve(), Path(cache_file)
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # first use, or a file cut by a kill: rebuild
        cache = {}
    if key in cache:
        return cache[key]
    digest = file_sha256(path)
    # Entries of the same path with another size, mtime, inode or ctime describe a replaced file: drop them.
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")} | {key: digest}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f"{cache_file.name}.tmp-{os.getpid()}")  # per process: writers may race
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    os.replace(tmp, cache_file)
    return digest


def state_dict_sha256(*modules: nn.Module) -> str:
    """Digest of the parameters and buffers (names, dtypes, shapes, values) of ``modules``, in order."""
    h = hashlib.sha256()
    for module in modules:
        for name, t in module.state_dict().items():
            t = t.detach().cpu().contiguous().reshape(-1)  # 1-d: 0-d tensors cannot be viewed as bytes
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
