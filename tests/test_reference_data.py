"""The reference vectors ship with the tests: none missing, none altered, none referenced but absent.

The equivalence tests must never skip for want of their evidence; this file fails instead.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from conftest import REFERENCE_DIR

TESTS = Path(__file__).resolve().parent
# Names a test reads from the reference folder: load_reference(<dir>, "name") or <dir> / "name".
NAME_IN_CALL = re.compile(r"""load_reference\(\s*\w+\s*,\s*f?["']([^"']+)["']""")
NAME_IN_PATH = re.compile(r"""reference_dir\s*/\s*f?["']([^"']+)["']""")


def refresh_module():
    spec = importlib.util.spec_from_file_location("refresh", REFERENCE_DIR / "refresh.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def referenced_names() -> set[str]:
    names = set()
    for path in TESTS.glob("*.py"):
        text = path.read_text()
        names |= set(NAME_IN_CALL.findall(text)) | set(NAME_IN_PATH.findall(text))
    return names


def test_reference_folder_is_inside_the_repository():
    assert REFERENCE_DIR == TESTS / "data" and REFERENCE_DIR.is_dir()


def test_every_shipped_file_matches_its_checksum():
    refresh = refresh_module()
    sums = refresh.read_sums()
    assert refresh.check() == []
    # The vectors the equivalence tests use, listed literally so that dropping one from SHA256SUMS fails.
    expected = {"mar_tiny_baseline.pt", "lazymar_tiny.pt", "vae_tiny.pt", "disa_tiny.pt", "recap_tiny.pt",
                "mar_base.state_dict.txt", "mar_large.state_dict.txt", "mar_huge.state_dict.txt",
                "vae_kl16.state_dict.txt", "presets_tiny.pt"}
    assert expected <= set(sums), expected - set(sums)


def test_no_unlisted_vector_files():
    on_disk = {p.name for p in REFERENCE_DIR.iterdir() if p.suffix in (".pt", ".txt")}
    assert on_disk <= set(refresh_module().read_sums()), on_disk - set(refresh_module().read_sums())


def test_every_vector_a_test_names_is_shipped():
    names = referenced_names()
    assert {"lazymar_tiny.pt", "mar_tiny_baseline.pt", "vae_tiny.pt"} <= names  # the scan finds them
    literal = {n for n in names if "{" not in n}
    missing = sorted(n for n in literal if not (REFERENCE_DIR / n).is_file())
    assert not missing, f"referenced by tests but not in tests/data: {missing}"
    # f-string names (f"{name}.state_dict.txt"): every released size the schema test takes must be there.
    for pattern in (n for n in names if "{" in n):
        suffix = pattern.split("}")[-1]
        assert list(REFERENCE_DIR.glob(f"*{suffix}")), f"no file in tests/data for {pattern!r}"


def test_checksum_check_catches_an_altered_file(tmp_path, monkeypatch):
    refresh = refresh_module()
    (tmp_path / "a.pt").write_bytes(b"vector")
    (tmp_path / "SHA256SUMS").write_text(f"{refresh.sha256(tmp_path / 'a.pt')}  a.pt\n"
                                         f"{'0' * 64}  b.pt\n")
    monkeypatch.setattr(refresh, "HERE", tmp_path)
    monkeypatch.setattr(refresh, "SUMS", tmp_path / "SHA256SUMS")
    assert refresh.check() == ["b.pt: missing"]
    (tmp_path / "a.pt").write_bytes(b"vectoR")
    assert refresh.check() == ["a.pt: sha256 differs from SHA256SUMS", "b.pt: missing"]


@pytest.mark.parametrize("name", ["lazymar_tiny.pt", "mar_tiny_baseline.pt"])
def test_missing_vector_fails_rather_than_skips(tmp_path, name):
    from conftest import load_reference
    with pytest.raises(pytest.fail.Exception, match="missing"):
        load_reference(tmp_path, name)
