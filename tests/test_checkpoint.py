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


# ------------------------------------------------------------------------------------------ .safetensors
def _save_safetensors(sd, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_safetensors_round_trip_loads_every_tensor_and_warns(tmp_path, caplog):
    src = {k: v.clone() for k, v in build_tiny_mar(seed=1).state_dict().items()}
    path = _save_safetensors(src, tmp_path / "mar-base.safetensors")
    for use_ema in (True, False):  # one state dict: the same tensors either way, never a guess
        model = build_tiny_mar(seed=2)
        assert not torch.equal(model.state_dict()["z_proj.weight"], src["z_proj.weight"])  # seeds differ
        with caplog.at_level("WARNING", logger="util.checkpoint"):
            caplog.clear()
            assert load_mar_weights(model, path, use_ema=use_ema) == {"metadata": {}}
        loaded = model.state_dict()
        assert list(loaded) == list(src)
        assert all(torch.equal(loaded[k], v) for k, v in src.items())
        warning, = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warning.startswith(f"loading {path} as one state dict: a .safetensors file holds one state dict "
                                  "and does not record whether it is the EMA")
        assert "which one it holds is not stated" in warning and "has not measured its FID" in warning


def test_safetensors_with_renamed_keys_names_the_first_differences(tmp_path):
    src = build_tiny_mar(seed=1).state_dict()
    path = _save_safetensors({f"model.{k}": v for k, v in src.items()}, tmp_path / "mar-base.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_mar_weights(build_tiny_mar(), path, model_name="mar_base")
    keys = list(src)
    renamed = sorted(f"model.{k}" for k in keys)  # a safetensors header lists its keys sorted
    msg = str(e.value)
    assert msg.startswith(f"{path} does not fit mar_base: the file is not a MAR model (first keys: "
                          f"{', '.join(renamed[:3])}), the model is width 32, 2+2 blocks, head 2x48; ")
    assert f"{len(keys)} missing keys (first: {', '.join(keys[:3])}); " in msg
    assert f"{len(keys)} unexpected keys (first: {', '.join(renamed[:3])}). " in msg
    assert msg.endswith("does not remap: use the released .pth files (`python -m util.download NAME`) instead.")


def test_safetensors_of_another_size_names_the_first_shape_mismatches(tmp_path):
    path = _save_safetensors(build_tiny_mar(seed=1, diffloss_w=64).state_dict(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_mar_weights(build_tiny_mar(), path)
    assert ("shape mismatches (first: diffloss.net.time_embed.mlp.0.weight: file (64, 256), model (48, 256), "
            "diffloss.net.time_embed.mlp.0.bias: file (64,), model (48,), ") in str(e.value)


def test_missing_safetensors_says_how_to_get_it_from_the_hub(tmp_path):
    path = tmp_path / "mar-base.safetensors"
    with pytest.raises(CheckpointError) as e:
        load_mar_weights(build_tiny_mar(), path, model_name="mar_base")
    assert str(e.value) == (f"checkpoint not found: {path}. Download it with `python -m util.download --source "
                            f"hf mar_base` (it goes to the Hugging Face cache; the command prints the path to pass "
                            f"here).")


def test_truncated_safetensors(tmp_path):
    path = _save_safetensors(build_tiny_mar().state_dict(), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated or not a safetensors file: .*Delete it and fetch it again"):
        load_mar_weights(build_tiny_mar(), path)


def test_vae_safetensors_round_trip_ignores_training_only_keys(tmp_path):
    src = AutoencoderKL(16, (1, 2), ch=32)
    sd = {**src.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(3)}
    path = _save_safetensors(sd, tmp_path / "kl16.safetensors")
    dst = AutoencoderKL(16, (1, 2), ch=32)
    load_vae_weights(dst, path)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    del sd["decoder.conv_out.bias"]
    _save_safetensors(sd, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(first: decoder.conv_out.bias\)\. .*does not remap"):
        load_vae_weights(AutoencoderKL(16, (1, 2), ch=32), path)


def test_schema_differences_lists_the_first_keys_of_each_kind():
    from util.checkpoint import schema_differences
    expected = {"a": (1,), "b": (2,), "c": (3,), "d": (4,), "e": (5,)}
    assert schema_differences(expected, dict(expected)) is None
    found = {"a": (9,), "e": (5,), "x": (1,), "y": (1,), "z": (1,), "w": (1,)}
    assert schema_differences(expected, found) == (
        "1 shape mismatches (first: a: file (9,), model (1,)); 3 missing keys (first: b, c, d); "
        "4 unexpected keys (first: x, y, z)")
    assert schema_differences(expected, found, allow_extra=True) == (
        "1 shape mismatches (first: a: file (9,), model (1,)); 3 missing keys (first: b, c, d)")
