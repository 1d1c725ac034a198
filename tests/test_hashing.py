"""util.hashing: file digests cached by (path, size, mtime, inode, ctime), and digests of in-memory weights."""
from __future__ import annotations

import json
import os

import pytest
import torch.nn as nn

import util.hashing as hashing


def test_cached_digest_is_reused_until_the_file_changes(tmp_path, monkeypatch):
    f, cache = tmp_path / "w.bin", tmp_path / "cache.json"
    f.write_bytes(b"first")
    first = hashing.cached_file_sha256(f, cache)
    assert first == hashing.file_sha256(f) and len(json.loads(cache.read_text())) == 1

    calls = []
    real = hashing.file_sha256
    monkeypatch.setattr(hashing, "file_sha256", lambda p: calls.append(p) or real(p))
    assert hashing.cached_file_sha256(f, cache) == first and calls == []  # untouched: read back

    f.write_bytes(b"other")  # replaced at the same path (same size; the mtime moves)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = hashing.cached_file_sha256(f, cache)
    assert second != first and len(calls) == 1
    assert list(json.loads(cache.read_text()).values()) == [second]  # the stale entry is dropped


def test_a_replacement_with_the_same_size_and_mtime_is_hashed_again(tmp_path, monkeypatch):
    """``cp -p`` / ``rsync -t`` of another file over the checkpoint: same path, size and mtime."""
    f, other, cache = tmp_path / "w.bin", tmp_path / "new.bin", tmp_path / "cache.json"
    f.write_bytes(b"first")
    first = hashing.cached_file_sha256(f, cache)
    other.write_bytes(b"other")
    st = f.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old file's mtime, preserved
    os.replace(other, f)
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert hashing.cached_file_sha256(f, cache) == hashing.file_sha256(f) != first

    # Rewritten in place (same inode) with the mtime set back: the ctime still moves.
    st = f.stat()
    f.write_bytes(b"third")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_ino == st.st_ino and f.stat().st_mtime_ns == st.st_mtime_ns
    assert hashing.cached_file_sha256(f, cache) == hashing.file_sha256(f)


def test_a_damaged_cache_is_rebuilt(tmp_path):
    f, cache = tmp_path / "w.bin", tmp_path / "cache.json"
    f.write_bytes(b"x")
    cache.write_text('{"cut by a ki')
    assert hashing.cached_file_sha256(f, cache) == hashing.file_sha256(f)
    assert json.loads(cache.read_text())


def test_state_dict_digest_sees_values_and_buffers():
    a, b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    assert hashing.state_dict_sha256(a) == hashing.state_dict_sha256(b)
    b.num_batches_tracked += 1  # a 0-d buffer
    assert hashing.state_dict_sha256(a) != hashing.state_dict_sha256(b)
    with pytest.raises(FileNotFoundError):
        hashing.cached_file_sha256("/nonexistent/file", "/tmp/unused.json")
