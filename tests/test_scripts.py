"""eval.py / sample.py end to end on the tiny random model (CPU, offline).

Numerics: torchrun gives each process OMP_NUM_THREADS=1, and CPU kernels may round differently with
other thread counts, so every generation here runs single-threaded for byte-level comparisons.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as eval_script  # noqa: E402
import evaluation.metrics as eval_metrics  # noqa: E402
import evaluation.run as eval_run  # noqa: E402
import sample as sample_script  # noqa: E402

BASE = ["--model", "tiny-random", "--num_images", "20", "--eval_bsz", "8", "--num_iter", "4",
        "--num_sampling_steps", "10", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # the scripts set their own threads: restored after


def run_eval(*extra: str, metrics: bool = False) -> dict:
    flags = [*BASE, *extra] + ([] if metrics else ["--no_metrics"])
    return eval_script.main(eval_script.build_parser().parse_args(flags))


def run_dir(root: Path) -> Path:
    (d,) = [p for p in root.iterdir() if p.is_dir()]
    return d


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted single-process run; returns its run folder."""
    root = tmp_path_factory.mktemp("ref")
    torch.set_num_threads(1)
    run_eval("--output_dir", str(root))
    return run_dir(root)


def test_reference_run_layout(reference_run):
    names = sorted(os.listdir(reference_run / "images"))
    assert names == [f"{i:06d}.png" for i in range(20)]
    assert (reference_run / "metrics.json").is_file()
    with Image.open(reference_run / "images" / "000000.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"


def test_torchrun_two_processes_match_single(reference_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "eval.py"), *BASE, "--no_metrics", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = run_dir(tmp_path)
    assert out.name == reference_run.name
    assert folder_bytes(out / "images") == folder_bytes(reference_run / "images")


FAILING_RANK = """
import os, sys, time
sys.path.insert(0, {root!r})
import eval as eval_script
from util import cli

real = eval_script.generate_batches


def failing(*args, **kwargs):  # rank 1 fails in its first batch, as a GPU out of memory would
    for batch in real(*args, **kwargs):
        if os.environ["RANK"] == "1":
            raise MemoryError("rank 1 ran out of memory in its first batch")
        yield batch


def stuck():  # a failed rank whose shutdown never returns, as NCCL's can with work in flight
    time.sleep(3600)


eval_script.generate_batches = failing
if os.environ["RANK"] == "1" and {hang!r}:
    eval_script.shutdown = stuck
cli.run(eval_script.main, eval_script.build_parser().parse_args(sys.argv[1:]))
"""


@pytest.mark.parametrize("hang", [False, True], ids=["failed rank exits", "failed rank hangs"])
def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path, hang):
    """Two processes (gloo, CPU), launched as two nodes' workers are (no launcher to kill the other): rank 1
    fails in its first batch; rank 0 stops after its own first batch with rank 1's error, rather than
    sampling its other batches and then failing at the final gather (on a closed connection), or, when
    the failed rank does not exit, waiting there for the collective timeout of 30 minutes."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK.format(root=str(ROOT), hang=hang))
    out = tmp_path / "out"
    flags = [*BASE, "--num_images", "40", "--eval_bsz", "4", "--no_metrics", "--output_dir", str(out)]  # 5 each
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, str(script), *flags], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        stdout, stderr = procs[0].communicate(timeout=300)  # a hang, not a time: the collective waits 30 min
        if not hang:
            _, failed = procs[1].communicate(timeout=60)
            assert procs[1].returncode != 0 and "MemoryError: rank 1 ran out of memory in its first batch" in failed
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode != 0, stdout[-2000:] + stderr[-2000:]
    assert "rank 1 of 2 failed" in stderr and "rank 1 ran out of memory" in stderr, stderr[-2000:]
    written = sorted(int(p.stem) for p in (run_dir(out) / "images").glob("*.png"))
    assert written == list(range(4))  # rank 0's first batch (batch 0), none of its four others


def test_killed_run_resumes_to_identical_files(reference_run, tmp_path):
    with pytest.raises(SystemExit):
        run_eval("--output_dir", str(tmp_path), "--stop_after_batches", "1")
    images = run_dir(tmp_path) / "images"
    assert 0 < len(os.listdir(images)) < 20
    (images / f"000019.png{eval_run.TMP_MARK}12345").write_bytes(b"partial")  # what a kill mid-write leaves
    run_eval("--output_dir", str(tmp_path))
    assert folder_bytes(images) == folder_bytes(reference_run / "images")


def test_unbalanced_needs_flag(tmp_path):
    with pytest.raises(SystemExit, match="--unbalanced"):
        run_eval("--output_dir", str(tmp_path), "--num_images", "15")
    run_eval("--output_dir", str(tmp_path), "--num_images", "3", "--eval_bsz", "2", "--unbalanced")
    assert sorted(os.listdir(run_dir(tmp_path) / "images")) == ["000000.png", "000001.png", "000002.png"]


def test_bad_fid_stats_fail_clearly(tmp_path):
    d = eval_metrics.FID_DIM
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(d))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(10), sigma=np.eye(10))
    (tmp_path / "junk.npz").write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="lacks \\['sigma'\\]"):
        eval_metrics.load_fid_stats(tmp_path / "nosigma.npz")
    with pytest.raises(ValueError, match="expected"):
        eval_metrics.load_fid_stats(tmp_path / "shape.npz")
    with pytest.raises(ValueError, match="not a readable .npz"):
        eval_metrics.load_fid_stats(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        eval_metrics.load_fid_stats(tmp_path / "missing.npz")
    # main() checks the file before generating anything
    with pytest.raises(ValueError):
        run_eval("--output_dir", str(tmp_path / "out"), "--fid_stats", str(tmp_path / "shape.npz"), metrics=True)
    assert not (tmp_path / "out").exists()


def test_run_name_encodes_every_image_setting():
    parse = eval_script.build_parser().parse_args
    cpu = torch.device("cpu")
    base = ["--model", "tiny-random"]
    variants = [[], ["--model", "mar_base"], ["--num_iter", "32"], ["--cfg", "2.9"], ["--cfg_schedule", "constant"],
                ["--temperature", "0.9"], ["--num_sampling_steps", "50"], ["--lazy_mar"], ["--accel", "lazymar-token"],
                ["--seed", "1"], ["--num_images", "100"], ["--eval_bsz", "32"], ["--no_ema"], ["--ckpt", "x.pth"],
                ["--precision", "bf16"], ["--precision", "fp16"], ["--compile"], ["--cuda_graph"]]
    names = [eval_run.run_name(parse([*base, *v]), cpu) for v in variants]
    assert len(set(names)) == len(names), names
    assert eval_run.run_name(parse([*base, "--accel", "lazymar"]), cpu) == names[7]
    assert eval_run.run_name(parse(base), torch.device("cuda")) != names[0]
    # settings that do not change images do not change the folder (fp32 is the folder name of old runs)
    assert eval_run.run_name(parse([*base, "--no_metrics", "--output_dir", "elsewhere"]), cpu) == names[0]
    assert eval_run.run_name(parse([*base, "--precision", "fp32"]), cpu) == names[0]


def test_code_identity_covers_what_makes_images_and_nothing_else(tmp_path):
    """Editing eval.py or evaluation/run.py (labels, PNG writing) or how weights are read changes the
    sampling-code digest; editing the FLOPs count does not (a resume is not refused for it), and the
    benchmarks and metrics are not part of it."""
    root = tmp_path / "tree"
    for source in eval_run.IMAGE_CODE:
        src = eval_run.ROOT / source
        files = sorted(src.rglob("*.py")) if src.is_dir() else [src]
        for f in files:
            dst = root / f.relative_to(eval_run.ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    base = eval_run.code_sha256(root)
    assert base == eval_run.code_sha256()  # the copy is the tree
    assert not any(source.startswith(("benchmarks", "evaluation/metrics")) for source in eval_run.IMAGE_CODE)
    for name in ("eval.py", "evaluation/run.py", "util/checkpoint.py", "models/mar.py", "models/runner.py",
                 "lazymar/token_cache.py"):
        path = root / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        assert eval_run.code_sha256(root) != base, name
        path.write_bytes(original)
    for name in sorted(eval_run.NOT_IMAGE_CODE):
        path = root / name
        assert path.is_file(), name  # the exclusions name real files
        path.write_bytes(path.read_bytes() + b"\n# edited\n")
    assert eval_run.code_sha256(root) == base


def test_eval_samples_each_model_at_its_own_defaults(tmp_path):
    """eval.py --model demo without --cfg / --temperature samples at the demo's defaults (those sample.py,
    demo.evaluate and the README's accuracy use: cfg 3, temperature 0.4) and records that it took them; a
    flag still overrides; the released models keep the LazyMAR evaluation's (64 steps, cfg 3.25, T 1)."""
    small = ["--model", "demo", "--num_images", "12", "--eval_bsz", "12", "--num_iter", "2",
             "--num_sampling_steps", "5", "--device", "cpu", "--no_metrics"]
    result = eval_script.main(eval_script.build_parser().parse_args([*small, "--output_dir", str(tmp_path / "a")]))
    identity = result["identity"]
    assert (identity["num_iter"], identity["cfg"], identity["cfg_schedule"], identity["temperature"]) == (
        2, 3.0, "linear", 0.4)
    used = {"model": "demo", "used": {"cfg": 3.0, "cfg_schedule": "linear", "temperature": 0.4}}
    assert result["settings"]["sampling_defaults"] == used
    assert json.loads((run_dir(tmp_path / "a") / "metrics.json").read_text())["settings"]["sampling_defaults"] == used
    result = eval_script.main(eval_script.build_parser().parse_args(
        [*small, "--cfg", "2.0", "--output_dir", str(tmp_path / "b")]))
    assert (result["identity"]["cfg"], result["identity"]["temperature"]) == (2.0, 0.4)
    assert result["settings"]["sampling_defaults"]["used"] == {"cfg_schedule": "linear", "temperature": 0.4}

    from util.generate import sampling_flags
    released = eval_script.build_parser().parse_args(["--model", "mar_huge"])
    assert sampling_flags("mar_huge", released)[0] == dict(num_iter=64, cfg=3.25, cfg_schedule="linear",
                                                           temperature=1.0)
    assert "-it64-cfg3.25-linear-temp1-" in eval_run.run_name(released, torch.device("cpu"))


