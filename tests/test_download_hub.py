"""``python -m util.download --source hf`` against a Hugging Face cache laid out on disk, offline (no network).

The fake cache has the layout huggingface_hub writes (``models--owner--name/{blobs,snapshots,refs}``), holding
tiny ``.safetensors`` files whose layout the tiny models of the tests define; the registry is pointed at
those tiny models the way ``tests/test_download.py`` points the Dropbox registry at a loopback server.
"""
from __future__ import annotations

import functools
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from conftest import REFERENCE_DIR, TINY_MAR, build_tiny_mar
from models.mar import mar_from_config
from models.vae import AutoencoderKL
from util import download as dl
from util.checkpoint import load_mar_weights, load_vae_weights

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "owner/tiny-mar"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_VAE = dict(embed_dim=16, ch_mult=(1, 2), ch=32)


def tiny_hub_files() -> dict[str, dl.HubFile]:
    """The real registry's names and file names, with the tests' tiny models as the layouts to match."""
    real = dl.HUB_FILES
    return {
        "vae": dl.HubFile("vae", real["vae"].filename, functools.partial(AutoencoderKL, **TINY_VAE),
                          "--vae_path", 1, extra_keys_ok=True),
        "mar_base": dl.HubFile("mar_base", real["mar_base"].filename, functools.partial(mar_from_config, TINY_MAR),
                               "--ckpt", 1),
    }


