"""Every Python example of the README and of the pages in docs/ runs as written, each in a fresh
interpreter; every relative link of those pages resolves; the README's layout matches the tree.

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


def pages() -> list[Path]:
    """The README and every page in docs/: where the examples and the links live."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def examples() -> list[tuple[str, str]]:
    """(an id naming the page and the example's place in it, the example's code)."""
    found = []
    for page in pages():
        name = page.relative_to(ROOT).as_posix()
        found += [(f"{name}:{i}", code) for i, code in enumerate(BLOCK.findall(page.read_text()))]
    return found


def test_the_readme_has_examples():
    ids = [name for name, _ in examples()]
    assert len(ids) >= 3
    assert any(name.startswith("README.md:") for name in ids)  # the README itself shows the API


@pytest.mark.parametrize("name, code", examples(), ids=[name for name, _ in examples()])
def test_readme_example_runs(name, code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(PRELUDE.format(root=str(ROOT), tests=str(ROOT / "tests")) + code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"example {name} failed:\n{code}\n{done.stderr[-3000:]}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_relative_links_resolve():
    """Every relative link and image of the README and of docs/*.md names a file that exists, and a link
    to a heading (``page.md#heading``, ``#heading``) names a heading of that page."""
    broken = []
    for page in pages():
        for match in LINK.finditer(FENCE.sub("", page.read_text())):
            target = match.group(1) or match.group(2)
            if re.match(r"[a-z]+:", target):  # https:, mailto:: not ours to check offline
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


PACKAGES = ("models", "lazymar", "util", "evaluation", "benchmarks", "demo")


def layout() -> str:
    """The README's layout section: from its heading to the next section's."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Layout")
    return text[start:text.index("\n## ", start)]


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