def test_every_script_takes_the_same_defaults_per_model():
    from util.generate import sampling_flags
    from util.loading import model_choices
    for model in model_choices():
        sampled = sample_script._settings(sample_script.build_parser().parse_args(["--model", model]))
        evaluated = sampling_flags(model, eval_script.build_parser().parse_args(["--model", model]))[0]
        assert sampled == evaluated, model


def test_the_scripts_pick_the_best_device_the_same_way(monkeypatch, tmp_path):
    """sample.py and eval.py without --device: a CUDA machine samples on CUDA in both (util.device), a
    machine without one on the CPU."""
    class Loaded(Exception):
        pass

    seen = {}

    def spy(script):
        def load(model, *, device, **kwargs):
            seen[script] = torch.device(device).type
            raise Loaded
        return load

    monkeypatch.setattr(sample_script, "load_generator", spy("sample.py"))
    monkeypatch.setattr(eval_script, "load_generator", spy("eval.py"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # no GPU here to select
    for cuda, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        seen.clear()
        with pytest.raises(Loaded):
            sample_script.main(sample_script.build_parser().parse_args(
                ["--model", "tiny-random", "--out", str(tmp_path / "grid.png")]))
        with pytest.raises(Loaded):
            eval_script.main(eval_script.build_parser().parse_args(
                ["--model", "tiny-random", "--no_metrics", "--output_dir", str(tmp_path / "out")]))
        assert seen == {"sample.py": expected, "eval.py": expected}


@pytest.mark.parametrize("model", ["demo", "tiny-random"])
def test_no_ema_is_refused_where_there_are_only_one_kind_of_weights(model):
    """The demo export holds EMA weights only and tiny-random has random ones: --no_ema would be recorded
    in run.json as raw weights while the EMA ones (or random ones) sample."""
    import demo.registry  # noqa: F401  registers the demo loader
    from util.loading import load_generator
    with pytest.raises(ValueError, match="--no_ema"):
        load_generator(model, use_ema=False)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A random Inception-v3 weights file for torch-fidelity (see _random_inception_weights)."""
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    _random_inception_weights(path)
    return path


def _random_inception_weights(path: Path) -> None:
    """A state dict for torch-fidelity's Inception-v3 with random (He-initialised) weights, no download."""
    import torch_fidelity.feature_extractor_inceptionv3 as fei
    with mock.patch.object(fei, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fei.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        fe = fei.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in fe.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (2.0 / (m.weight[0].numel())) ** 0.5, generator=g)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5, generator=g)
    torch.save(fe.state_dict(), path)


def test_fid_and_is_offline_match_direct_computation(tmp_path, inception_weights, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fei

    weights = inception_weights
    built = []  # every Inception-v3 torch-fidelity constructs: eval.py must build one and reuse it
    original_init = fei.FeatureExtractorInceptionV3.__init__

    def counting_init(self, *args, **kwargs):
        built.append(args)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(fei.FeatureExtractorInceptionV3, "__init__", counting_init)
    d = eval_metrics.FID_DIM
    rng = np.random.default_rng(0)
    a = rng.standard_normal((d, 64)) * 0.1
    stats = tmp_path / "ref_stats.npz"
    np.savez(stats, mu=rng.standard_normal(d) * 0.1, sigma=a @ a.T / 64)

    # Inception at 299x299 on CPU dominates: 10 images.
    out = run_eval("--output_dir", str(tmp_path / "out"), "--num_images", "10", "--eval_bsz", "10",
                   "--fid_stats", str(stats), "--inception_weights", str(weights), "--isc_splits", "1",
                   "--metrics_bsz", "10", metrics=True)
    metrics = out["metrics"]
    assert metrics["num_samples"] == 10
    assert len(built) == 1  # built before sampling, used for the metrics
    folder = run_dir(tmp_path / "out")
    assert json.loads((folder / "metrics.json").read_text())["metrics"] == metrics

    # Direct: the same network on the PNGs, then the formulas written out.
    fe = fei.FeatureExtractorInceptionV3("x", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
    files = sorted((folder / "images").iterdir())
    batch = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    with torch.no_grad():
        feats, logits = fe(batch)
    x = feats.double().numpy()
    mu_ref, sigma_ref = np.load(stats)["mu"], np.load(stats)["sigma"]
    xc = x - x.mean(0)
    # tr sqrt(S1 S2) with S1 = Xc^T Xc / (n-1): the non-zero eigenvalues of S1 S2 are those of Xc S2 Xc^T / (n-1)
    small = xc @ sigma_ref @ xc.T / (len(x) - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    diff = x.mean(0) - mu_ref
    fid = diff @ diff + np.trace(xc.T @ xc / (len(x) - 1)) + np.trace(sigma_ref) - 2 * tr_covmean
    assert fid > 1.0 and metrics["fid"] == pytest.approx(fid, rel=1e-4)

    p = torch.softmax(logits.double(), dim=1).numpy()
    kl = (p * (np.log(p + 1e-30) - np.log(p.mean(0, keepdims=True) + 1e-30))).sum(1).mean()
    assert metrics["inception_score"] == pytest.approx(np.exp(kl), rel=1e-4)


def test_sample_grid_size(tmp_path):
    out = tmp_path / "grid.png"
    args = sample_script.build_parser().parse_args(
        ["--model", "tiny-random", "--classes", "0", "1", "2", "--num_per_class", "2", "--num_iter", "4",
         "--num_sampling_steps", "5", "--out", str(out)])
    sample_script.main(args)
    with Image.open(out) as im:
        assert im.size == (2 * 32, 3 * 32)


def test_sample_compare_has_two_differing_halves(tmp_path):
    single, both = tmp_path / "single.png", tmp_path / "compare.png"
    common = ["--model", "tiny-random", "--classes", "0", "1", "--num_per_class", "2", "--num_iter", "16",
              "--num_sampling_steps", "5"]
    parse = sample_script.build_parser().parse_args
    sample_script.main(parse([*common, "--out", str(single)]))
    sample_script.main(parse([*common, "--compare", "--out", str(both)]))
    with Image.open(single) as a, Image.open(both) as b:
        assert b.width == 2 * a.width
        assert b.height == a.height + sample_script.LABEL_HEIGHT
        arr, ref = np.asarray(b), np.asarray(a)
    left = arr[sample_script.LABEL_HEIGHT:, :a.width]
    right = arr[sample_script.LABEL_HEIGHT:, a.width:]
    assert np.array_equal(left, ref)  # the left half is the plain grid from the same seed
    assert not np.array_equal(left, right)  # LazyMAR changes the samples


def test_num_sampling_steps_reaches_every_model(monkeypatch):
    """--num_sampling_steps is applied to the demo model too (it names eval.py's output folder)."""
    from conftest import build_tiny_mar
    from models.vae import AutoencoderKL
    from util import loading
    assert loading.load_generator("tiny-random").mar.diffloss.num_sampling_steps == 100
    gen = loading.load_generator("tiny-random", num_sampling_steps=7)
    assert gen.mar.diffloss.num_sampling_steps == 7 and gen.mar.diffloss.gen_diffusion.num_timesteps == 7

    import demo.registry
    demo_mar = build_tiny_mar()  # its checkpoint config says 10 steps
    monkeypatch.setattr(demo.registry, "load_demo",
                        lambda device="cpu", name="mar": (demo_mar, AutoencoderKL(**loading.TINY_VAE), 1.0))
    assert loading.load_generator("demo").mar.diffloss.num_sampling_steps == 10  # its own by default
    assert loading.load_generator("demo", num_sampling_steps=25).mar.diffloss.gen_diffusion.num_timesteps == 25
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match="num_sampling_steps"):
            loading.load_generator("tiny-random", num_sampling_steps=bad)
    with pytest.raises(ValueError, match="num_sampling_steps"):
        sample_script.main(sample_script.build_parser().parse_args(
            ["--model", "tiny-random", "--num_sampling_steps", "0", "--out", "unused.png"]))


@pytest.mark.parametrize("flag,value", [("num_iter", "0"), ("cfg", "-1"), ("cfg", "nan"), ("temperature", "-0.5")])
def test_bad_sampling_flags_fail_before_loading_weights(tmp_path, flag, value):
    """mar_huge's checkpoint is absent here: a flag error (not 'checkpoint not found') proves the order."""
    with pytest.raises(ValueError, match=flag):
        eval_script.main(eval_script.build_parser().parse_args(
            ["--model", "mar_huge", f"--{flag}", value, "--output_dir", str(tmp_path)]))
    with pytest.raises(ValueError, match=flag):
        sample_script.main(sample_script.build_parser().parse_args(
            ["--model", "mar_huge", f"--{flag}", value, "--out", str(tmp_path / "grid.png")]))
    assert not any(tmp_path.iterdir())


def test_sample_passes_its_flags_to_the_demo_model(monkeypatch, tmp_path):
    """sample.py's default model is the demo: --num_sampling_steps must reach it, --ckpt is refused."""
    from conftest import build_tiny_mar
    from models.vae import AutoencoderKL
    from util import loading
    import demo.registry
    monkeypatch.setattr(demo.registry, "load_demo",
                        lambda device="cpu", name="mar": (build_tiny_mar(), AutoencoderKL(**loading.TINY_VAE), 1.0))
    parse = sample_script.build_parser().parse_args
    assert sample_script._load(parse(["--num_sampling_steps", "25"])).mar.diffloss.num_sampling_steps == 25
    assert sample_script._load(parse([])).mar.diffloss.num_sampling_steps == 10  # the checkpoint's own
    with pytest.raises(ValueError, match="num_sampling_steps"):
        sample_script._load(parse(["--num_sampling_steps", "0"]))
    with pytest.raises(ValueError, match="--ckpt"):
        sample_script._load(parse(["--ckpt", str(tmp_path / "x.pth")]))


# ------------------------------------------------------------------------------- run identity
FILE_MODEL = "tiny-file"
SMALL = ["--model", FILE_MODEL, "--num_images", "10", "--eval_bsz", "5", "--num_iter", "2",
         "--num_sampling_steps", "5", "--device", "cpu", "--no_metrics"]


@pytest.fixture
def file_model(monkeypatch, tmp_path):
    """A model whose MAR weights come from a file (``--ckpt``), like the released ones, but tiny."""
    from models.vae import VAE_LATENT_SCALE
    from util import loading

    def load(*, ckpt, vae_path, use_ema):
        mar, vae = loading._tiny_random(loading.DEFAULT_SAMPLING_STEPS)
        mar.load_state_dict(torch.load(ckpt, weights_only=True))
        return loading.LoadedModel(mar, vae, VAE_LATENT_SCALE, {"mar": Path(ckpt)})

    monkeypatch.setitem(loading._REGISTERED, FILE_MODEL, load)
    path = tmp_path / "weights.pth"
    save_weights(path, perturb=0.0)
    return path


def save_weights(path: Path, perturb: float) -> None:
    from util import loading
    mar, _ = loading._tiny_random(loading.DEFAULT_SAMPLING_STEPS)
    with torch.no_grad():
        mar.z_proj.weight.add_(perturb)
    torch.save(mar.state_dict(), path)
    st = path.stat()  # a replaced file has a new mtime, even within the file system's time resolution
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(perturb * 1e9) + 1))


def eval_args(*flags: str):
    return eval_script.build_parser().parse_args([*SMALL, *flags])


def test_weights_replaced_at_the_same_path_are_refused(file_model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        eval_script.main(eval_args("--ckpt", str(file_model), "--output_dir", str(out), "--stop_after_batches", "1"))
    folder = run_dir(out)
    before = folder_bytes(folder / "images")
    assert len(before) == 5 and (folder / eval_run.IDENTITY_FILE).is_file()

    save_weights(file_model, perturb=1.0)  # other weights, same path: same folder name
    with pytest.raises(ValueError, match="holds images of another setup \\(mar_sha256: "):
        eval_script.main(eval_args("--ckpt", str(file_model), "--output_dir", str(out)))
    assert folder_bytes(folder / "images") == before  # nothing mixed in

    from util import cli
    with pytest.raises(SystemExit) as exit_info:  # from the shell: one line, status 1
        cli.run(eval_script.main, eval_args("--ckpt", str(file_model), "--output_dir", str(out)))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "mar_sha256" in message and "\n" not in message


def test_identical_rerun_resumes_from_cached_digests(file_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        eval_script.main(eval_args("--ckpt", str(file_model), "--output_dir", str(out), "--stop_after_batches", "1"))
    assert (out / eval_run.DIGEST_CACHE).is_file()

    import util.hashing

    def no_rehash(path):
        raise AssertionError(f"{path} hashed again: the digest cache was not used")

    monkeypatch.setattr(util.hashing, "file_sha256", no_rehash)
    result = eval_script.main(eval_args("--ckpt", str(file_model), "--output_dir", str(out)))
    assert result["timing"]["per_rank"][0]["images_generated"] == 5  # only the missing batch
    assert len(os.listdir(run_dir(out) / "images")) == 10
    assert result["identity"] == json.loads((run_dir(out) / eval_run.IDENTITY_FILE).read_text())


def test_changed_sampler_setting_gets_a_new_folder_and_a_forged_one_is_refused(tmp_path):
    """Sampler settings are in the folder name, so changing one starts a new run; the identity file
    catches what the name does not show (here: a library version recorded differently)."""
    out = tmp_path / "out"
    tiny = ["--num_images", "10", "--eval_bsz", "10", "--num_iter", "2", "--output_dir", str(out)]
    run_eval(*tiny)
    run_eval(*tiny, "--cfg", "2.0")
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2 and all((f / eval_run.IDENTITY_FILE).is_file() for f in folders)
    cfgs = {json.loads((f / eval_run.IDENTITY_FILE).read_text())["cfg"] for f in folders}
    assert cfgs == {2.0, 3.25}

    record = next(f for f in folders if "cfg3.25" in f.name) / eval_run.IDENTITY_FILE
    saved = json.loads(record.read_text())
    record.write_text(json.dumps(saved | {"torch": "1.0.0"}))
    with pytest.raises(ValueError, match='torch: "1.0.0" there'):
        run_eval(*tiny)
    record.unlink()  # images without a record: written by an older eval.py
    with pytest.raises(ValueError, match="no run.json"):
        run_eval(*tiny)


# ------------------------------------------------------------------ metric inputs before sampling
def _no_generator(*args, **kwargs):
    pytest.fail("eval.py loaded the generator before the metric inputs failed")


def shell_error(*flags: str) -> str:
    """eval.py as the shell runs it (util.cli.run, metrics on): the one-line message it exits with, status 1."""
    from util import cli
    with pytest.raises(SystemExit) as exit_info:
        cli.run(eval_script.main, eval_script.build_parser().parse_args([*BASE, *flags]))
    message = exit_info.value.code
    assert isinstance(message, str), f"exit status {message!r}, expected an error message (status 1)"
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def pngs_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png")) if folder.exists() else []


def test_missing_inception_weights_fail_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_script, "load_generator", _no_generator)
    out = tmp_path / "out"
    message = shell_error("--output_dir", str(out), "--inception_weights", "/nonexistent/file.pth")
    url, cached = eval_metrics.inception_download()
    assert "--inception_weights /nonexistent/file.pth: no such file" in message
    assert "--inception_weights FILE" in message and url in message and str(cached) in message
    assert not out.exists()


def test_inception_download_failure_fails_before_sampling(tmp_path, monkeypatch):
    """Default weights, an empty torch.hub cache and no network: one line naming the file torch-fidelity wants."""
    import torch_fidelity.feature_extractor_inceptionv3 as fei

    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    requested: list[tuple[str, Path]] = []

    def no_network(url, dst, *args, **kwargs):
        requested.append((url, Path(dst)))
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(eval_script, "load_generator", _no_generator)
    out = tmp_path / "out"
    message = shell_error("--output_dir", str(out))
    assert not out.exists()

    # The URL is the one torch-fidelity itself fetches without a weights path, saved where torch.hub would.
    wanted: list[str] = []

    def record(url, **kwargs):
        wanted.append(url)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(fei, "load_state_dict_from_url", record)
    with pytest.raises(urllib.error.URLError):
        fei.FeatureExtractorInceptionV3(eval_metrics.INCEPTION_NAME, [eval_metrics.FID_LAYER])
    ((url, dst),) = requested
    assert [url] == wanted
    assert dst == torch_home / "hub" / "checkpoints" / Path(urlparse(url).path).name
    assert "cannot download" in message and "--inception_weights FILE" in message
    assert url in message and str(dst) in message


def test_offline_eval_exits_with_one_error_line(tmp_path):
    """From the shell, downloads refused (a proxy on a closed local port, an empty TORCH_HOME): status 1, one
    stderr line, no image."""
    out, torch_home = tmp_path / "out", tmp_path / "torch_home"
    proxy = "http://127.0.0.1:9"  # the discard port: connection refused at once, nothing leaves the machine
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(TORCH_HOME=str(torch_home), https_proxy=proxy, HTTPS_PROXY=proxy, http_proxy=proxy,
               HTTP_PROXY=proxy, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), *BASE, "--output_dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot download") and "--inception_weights FILE" in lines[0]
    assert not pngs_under(tmp_path) and not out.exists()


@pytest.mark.parametrize("content", ["random bytes", "empty", "other state dict"])
def test_unusable_inception_weights_fail_before_sampling(tmp_path, monkeypatch, content):
    weights = tmp_path / "inception.pth"
    if content == "random bytes":
        weights.write_bytes(np.random.default_rng(0).bytes(64))
    elif content == "empty":
        weights.write_bytes(b"")
    else:  # a readable file whose keys do not fit (torch's message spans lines)
        torch.save({"fc.weight": torch.zeros(3)}, weights)
    monkeypatch.setattr(eval_script, "load_generator", _no_generator)
    out = tmp_path / "out"
    message = shell_error("--output_dir", str(out), "--inception_weights", str(weights))
    assert f"--inception_weights {weights} is not usable as torch-fidelity's Inception-v3 weights" in message
    assert "--inception_weights FILE" in message
    assert not out.exists()


def test_bad_fid_reference_folder_fails_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_script, "load_generator", _no_generator)
    monkeypatch.setattr(eval_metrics, "load_inception", lambda *a, **k: pytest.fail("checked after the Inception"))
    out = tmp_path / "out"
    message = shell_error("--output_dir", str(out), "--fid_ref_dir", str(tmp_path / "missing"))
    assert f"--fid_ref_dir {tmp_path / 'missing'}: no such folder" in message
    nested = tmp_path / "nested"
    (nested / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(nested / "sub" / "0.png")  # torch-fidelity does not look into subfolders
    message = shell_error("--output_dir", str(out), "--fid_ref_dir", str(nested))
    assert f"--fid_ref_dir {nested} holds no png,jpg,jpeg files" in message
    assert not out.exists()


def test_demo_metrics_need_the_classifier_before_sampling(tmp_path, monkeypatch):
    """The demo model's metrics use its classifier (not Inception): a missing or broken one fails first."""
    import demo.registry
    from demo.registry import DEMO_MODEL, demo_path
    monkeypatch.setattr(demo.registry, "DEMO_DIR", tmp_path / "demo")  # an empty folder: no demo files
    monkeypatch.setattr(eval_script, "load_generator", _no_generator)
    monkeypatch.setattr(eval_metrics, "load_inception", lambda *a, **k: pytest.fail("the demo path needs no Inception"))
    flags = ["--model", DEMO_MODEL, "--output_dir", str(tmp_path / "out")]
    message = shell_error(*flags)
    assert f"demo classifier {demo_path('classifier')}, which does not exist" in message
    assert "python -m demo.classifier" in message
    demo_path("classifier").parent.mkdir(parents=True)
    demo_path("classifier").write_bytes(b"not a checkpoint")
    assert "cannot be loaded" in shell_error(*flags)
    assert not (tmp_path / "out").exists()


def test_fid_ref_dir_matches_calculate_metrics(tmp_path, inception_weights):
    """FID against a folder with the preloaded network equals torch-fidelity's own calculate_metrics."""
    import torch_fidelity
    rng = np.random.default_rng(0)
    samples, reference = tmp_path / "samples", tmp_path / "reference"
    for folder, count, brightness in ((samples, 6, 255), (reference, 8, 128)):
        folder.mkdir()
        for i in range(count):
            pixels = (rng.random((32, 32, 3)) * brightness).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.png")
    inputs = eval_metrics.MetricInputs(inception=eval_metrics.load_inception(inception_weights), fid_ref_dir=reference)
    ours = eval_metrics.inception_metrics(samples, inputs, device=torch.device("cpu"), batch_size=8, isc_splits=1)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(samples), input2=str(reference), isc=True, fid=True, cuda=False, batch_size=8, isc_splits=1,
        feature_extractor=eval_metrics.INCEPTION_NAME, feature_extractor_weights_path=str(inception_weights),
        cache=False, save_cpu_ram=True, verbose=False)
    assert ours["fid"] > 1.0 and ours["fid_reference"] == str(reference)
    assert ours["fid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_FID], rel=1e-6)
    assert ours["inception_score"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-6)


def test_progress_counts_images_and_the_last_line_gives_images_per_second(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_metrics, "load_inception", lambda *a, **k: pytest.fail("--no_metrics loaded Inception"))
    run_eval("--output_dir", str(tmp_path), "--num_images", "10", "--eval_bsz", "4", "--num_iter", "2")
    stdout, stderr = capsys.readouterr()
    assert "10/10" in stderr and "img/s" in stderr  # the bar counts the 10 images, not the 3 batches
    last = stdout.strip().splitlines()[-1]
    found = re.search(r"= ([0-9.]+) images/s per process", last)
    assert found, last
    printed = float(found.group(1))
    timing = json.loads((run_dir(tmp_path) / "metrics.json").read_text())["timing"]
    (rank0,) = timing["per_rank"]
    assert rank0["images_generated"] == 10 and rank0["wall_s"] > 0
    assert math.isfinite(printed) and printed > 0
    assert rank0["images_per_second"] == pytest.approx(10 / rank0["wall_s"])
    assert timing["images_per_second"] == pytest.approx(rank0["images_per_second"])  # one process: its rate
    assert printed == pytest.approx(timing["images_per_second"], abs=0.006)  # printed with 2 decimals


def test_demo_eval_scores_the_shipped_model_in_its_own_style(tmp_path, monkeypatch):
    """eval.py --model demo end to end with its metrics, on the shipped files: the demo FID's real images
    are rendered in the model's data style and size (simple, 32 px), and the samples are recognised.

    The 24 images are those of test_train.test_shipped_demo_model_draws_its_classes (same seed rule, batch
    and labels); measured there: 23 of 24 right, chance 2. The reference is cut to 20 images per class
    to keep the test short (the FID itself is then noisy and not bounded here)."""
    import demo.fidelity
    seen = {}
    real = demo.fidelity.demo_metrics

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **{**kwargs, "reference_per_class": 20})
    monkeypatch.setattr(demo.fidelity, "demo_metrics", spy)
    result = eval_script.main(eval_script.build_parser().parse_args(
        ["--model", "demo", "--num_images", "24", "--eval_bsz", "24", "--num_iter", "16", "--cfg", "3.0",
         "--temperature", "0.4", "--isc_splits", "2", "--output_dir", str(tmp_path)]))
    assert (seen["reference_size"], seen["reference_style"]) == (32, "simple")
    assert result["metrics"]["class_accuracy"] >= 0.75, result["metrics"]