def write_hub_cache(cache: Path, files: dict[str, dict[str, torch.Tensor]], *, repo_id: str = REPO_ID,
                    commit: str = COMMIT, ref: str = "main") -> Path:
    """Lay ``files`` (repository path -> state dict) out as huggingface_hub's cache does: the bytes in
    ``blobs/<sha256>``, relative symlinks to them in ``snapshots/<commit>/``, ``refs/<ref>`` holding the commit.
    Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for filename, sd in files.items():
        tmp = cache / "incoming.safetensors"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        blob = repo / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, blob)
        link = snapshot / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def sources() -> dict[str, dict[str, torch.Tensor]]:
    """The weights the fake upload holds, by name."""
    torch.manual_seed(3)
    vae = AutoencoderKL(**TINY_VAE).state_dict()
    return {"mar_base": build_tiny_mar(seed=1).state_dict(), "vae": vae}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline mode as a user sets it, and no socket at all.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, when it is imported, into ``constants.HF_HUB_OFFLINE``,
    which it (and util.download) consult afterwards; this process imported it long ago, so the constant is
    set beside the variable (``test_env_only_in_a_fresh_interpreter`` covers the variable alone).
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # never the user's token or cache

    def refuse(*args, **kwargs):  # pytest.fail: a BaseException, which no library handler swallows
        pytest.fail(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def tiny_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, dl.HubFile]:
    registry = tiny_hub_files()
    monkeypatch.setattr(dl, "HUB_FILES", registry)
    return registry


def _hf(*args: str) -> list[str]:
    return ["--source", "hf", "--repo_id", REPO_ID, *args]


def test_offline_cache_end_to_end(offline, tiny_registry, sources, tmp_path, capsys):
    """Resolved from the cache, verified, reported; the reported paths load into the models bit for bit."""
    cache = tmp_path / "hub"
    files = {tiny_registry[n].filename: sd for n, sd in sources.items()}
    snapshot = write_hub_cache(cache, files)
    blobs_before = sorted(p.name for p in (cache / "models--owner--tiny-mar" / "blobs").iterdir())

    assert dl.main(_hf("vae", "mar_base", "--cache_dir", str(cache))) == 0
    out = capsys.readouterr().out.splitlines()
    vae_path, mar_path = snapshot / "kl16.safetensors", snapshot / "mar-base.safetensors"
    assert out[:3] == [
        f"vae: kl16.safetensors of {REPO_ID}@{COMMIT} matches the released layout "
        f"({len(sources['vae'])} tensors, F32)",
        f"  path: {vae_path}",
        f"  use: --vae_path {vae_path}",
    ]
    assert out[3:7] == [
        f"mar_base: mar-base.safetensors of {REPO_ID}@{COMMIT} matches the released layout "
        f"({len(sources['mar_base'])} tensors, F32)",
        "  weights: one state dict; EMA or raw is not stated by the upload (FID not measured here)",
        f"  path: {mar_path}",
        f"  use: --ckpt {mar_path}",
    ]
    assert out[7].startswith("note: a .safetensors file holds one state dict and does not record whether")
    assert sorted(p.name for p in (cache / "models--owner--tiny-mar" / "blobs").iterdir()) == blobs_before

    mar = build_tiny_mar(seed=2)
    load_mar_weights(mar, mar_path)
    assert all(torch.equal(mar.state_dict()[k], v) for k, v in sources["mar_base"].items())
    vae = AutoencoderKL(**TINY_VAE)
    load_vae_weights(vae, vae_path)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in sources["vae"].items())


def test_revision_and_filename_overrides(offline, tiny_registry, sources, tmp_path):
    cache = tmp_path / "hub"
    snapshot = write_hub_cache(cache, {"weights/renamed.safetensors": sources["mar_base"]}, ref="v2")
    for revision in ("v2", COMMIT):  # a ref is read from refs/, a commit hash is a snapshot folder
        got = dl.download_from_hub("mar_base", repo_id=REPO_ID, revision=revision,
                                   filename="weights/renamed.safetensors", cache_dir=cache)
        assert got == dl.HubCheckout("mar_base", snapshot / "weights" / "renamed.safetensors", REPO_ID, COMMIT,
                                     "weights/renamed.safetensors", len(sources["mar_base"]), ("F32",))


def test_file_with_other_key_names_is_refused_with_the_first_differences(offline, tiny_registry, sources,
                                                                         tmp_path, capsys):
    cache = tmp_path / "hub"
    renamed = {f"model.{k}": v for k, v in sources["mar_base"].items()}
    snapshot = write_hub_cache(cache, {"mar-base.safetensors": renamed})
    assert dl.main(_hf("mar_base", "--cache_dir", str(cache))) == 1
    err = capsys.readouterr().err
    keys, found = list(sources["mar_base"]), sorted(renamed)  # the file lists its keys sorted
    n = len(keys)
    assert (f"error: mar-base.safetensors of {REPO_ID}@{COMMIT} ({snapshot / 'mar-base.safetensors'}) does not "
            f"have the released mar_base layout: {n} missing keys (first: {', '.join(keys[:3])}); {n} unexpected "
            f"keys (first: {', '.join(found[:3])}). The file holds {n} tensors (not a MAR model (first keys: "
            f"{', '.join(found[:3])})). This project loads upstream's key names and shapes only and does not "
            "rename keys by guess, so the file is not used (it stays in the Hugging Face cache). Check "
            "--repo_id / --revision / --filename, or use the released files: `--source dropbox`.") in err
    assert "Traceback" not in err


def test_file_of_another_size_is_refused(offline, tiny_registry, tmp_path, capsys):
    cache = tmp_path / "hub"
    deeper = build_tiny_mar(diffloss_d=3).state_dict()  # a third residual block in the head
    write_hub_cache(cache, {"mar-base.safetensors": deeper})
    assert dl.main(_hf("mar_base", "--cache_dir", str(cache))) == 1
    extra = sorted(k for k in deeper if k.startswith("diffloss.net.res_blocks.2."))
    assert len(extra) == 8
    assert (f"does not have the released mar_base layout: 8 unexpected keys (first: {', '.join(extra[:3])}). "
            f"The file holds {len(deeper)} tensors (width 32, 2+2 blocks, head 3x48).") in capsys.readouterr().err


def test_vae_file_with_training_only_keys_passes_like_the_loader(offline, tiny_registry, sources, tmp_path):
    cache = tmp_path / "hub"
    write_hub_cache(cache, {"kl16.safetensors": {**sources["vae"], "loss.logvar": torch.zeros(())}})
    got = dl.download_from_hub("vae", repo_id=REPO_ID, cache_dir=cache)
    assert got.tensors == len(sources["vae"]) + 1


def test_missing_file_offline_says_what_to_do(offline, tiny_registry, sources, tmp_path, capsys):
    cache = tmp_path / "hub"
    write_hub_cache(cache, {"kl16.safetensors": sources["vae"]})
    assert dl.main(_hf("vae", "mar_base", "--cache_dir", str(cache))) == 1
    out, err = capsys.readouterr()
    assert out.startswith("vae: kl16.safetensors of")  # the cached one was reported before the failure
    assert err == (
        f"error: mar-base.safetensors of {REPO_ID} (revision main) is not in the Hugging Face cache {cache}, and "
        "offline mode is on (--offline or HF_HUB_OFFLINE=1), so nothing was downloaded. Run the same command once "
        "where the Hub is reachable, without --offline and with HF_HUB_OFFLINE unset, to fill the cache (or copy "
        "the cache folder from a machine that has the file), then run offline again.\n")


def test_offline_flag_alone_reads_the_cache_only(monkeypatch, tiny_registry, sources, tmp_path, capsys):
    """``--offline`` without the environment variable: local files only, no socket either."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail(f"network access attempted: {a}"))
    cache = tmp_path / "hub"
    assert dl.main(_hf("mar_base", "--cache_dir", str(cache), "--offline")) == 1
    assert "is not in the Hugging Face cache" in capsys.readouterr().err
    write_hub_cache(cache, {"mar-base.safetensors": sources["mar_base"]})
    assert dl.main(_hf("mar_base", "--cache_dir", str(cache), "--offline")) == 0


