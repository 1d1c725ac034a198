"""Every preset samples what it sampled before the refactors: the tokens recorded in
``tests/data/presets_tiny.pt`` (made by ``tests/data/presets.py`` at the commit stored in the file).

On the platform that recorded them (same torch build, CPU architecture and kernel capability) the
tokens must be bit-identical. Elsewhere other kernels round differently, and the tokens are held to the
equivalence vectors' tolerance (1e-5 relative) instead.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REFERENCE_DIR, build_tiny_mar, load_reference
from test_reference import TOL, rel_err


def presets_module():
    spec = importlib.util.spec_from_file_location("presets", REFERENCE_DIR / "presets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recorded(reference_dir):
    stored = load_reference(reference_dir, "presets_tiny.pt")
    return stored, build_tiny_mar(seed=stored["seed"], **stored["model"]), presets_module()


def cases() -> list:
    from lazymar import PRESETS
    return [(name, cfg) for name in (None, *PRESETS) for cfg in (1.0, 3.0)]


def test_every_preset_is_recorded(recorded):
    stored, _, _ = recorded
    assert set(stored["outputs"]) == set(cases())


@pytest.mark.parametrize("name, cfg", cases(), ids=lambda v: str(v))
def test_preset_tokens_unchanged(recorded, name, cfg):
    stored, model, presets = recorded
    ref = stored["outputs"][(name, cfg)]
    out = presets.sample(model, name, cfg, stored["orders"], stored["labels"])
    if presets.platform_key() == stored["platform"]:
        assert torch.equal(out, ref), f"{name} at cfg {cfg} moved by {rel_err(out, ref):.2e}"
    else:
        assert rel_err(out, ref) < TOL
