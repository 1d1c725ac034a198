"""Tests of the demo data, the measuring classifier and its torch-fidelity integration.

Why: every demo number in the project (class accuracy, demo FID) rests on these pieces, so they must
be deterministic, balanced, and the FID must be the textbook Frechet distance of the classifier's
features. CPU only, well under a minute.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demo import dataset as ds
from demo.classifier import DemoClassifier, load_classifier, predict

REPO = Path(__file__).resolve().parents[1]
PRETRAINED = REPO / "pretrained_models" / "demo" / "classifier.pt"


# ----------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------

def test_class_names() -> None:
    assert len(ds.CLASS_NAMES) >= 10
    assert len(set(ds.CLASS_NAMES)) == len(ds.CLASS_NAMES) == ds.NUM_CLASSES


def test_varied_style_is_the_data_the_classifier_and_tokenizer_were_trained_on() -> None:
    """The shipped classifier and tokenizer were trained on the render of before styles existed: the
    "varied" style (the default) must keep those exact bytes. Digest measured on that render (eb17d88)."""
    x, _ = ds.make_split(2, ds.TRAIN_SEED, 32)
    import hashlib
    assert hashlib.sha256(x.tobytes()).hexdigest() == \
        "a166674e7566a1d93a0b69c6d3e34d9cc0a329f13640caa454e33f3d8652a52e"
    assert np.array_equal(ds.make_split(2, ds.TRAIN_SEED, 32, "varied")[0], x)


def test_simple_style_has_flat_inverse_colours_and_a_centred_shape() -> None:
    """Flat background, shape colour = RGB inverse of the background, centre within 0.08 half-widths,
    radius 0.55-0.66: checked on disks, whose pixels are background or shape (plus anti-aliased edges)."""
    size = 64
    for k in range(20):
        img, label = ds.render_index(k * ds.NUM_CLASSES, 3, size, "simple")  # class 0: disk
        assert label == 0
        px = img.reshape(-1, 3).astype(int)
        bg = px[0]
        corners = img[[0, 0, -1, -1], [0, -1, 0, -1]].astype(int)
        assert (corners == bg).all()  # flat
        inside = np.abs(px - (255 - bg)).max(axis=1) <= 1  # the inverse colour
        background = np.abs(px - bg).max(axis=1) == 0
        assert (inside | background).mean() > 0.9  # the rest: the anti-aliased rim
        yy, xx = np.nonzero(inside.reshape(size, size))
        centre = (np.array([xx.mean(), yy.mean()]) + 0.5) / size * 2 - 1
        assert np.abs(centre).max() < 0.08 + 0.02
        radius = np.sqrt(inside.sum() / np.pi) / (size / 2)
        assert 0.55 * 0.8 - 0.02 < radius < 0.66 + 0.02  # the disk's own radius is 0.8-1.0 of the scale
        assert abs(0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2] - 127.5) >= 0.17 * 255 - 1
    # colours and geometry still vary between images: the demo FID has something to measure
    imgs = ds.make_split(10, 3, 32, "simple")[0]
    assert len({tuple(im[0, 0]) for im in imgs}) == len(imgs)


def test_style_names_and_values_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown data style"):
        ds.make_split(1, 0, 32, "plain")
    with pytest.raises(ValueError, match="backgrounds"):
        ds.ShapeStyle(backgrounds=("marble",))
    with pytest.raises(ValueError, match="centre_jitter"):
        ds.ShapeStyle(centre_jitter=0.5)
    with pytest.raises(ValueError, match="colours"):
        ds.ShapeStyle(colours="random")


@pytest.mark.parametrize("size", [64, 32])
def test_every_class_renders(size: int) -> None:
    for label in range(ds.NUM_CLASSES):
        img = ds.render(label, np.random.default_rng([7, label]), size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert img.std() > 5.0, f"class {ds.CLASS_NAMES[label]} rendered (almost) flat"
    with pytest.raises(ValueError):
        ds.render(ds.NUM_CLASSES, np.random.default_rng(0))


def test_split_deterministic_balanced_interleaved() -> None:
    x1, y1 = ds.make_split(6, seed=123)
    x2, y2 = ds.make_split(6, seed=123)
    assert x1.shape == (6 * ds.NUM_CLASSES, 64, 64, 3) and x1.dtype == np.uint8
    assert y1.dtype == np.int64 and y1.shape == (6 * ds.NUM_CLASSES,)
    assert x1.tobytes() == x2.tobytes() and np.array_equal(y1, y2)
    assert np.array_equal(np.bincount(y1, minlength=ds.NUM_CLASSES), np.full(ds.NUM_CLASSES, 6))
    assert np.array_equal(y1, np.arange(len(y1)) % ds.NUM_CLASSES)  # interleaved labels
    x3, _ = ds.make_split(6, seed=124)
    assert x1.tobytes() != x3.tobytes()
    assert not any(np.array_equal(a, b) for a, b in zip(x1, x3))


def test_image_independent_of_num_per_class() -> None:
    small, ys = ds.make_split(2, seed=5)
    large, yl = ds.make_split(5, seed=5)
    assert np.array_equal(small, large[: len(small)]) and np.array_equal(ys, yl[: len(ys)])
    img, label = ds.render_index(len(small) + 3, 5)
    assert np.array_equal(img, large[len(small) + 3]) and label == yl[len(small) + 3]


def test_named_splits_differ() -> None:
    assert len({ds.TRAIN_SEED, ds.HELDOUT_SEED, ds.FLOOR_SEED}) == 3
    train, _ = ds.make_split(3, ds.TRAIN_SEED)
    held, _ = ds.make_split(3, ds.HELDOUT_SEED)
    train_set = {im.tobytes() for im in train}
    assert not any(im.tobytes() in train_set for im in held)


def test_images_have_flat_regions_and_detail() -> None:
    x, _ = ds.make_split(10, seed=9)
    # horizontal neighbour differences: exact zeros (flat colour) and large jumps (edges / grain)
    d = np.abs(np.diff(x.astype(np.int16), axis=2)).max(axis=-1)
    per_image_flat = (d == 0).mean(axis=(1, 2))
    assert (per_image_flat > 0.5).mean() > 0.1, "some images must contain large flat areas"
    assert (per_image_flat < 0.05).mean() > 0.1, "some images must be textured almost everywhere"
    assert (d > 60).any(axis=(1, 2)).mean() > 0.9, "shapes must have visible edges"


def test_shapes_dataset_items() -> None:
    d = ds.ShapesDataset(num_per_class=2, split="heldout")
    lazy = ds.ShapesDataset(num_per_class=2, seed=ds.HELDOUT_SEED, precompute=False)
    assert len(d) == 2 * ds.NUM_CLASSES
    x, y = d[13]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y == 13 % ds.NUM_CLASSES
    assert torch.equal(x, lazy[13][0]) and lazy[13][1] == y
    img, _ = ds.render_index(13, ds.HELDOUT_SEED)
    assert torch.allclose((x + 1) * 127.5, torch.from_numpy(img).permute(2, 0, 1).float(), atol=1e-3)
    with pytest.raises(ValueError):
        ds.ShapesDataset(1, split="nope")


# ----------------------------------------------------------------------------------------------
# classifier
# ----------------------------------------------------------------------------------------------

def test_classifier_shapes_and_size() -> None:
    torch.manual_seed(0)
    model = DemoClassifier().eval()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        f = model.features(x)
        logits = model(x)
        f2, l2 = model.features_and_logits(x)
    assert f.shape == (4, model.feature_dim) and 128 <= model.feature_dim <= 256
    assert logits.shape == (4, ds.NUM_CLASSES)
    assert torch.allclose(f, f2) and torch.allclose(logits, l2)
    n_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert n_bytes < 2 * 2 ** 20


def test_load_classifier_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="python -m demo.classifier"):
        load_classifier(tmp_path / "missing.pt")


@pytest.mark.skipif(not PRETRAINED.is_file(), reason="pretrained demo classifier not present")
def test_pretrained_classifier_heldout_accuracy() -> None:
    model = load_classifier(PRETRAINED)
    # a fresh split: never seen in training, nor in the accuracy stored in the checkpoint
    x, y = ds.make_split(50, ds.FLOOR_SEED)
    _, logits = predict(model, x)
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= 0.98, f"held-out accuracy {acc:.4f} < 0.98"


# ----------------------------------------------------------------------------------------------
# torch-fidelity integration
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained classifier if present, else a randomly initialised one (plumbing tests)."""
    if PRETRAINED.is_file():
        return PRETRAINED
    torch.manual_seed(0)
    model = DemoClassifier().eval()
    path = tmp_path_factory.mktemp("clf") / "random_classifier.pt"
    torch.save({"model": model.state_dict(), "config": {"num_classes": ds.NUM_CLASSES,
                "widths": list(model.widths), "size": 64}, "heldout_accuracy": 0.0,
                "class_names": list(ds.CLASS_NAMES)}, path)
    return path