def test_env_only_in_a_fresh_interpreter(tiny_registry, sources, tmp_path):
    """As a user runs it: ``HF_HUB_OFFLINE=1 HF_HUB_CACHE=...`` and no flag for either."""
    cache = tmp_path / "hub"
    snapshot = write_hub_cache(cache, {"mar-base.safetensors": sources["mar_base"]})
    script = ("import sys; sys.path.insert(0, 'tests'); import test_download_hub as t; "
              "from util import download as dl; dl.HUB_FILES = t.tiny_hub_files(); "
              "sys.exit(dl.main(t._hf('mar_base')))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"  path: {snapshot / 'mar-base.safetensors'}" in done.stdout.splitlines()
    assert "(offline)" in done.stderr  # the log line: offline mode came from the environment


@pytest.mark.parametrize("argv, message", [
    (["--source", "hf", "vae", "--dest", "x"], "--dest applies to --source dropbox"),
    (["vae", "--offline"], "--offline: only with --source hf"),
    (["vae", "--revision", "main", "--repo_id", "a/b"], "--repo_id, --revision: only with --source hf"),
    (["--source", "hf", "vae", "mar_base", "--filename", "f.safetensors"], "--filename names the file of one name"),
    (["--source", "hf", "vae", "--offline", "--overwrite"], "--overwrite needs the network"),
])
def test_flags_a_source_would_ignore_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        dl.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_hub_registry_matches_the_released_schemas():
    """The layouts downloads are checked against are the released ones in tests/data."""
    assert list(dl.HUB_FILES) == list(dl.RELEASED_FILES)
    assert {n: e.filename for n, e in dl.HUB_FILES.items()} == {
        "vae": "kl16.safetensors", "mar_base": "mar-base.safetensors",
        "mar_large": "mar-large.safetensors", "mar_huge": "mar-huge.safetensors"}
    assert dl.HUB_REPO_ID == "jadechoghari/mar" and dl.HUB_REVISION == "main"
    schema_files = {"vae": "vae_kl16", "mar_base": "mar_base", "mar_large": "mar_large", "mar_huge": "mar_huge"}
    for name, entry in dl.HUB_FILES.items():
        text = (REFERENCE_DIR / f"{schema_files[name]}.state_dict.txt").read_text()
        rows = [line.split("\t") for line in text.splitlines()]
        schema = {key: tuple(int(s) for s in shape.strip("()").split(",") if s.strip()) for key, shape, _ in rows}
        assert list(dl.expected_shapes(entry).items()) == list(schema.items()), name
        assert entry.extra_keys_ok == (name == "vae") and entry.flag == ("--vae_path" if name == "vae" else "--ckpt")
