"""Checkpoint loading in the released formats, and every error a user can hit."""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_mar
from models.vae import AutoencoderKL
from util.checkpoint import CheckpointError, load_mar_weights, load_vae_weights, mar_checkpoint_path


@pytest.fixture
def released_file(tmp_path):
    """A checkpoint in the released layout whose EMA and raw weights differ."""
    src = build_tiny_mar(seed=1)
    raw = {k: v.clone() for k, v in src.state_dict().items()}
    ema = {k: v + 1.0 for k, v in raw.items()}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": raw, "model_ema": ema, "epoch": 3}, path)
    return path, raw, ema


def test_loads_ema_by_default(released_file):
    path, raw, ema = released_file
    model = build_tiny_mar(seed=2)
    load_mar_weights(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k])


def test_loads_raw_weights_when_asked(released_file):
    path, raw, ema = released_file
    model = build_tiny_mar(seed=2)
    load_mar_weights(model, path, use_ema=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k])


def test_checkpoint_with_training_args_loads(tmp_path):
    import argparse
    src = build_tiny_mar(seed=1)
    ema = {k: v + 0.5 for k, v in src.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict(), "model_ema": ema,
                "args": argparse.Namespace(lr=1e-4, model="mar_base")}, path)
    model = build_tiny_mar(seed=2)
    assert not torch.equal(model.state_dict()["z_proj.weight"], ema["z_proj.weight"])  # seeds differ
    load_mar_weights(model, path)
    loaded = model.state_dict()
    assert list(loaded) == list(ema)
    for k, v in loaded.items():
        assert torch.equal(v, ema[k]), k


def test_missing_file_says_where_to_get_it(tmp_path):
    path = mar_checkpoint_path("mar_base", tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_mar_weights(build_tiny_mar(), path, model_name="mar_base")
    msg = str(e.value)
    assert "python -m util.download mar_base" in msg
    assert "pretrained_models/mar/mar_base/checkpoint-last.pth" in msg
    assert str(path) in msg


def test_missing_vae_file_says_where_to_get_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"python -m util.download vae.*pretrained_models/vae/kl16.ckpt"):
        load_vae_weights(AutoencoderKL(16, (1, 2), ch=32), tmp_path / "kl16.ckpt")


def test_wrong_model_size_names_both(released_file):
    path, _, _ = released_file
    bigger = build_tiny_mar(encoder_embed_dim=64, decoder_embed_dim=64, encoder_depth=3)
    with pytest.raises(CheckpointError) as e:
        load_mar_weights(bigger, path, model_name="mar_large")
    msg = str(e.value)
    assert "width 32, 2+2 blocks" in msg and "width 64, 3+2 blocks" in msg and "mar_large" in msg


def test_truncated_file(released_file):
    path, _, _ = released_file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        load_mar_weights(build_tiny_mar(), path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    path.write_text("<html>Dropbox: file not found</html>")
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        load_mar_weights(build_tiny_mar(), path)


def test_vae_file_given_as_mar(tmp_path):
    vae = AutoencoderKL(16, (1, 2), ch=32)
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": vae.state_dict()}, path)
    with pytest.raises(CheckpointError, match="no 'model_ema' entry"):
        load_mar_weights(build_tiny_mar(), path)
    with pytest.raises(CheckpointError, match="a VAE"):
        load_mar_weights(build_tiny_mar(), path, use_ema=False)


def test_vae_ignores_training_only_keys(tmp_path):
    src = AutoencoderKL(16, (1, 2), ch=32)
    sd = {**src.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(3)}
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": sd, "optimizer": {}}, path)
    dst = AutoencoderKL(16, (1, 2), ch=32)
    load_vae_weights(dst, path)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k])


def test_vae_missing_key_is_an_error(tmp_path):
    sd = AutoencoderKL(16, (1, 2), ch=32).state_dict()
    sd.pop("decoder.conv_out.bias")
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="missing keys.*decoder.conv_out.bias"):
        load_vae_weights(AutoencoderKL(16, (1, 2), ch=32), path)


def test_vae_weights_load_from_file(tmp_path):
    """The VAE reads no files itself (models/ stays below util/): load_vae_weights fills every tensor."""
    src = AutoencoderKL(16, (1, 2), ch=32)
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": src.state_dict()}, path)
    dst = AutoencoderKL(16, (1, 2), ch=32)
    load_vae_weights(dst, path)
    loaded = dst.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in src.state_dict().items())


def test_atomic_path_keeps_the_old_file_when_a_write_fails(tmp_path):
    from util.checkpoint import atomic_path
    target = tmp_path / "rows.json"
    with atomic_path(target) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]