@pytest.fixture(scope="module")
def two_sets() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    a, ya = ds.make_split(25, ds.HELDOUT_SEED)  # 300 images > feature dim 128
    b, yb = ds.make_split(25, ds.FLOOR_SEED)
    return a, ya, b, yb


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torch-fidelity caches under $TORCH_HOME by default: make sure nothing lands in ~/.cache."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_extractor_registered_and_matches_model(classifier_path: Path, two_sets) -> None:
    import torch_fidelity.registry as reg
    from demo import fidelity

    assert reg.FEATURE_EXTRACTORS_REGISTRY[fidelity.FEATURE_EXTRACTOR_NAME] is fidelity.FeatureExtractorDemoClassifier
    fidelity.register()  # idempotent
    a = two_sets[0][:40]
    out = fidelity.extract_features(a, classifier_path, layers=("features", "logits_unbiased", "logits"),
                                    batch_size=16, device="cpu")
    assert out["features"].shape == (40, 128) and out["logits"].shape == (40, ds.NUM_CLASSES)
    model = load_classifier(classifier_path)
    f, logits = predict(model, a)
    np.testing.assert_allclose(out["features"], f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["logits_unbiased"], logits - model.head.bias.numpy(), rtol=1e-4, atol=1e-4)
    # non-native resolution is resized inside the extractor
    big = np.repeat(np.repeat(a[:4], 2, axis=1), 2, axis=2)
    out_big = fidelity.extract_features(big, classifier_path, layers=("features",), device="cpu")
    assert out_big["features"].shape == (4, 128)


