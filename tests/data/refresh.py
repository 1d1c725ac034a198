"""Refresh the shipped reference vectors from the project workspace's ``../shared/reference``.

    python tests/data/refresh.py [--source DIR] [--check]

Copies every ``*.pt`` and ``*.state_dict.txt`` (and the source README as ``UPSTREAM_NOTES.md``) into
this folder, checks each copy's sha256 against its source, and rewrites ``SHA256SUMS`` (keeping the
lines of :data:`MADE_HERE`, which ``presets.py`` writes). ``--check``
copies nothing: it verifies the files here against ``SHA256SUMS`` (what ``tests/test_reference_data.py``
also does).
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[2] / "shared" / "reference"  # <repo>/../shared/reference
SUMS = HERE / "SHA256SUMS"
# Vectors made in this folder from this project's own code (``presets.py``), not copied from the source:
# a refresh keeps their SHA256SUMS lines.
MADE_HERE = ("presets_tiny.pt",)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sums(path: Path | None = None) -> dict[str, str]:
    """``{file name: sha256}`` from a ``sha256sum``-format file (default: this folder's ``SHA256SUMS``)."""
    out = {}
    for line in (path or SUMS).read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name.strip()] = digest
    return out


def check() -> list[str]:
    """Problems with the files here (missing or altered), empty when all match ``SHA256SUMS``."""
    problems = []
    for name, digest in read_sums().items():
        path = HERE / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256(path) != digest:
            problems.append(f"{name}: sha256 differs from SHA256SUMS")
    return problems


def refresh(source: Path) -> None:
    files = sorted(source.glob("*.pt")) + sorted(source.glob("*.state_dict.txt"))
    if not files:
        raise SystemExit(f"no reference vectors in {source}")
    pairs = [(src, HERE / src.name) for src in files] + [(source / "README.md", HERE / "UPSTREAM_NOTES.md")]
    lines = [f"{digest}  {name}" for name, digest in read_sums().items() if name in MADE_HERE]
    for src, dst in pairs:
        shutil.copyfile(src, dst)
        digest = sha256(dst)
        if digest != sha256(src):
            raise SystemExit(f"copy of {src} is corrupt")
        lines.append(f"{digest}  {dst.name}")
        print(f"{digest}  {dst.name}")
    SUMS.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--check", action="store_true", help="verify the files here against SHA256SUMS only")
    args = p.parse_args(argv)
    if args.check:
        problems = check()
        print("\n".join(problems) or f"all {len(read_sums())} files match SHA256SUMS")
        return 1 if problems else 0
    refresh(args.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
