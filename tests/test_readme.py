"""Every Python example of the README runs as written, each in a fresh interpreter.

One substitution, so that an example runs in seconds on a CPU: ``mar_base``, ``mar_large`` and
``mar_huge`` build the tests' tiny MAR (``conftest.TINY_MAR``: the same class at test sizes, 10 head
steps, ImageNet's 1000 classes). It is installed by importing ``models.mar`` alone, so an example that needs another of our
modules must import it itself (the import-order trap of issue 23 fails here).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PRELUDE = """\
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import models.mar
from conftest import TINY_MAR


def tiny(**kwargs):
    return models.mar._mar(**{{**TINY_MAR, "class_num": 1000, **kwargs}})


models.mar.mar_base = models.mar.mar_large = models.mar.mar_huge = tiny
assert "lazymar" not in sys.modules
"""


def examples() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_the_readme_has_examples():
    assert len(examples()) >= 3


@pytest.mark.parametrize("index", range(len(examples())))
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / f"example_{index}.py"
    script.write_text(PRELUDE.format(root=str(ROOT), tests=str(ROOT / "tests")) + examples()[index])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README example {index} failed:\n{examples()[index]}\n{done.stderr[-3000:]}"


PACKAGES = ("models", "lazymar", "util", "evaluation", "benchmarks", "demo")


def layout() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Layout"):text.index("## License")]


def test_layout_matches_the_tree():
    """Every module of every package and every script is in the README's layout, and every file the
    layout names exists."""
    section = layout()
    listed = {}
    for line in section.splitlines():
        folder = line.split()[0] if line[:1].strip() else None
        if folder:
            current = folder
        listed.setdefault(current if line.strip() else None, set()).update(re.findall(r"\b([\w]+\.(?:py|md|sh))\b", line))
    for package in PACKAGES:
        modules = {f.name for f in (ROOT / package).iterdir() if f.suffix in (".py", ".md", ".sh")} - {"__init__.py"}
        assert modules == listed.get(f"{package}/", set()), package
    for script in ("eval.py", "sample.py", "train.py"):
        assert script in listed, script
    assert {f.name for f in (ROOT / "docs").glob("*.md")} == listed["docs/"]


def test_a_preset_name_without_lazymar_says_which_call_works(tmp_path):
    """``models/`` does not import ``lazymar``: a bare name there is refused, naming the call that works."""
    script = tmp_path / "name.py"
    script.write_text(PRELUDE.format(root=str(ROOT), tests=str(ROOT / "tests")) + (
        "from models.mar import mar_base\n"
        "try:\n"
        "    mar_base().sample_tokens(1, num_iter=2, accel='lazymar')\n"
        "except ValueError as e:\n"
        "    print(e)\n"))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accel=lazymar.preset('lazymar')" in done.stdout