def test_demo_fid_matches_scipy_and_self_is_zero(classifier_path: Path, two_sets,
                                                 _isolated_torch_home: Path) -> None:
    from demo import fidelity

    a, _, b, _ = two_sets
    fid = fidelity.demo_metrics(a, classifier_path, reference=b, compute_is=False, device="cpu")["demo_fid"]
    # the same features straight from the model, and an independent scipy.linalg.sqrtm Frechet distance
    model = load_classifier(classifier_path)
    fa, fb = predict(model, a)[0], predict(model, b)[0]
    direct = fidelity.frechet_distance(*fidelity.gaussian_stats(fa), *fidelity.gaussian_stats(fb))
    assert fid > 0
    # Measured 1.4e-9 relative (torch-fidelity's and scipy's float64 sqrtm); a wrong feature layer or a
    # float32 path would be off by far more than 1e-6.
    assert abs(fid - direct) <= 1e-6 * abs(direct), (fid, direct)

    self_fid = fidelity.demo_metrics(a, classifier_path, reference=a, compute_is=False, device="cpu")["demo_fid"]
    scale = float(np.trace(np.cov(fa, rowvar=False)))
    assert abs(self_fid) <= 1e-5 * scale, (self_fid, scale)
    assert not _isolated_torch_home.exists(), "torch-fidelity wrote a cache although caching is off"


def test_png_folder_accuracy_and_label_alignment(classifier_path: Path, tmp_path: Path) -> None:
    from demo import fidelity

    # non-contiguous indices with more than one digit: '10.png' must come after '9.png'
    indices = [0, 1, 2, 5, 9, 10, 11, 23, 40, 99, 100, 131] + list(range(140, 188))
    labels = np.arange(200) % ds.NUM_CLASSES
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in indices:
        Image.fromarray(ds.render_index(i, ds.FLOOR_SEED)[0]).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("ignored")
    dset = fidelity.IndexedPNGFolder(folder)
    assert dset.indices.tolist() == indices
    assert torch.equal(dset[3], torch.from_numpy(ds.render_index(5, ds.FLOOR_SEED)[0]).permute(2, 0, 1))

    res = fidelity.demo_metrics(folder, classifier_path, labels=labels, reference=folder, device="cpu")
    assert res["num_samples"] == len(indices) and "demo_is" in res
    assert abs(res["demo_fid"]) < 1e-2
    wrong = fidelity.demo_metrics(folder, classifier_path, labels=np.roll(labels, 1), reference=folder,
                                  compute_is=False, device="cpu")
    if classifier_path == PRETRAINED:
        assert res["class_accuracy"] >= 0.95
        assert wrong["class_accuracy"] <= 0.1


def test_reference_cache_and_floor(classifier_path: Path, tmp_path: Path, two_sets) -> None:
    from demo import fidelity

    a = two_sets[0][:120]
    cache = tmp_path / "fid_cache"
    r1 = fidelity.demo_metrics(a, classifier_path, reference_per_class=10, cache_root=cache, device="cpu")
    cached = sorted(p.name for p in cache.iterdir())
    assert cached and all(fidelity.FEATURE_EXTRACTOR_NAME in n for n in cached)
    r2 = fidelity.demo_metrics(a, classifier_path, reference_per_class=10, cache_root=cache, device="cpu")
    assert r1["demo_fid"] == pytest.approx(r2["demo_fid"], rel=1e-9)

    floor = fidelity.demo_floor(classifier_path, num_per_class=15, reference_per_class=15, device="cpu")
    assert floor["num_samples"] == floor["num_reference"] == 15 * ds.NUM_CLASSES
    assert floor["demo_fid"] > 0
    if classifier_path == PRETRAINED:
        assert floor["class_accuracy"] >= 0.97
        assert floor["demo_is"] > 0.6 * ds.NUM_CLASSES  # 18 images per IS split: biased low
