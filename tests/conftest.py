"""Shared fixtures: the reference vectors folder, tiny model configs, deterministic CPU defaults."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn as nn

if TYPE_CHECKING:
    from models.mar import MAR

# Upstream equivalence vectors and released state-dict schemas, shipped with the tests so that every
# clone runs the faithfulness checks (provenance and refresh: tests/data/README.md).
REFERENCE_DIR = Path(__file__).resolve().parent / "data"

# A MAR small enough to sample in well under a second on one CPU core.
TINY_MAR = dict(img_size=64, vae_stride=16, patch_size=1, vae_embed_dim=16, class_num=10,
                encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=4,
                decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
                mlp_ratio=2.0, buffer_size=4, diffloss_d=2, diffloss_w=48, num_sampling_steps="10")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    # Never a skip: the vectors ship with the repository, so a missing folder is a broken checkout.
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference vectors missing: {REFERENCE_DIR} (see tests/data/README.md)")
    return REFERENCE_DIR


def load_reference(reference_dir: Path, name: str) -> dict:
    path = reference_dir / name
    if not path.is_file():
        pytest.fail(f"reference vector {name} missing from {reference_dir} (see tests/data/README.md)")
    return torch.load(path, map_location="cpu", weights_only=False)


def build_tiny_mar(seed: int = 0, **overrides) -> "MAR":
    """A tiny randomly initialised MAR in eval mode, with non-zero adaLN weights so the head is not trivial."""
    from models.mar import MAR
    torch.manual_seed(seed)
    config = {**TINY_MAR, **overrides}
    model = MAR(norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), **config).eval()
    with torch.no_grad():  # adaLN-Zero init would make the head output exactly 0: perturb it
        for name, p in model.diffloss.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.02)
    return model


@pytest.fixture
def tiny_mar():
    return build_tiny_mar()


@pytest.fixture(autouse=True)
def _cpu_threads():
    torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """One torch thread for the test, the count before restored after (tests that run the scripts, which
    set threads of their own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def inductor_default_random():
    """Inductor's own random stream (``fallback_random`` off, its default) for the test, restored after.

    Through the config module's ``patch`` rather than ``monkeypatch.setattr``: the config module's
    attributes are not in its ``__dict__``, and pytest 9.2's undo deletes such an attribute instead of
    restoring it, leaving ``torch._inductor.config`` without the setting for every later test."""
    import torch._inductor.config as inductor_config
    with inductor_config.patch(fallback_random=False):
        yield


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A demo tokenizer trained for 3 steps (train.py and its step tests need one; quality irrelevant)."""
    from demo.tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("tok") / "tokenizer.pt"
    torch.set_num_threads(1)
    summary = train_tokenizer(out, num_per_class=2, epochs=1, batch_size=8, max_steps=3, progress=False,
                              psnr_images=12)
    assert len(summary["losses"]) == 3
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    return out
