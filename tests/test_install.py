"""What a newcomer installs is what is tested: requirements.txt, pyproject.toml and environment.yaml
agree, constraints.txt pins a version inside every range, CI runs the README's own install and test
lines, and ``pip install .`` builds a package with the library's modules."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


def requirements() -> dict[str, Requirement]:
    reqs = [Requirement(ln) for ln in requirement_lines(ROOT / "requirements.txt")]
    return {canonicalize_name(r.name): r for r in reqs}


def pins() -> dict[str, str]:
    out = {}
    for ln in requirement_lines(ROOT / "constraints.txt"):
        name, version = ln.split("==")
        out[canonicalize_name(name)] = version
    return out


def test_pyproject_declares_the_requirements_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    assert {canonicalize_name(r.name): str(r.specifier) for r in declared} == \
        {name: str(r.specifier) for name, r in requirements().items()}


def test_environment_yaml_installs_requirements_with_the_pins():
    text = (ROOT / "environment.yaml").read_text()
    assert re.search(r"^\s*- -r requirements\.txt$", text, re.M)
    assert re.search(r"^\s*- -c constraints\.txt$", text, re.M)
    assert re.search(r"^\s*- python=3\.11$", text, re.M)  # the Python the pins were resolved on


def test_every_requirement_is_pinned_inside_its_range():
    pinned = pins()
    for name, req in requirements().items():
        assert name in pinned, f"{name} has no tested version in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (name, pinned[name], str(req.specifier))
    assert pinned["torch"] == "2.14.1" and pinned["pytest"] == "9.2.0"  # what the README states


def test_ci_runs_the_readme_install_and_test_lines():
    out = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.splitlines()
    assert out == ["pip install -r requirements.txt -c constraints.txt", "python -m pytest -q"]
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    for command in out:
        assert sum(re.fullmatch(re.escape(command) + r"\s+# .*", ln) is not None
                   for ln in first_block.splitlines()) == 1, command
    script = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in script and 'eval "$install"' in script and 'eval "$tests"' in script


def test_pip_install_builds_a_wheel_with_the_library(tmp_path):
    pytest.importorskip("setuptools")  # pip installs it with the pins; `--no-build-isolation` needs it here
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    wheel, = tmp_path.glob("lazymar-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("models/mar.py", "lazymar/__init__.py", "util/generate.py", "demo/registry.py"):
        assert module in names, module
    assert not any(n.startswith("tests/") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    declared = {canonicalize_name(Requirement(ln.split(":", 1)[1].strip()).name)
                for ln in metadata.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln}
    assert declared == set(requirements()) - {"pytest"}
