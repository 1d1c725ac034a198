"""Where the demo checkpoints live, how to load them, and the demo model's default sampling settings.

The demo MAR generates 32x32 images of the procedural shapes dataset (:mod:`demo.dataset`). The demo
tokenizer (:mod:`demo.tokenizer`) maps them to 4x16x16 latents; the MAR takes 2x2 patches of that latent
(``patch_size=2``) as its tokens, i.e. 8x8 tokens of 16 dims. demo/TRAINING.md says how and why the
files are made. ``vae.decode(tokens / latent_scale)`` gives images in [-1, 1] of size ``mar.img_size``;
:func:`to_classifier_size` upsamples them (bilinear) to the 64x64 the demo classifier expects.

Importing this module registers two models with :func:`util.loading.load_generator`: ``demo``
(``mar.pt``) and ``demo_draft`` (``draft.pt``: the same recipe at half the width, the draft of
speculative decoding, ``--accel cspd --draft_model demo_draft``). Both decode with the demo tokenizer,
and both sample at :data:`DEMO_DEFAULTS` where the scripts' flags leave a setting out
(:func:`util.loading.sampling_defaults`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from util.loading import LoadedModel, register_generator

DEMO_MODEL = "demo"  # its name for util.loading.load_generator (registered below) and the scripts' --model
DEMO_DRAFT_MODEL = "demo_draft"  # the demo's draft model for speculative decoding (--draft_model)
DEMO_MODELS = (DEMO_MODEL, DEMO_DRAFT_MODEL)  # scored by the demo classifier, sampled with DEMO_DEFAULTS
# In the clone, wherever the caller's working directory is (the files ship with the repository, not
# with `pip install .`).
DEMO_DIR = Path(__file__).resolve().parents[1] / "pretrained_models" / "demo"
DEMO_FILES = {"mar": "mar.pt", "draft": "draft.pt", "tokenizer": "tokenizer.pt", "classifier": "classifier.pt"}

# Default sampling settings of the demo model, chosen by class accuracy over a cfg x temperature sweep of
# the shipped model (demo/TRAINING.md): temperature 0.4 trades colour variety for clean shapes.
DEMO_DEFAULTS: dict = dict(num_iter=64, cfg=3.0, cfg_schedule="linear", temperature=0.4)



def _mar_recipe(model: str, output_dir: str, export: str) -> str:
    """The CPU recipe of a demo MAR (demo/TRAINING.md) for ``--model model``, then its export."""
    return (f"python train.py --model {model} --patch_size 2 --data_style simple --num_per_class 5000 --epochs 10 "
            "--batch_size 64 --lr 1e-3 --min_lr_ratio 0.05 --warmup_steps 200 --ema_rate 0.999 --ema_warmup "
            "--noise_schedule linear --pos_init sincos --precision auto --diffusion_batch_mul 1 --threads 2 "
            f"--output_dir {output_dir} --save_every_minutes 10 && "
            f"python train.py --output_dir {output_dir} --export pretrained_models/demo/{export} --export_dtype fp32")


# The commands that reproduce each file (run from the repository root).
REPRODUCE = {
    "tokenizer": "python -m demo.tokenizer --out pretrained_models/demo/tokenizer.pt --num_per_class 800 "
                 "--epochs 5 --batch_size 16 --lr 2e-3 --warmup_steps 100 --threads 2",
    "mar": _mar_recipe("demo", "output/demo_mar", "mar.pt"),
    "draft": _mar_recipe("demo_draft", "output/demo_draft", "draft.pt"),
    "classifier": "python -m demo.classifier --out pretrained_models/demo/classifier.pt "
                  "--epochs 6 --num_per_class 2000 --seed 0",
}


def demo_path(name: str) -> Path:
    return DEMO_DIR / DEMO_FILES[name]


def _require(name: str, path: Path) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"demo {name} checkpoint not found: {path}. Reproduce it with "
                                f"`{REPRODUCE[name]}` (see demo/TRAINING.md).")


def load_demo_mar(path: str | Path | None = None, device: str | torch.device = "cpu", *, name: str = "mar"):
    """A demo MAR (EMA weights, fp32, eval mode) from an export of train.py: ``mar.pt`` by default,
    ``name="draft"`` for the draft model's ``draft.pt``."""
    from models.mar import mar_from_config
    from util.checkpoint import CheckpointError, check_state_dict, read_checkpoint
    path = Path(path) if path is not None else demo_path(name)
    _require(name, path)
    ckpt = read_checkpoint(path)
    if "model_ema" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} holds {sorted(ckpt)}; expected an export of train.py "
                              f"('model_ema' and 'config')")
    model = mar_from_config(dict(ckpt["config"]))
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in ckpt["model_ema"].items()}
    check_state_dict(model, sd, path)
    model.load_state_dict(sd, strict=True)
    model.latent_scale = float(ckpt.get("latent_scale", 1.0))
    model.tokenizer_sha = ckpt.get("tokenizer_sha")
    model.data_style = ckpt.get("data_style", "varied")  # the shapes it learned (exports before the key: varied)
    return model.to(device).eval()


def load_demo(device: str | torch.device = "cpu", *, name: str = "mar"):
    """``(mar, vae, latent_scale)``: a demo MAR (EMA, eval; ``name="draft"``: the draft model), the demo
    tokenizer (eval) and its latent scale, checked to belong together."""
    from demo.tokenizer import load_demo_tokenizer
    mar_path, tok_path = demo_path(name), demo_path("tokenizer")
    _require("tokenizer", tok_path)
    mar = load_demo_mar(mar_path, device, name=name)
    vae, scale = load_demo_tokenizer(tok_path, device)
    from util.checkpoint import CheckpointError
    from util.hashing import file_sha256
    want = mar.tokenizer_sha
    if want is not None and want != file_sha256(tok_path):
        raise CheckpointError(
            f"{mar_path} was trained on the latents of another tokenizer than {tok_path} (SHA-256 "
            f"{want[:12]}... expected). Use the matching pair, or retrain the MAR with "
            f"`{REPRODUCE[name]}`.")
    if mar.vae_embed_dim != vae.embed_dim or mar.vae_stride != vae.stride:
        raise CheckpointError(f"{mar_path} expects {mar.vae_embed_dim}-channel latents at stride "
                              f"{mar.vae_stride}; {tok_path} gives {vae.embed_dim} at stride {vae.stride}")
    return mar, vae, scale


def _loader(name: str):
    """The loader ``util.loading.load_generator`` calls for the demo file ``name`` (``mar`` or ``draft``),
    on the CPU, with the demo tokenizer.

    The exports hold the EMA weights only (what the demo is evaluated with), so ``use_ema=False`` is
    refused rather than answered with EMA weights under a run record that says raw."""
    def load(*, ckpt=None, vae_path=None, use_ema: bool = True) -> LoadedModel:
        if ckpt is not None or vae_path is not None:
            raise ValueError("--ckpt / --vae_path apply to the released models; the demo loads its own files")
        if not use_ema:
            raise ValueError("--no_ema: the demo export holds only its EMA weights; evaluate the raw weights of a "
                             "training run by exporting them (train.py --export) or drop --no_ema")
        mar, vae, scale = load_demo(device="cpu", name=name)
        return LoadedModel(mar, vae, scale, files={"mar": demo_path(name), "tokenizer": demo_path("tokenizer")})
    return load


register_generator(DEMO_MODEL, _loader("mar"), sampling=DEMO_DEFAULTS)
register_generator(DEMO_DRAFT_MODEL, _loader("draft"), sampling=DEMO_DEFAULTS)  # sampled alone, as the demo is


def to_classifier_size(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Resize float NCHW images (any range) to ``size`` with bilinear interpolation (no-op if already)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def decode_uint8(vae, tokens: torch.Tensor, latent_scale: float, size: int | None = None):
    """Scaled latents -> uint8 NHWC numpy images (optionally resized to ``size``, e.g. 64)."""
    from demo.dataset import to_uint8
    x = vae.decode(tokens / latent_scale)
    if size is not None:
        x = to_classifier_size(x, size)
    return to_uint8(x)


@torch.no_grad()
def class_accuracy(per_class: int = 10, cfg: float | None = None, temperature: float | None = None,
                   num_iter: int | None = None, seed: int = 0, batch_size: int = 60,
                   grid: str | Path | None = None, device: str = "cpu", progress: bool = True,
                   accel=None) -> dict:
    """Sample ``per_class`` images of every class with the demo model and classify them.

    Samples come from :func:`util.generate.generate_images` (batch ``b`` seeded by ``(seed, b)``),
    are upsampled to 64x64 (bilinear) and fed to the demo classifier. Optionally writes a PNG grid
    (rows = classes). Settings default to :data:`DEMO_DEFAULTS`; ``accel`` is the acceleration (a preset
    name or config, e.g. ``lazymar.cspd_preset("cspd", draft)``; None: plain MAR).
    """
    import numpy as np
    from tqdm.auto import tqdm

    from demo.classifier import load_classifier, predict
    from demo.dataset import NUM_CLASSES, to_model_input, to_uint8
    from demo.fidelity import class_accuracy as accuracy
    from util.generate import SamplingSettings, generate_images, num_batches
    from util.loading import load_generator
    settings = dict(DEMO_DEFAULTS)
    for k, v in dict(cfg=cfg, temperature=temperature, num_iter=num_iter).items():
        if v is not None:
            settings[k] = v
    gen = load_generator(DEMO_MODEL, device=device)
    _require("classifier", demo_path("classifier"))
    clf = load_classifier(demo_path("classifier")).to(device).eval()
    labels = torch.arange(NUM_CLASSES * per_class) % NUM_CLASSES
    with tqdm(total=num_batches(len(labels), batch_size), desc=f"cfg {settings['cfg']}", unit="batch",
              disable=not progress) as bar:
        native, _ = generate_images(gen, labels, SamplingSettings(**settings, accel=accel), seed=seed,
                                    batch_size=batch_size, progress=bar)
    imgs = to_uint8(to_classifier_size(to_model_input(native), 64))
    _, logits = predict(clf, imgs)
    pred = logits.argmax(1)
    acc = accuracy(logits, labels.numpy())
    per = [float((pred[labels.numpy() == c] == c).mean()) for c in range(NUM_CLASSES)]
    if grid is not None:
        from PIL import Image
        cols = min(per_class, 10)
        canvas = np.full((NUM_CLASSES * 66, cols * 66, 3), 255, np.uint8)
        for c in range(NUM_CLASSES):
            for j in range(cols):
                canvas[c * 66:c * 66 + 64, j * 66:j * 66 + 64] = imgs[j * NUM_CLASSES + c]
        Path(grid).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas).save(grid)
    return dict(accuracy=acc, per_class=per, n=len(labels), settings=settings)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    from models.schedules import check_sampling_settings
    from util.cli import check_positive
    p = argparse.ArgumentParser(description="Class accuracy (demo classifier) of demo MAR samples")
    p.add_argument("--per_class", type=int, default=10)
    p.add_argument("--cfg", type=float, nargs="+", default=[None])
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--num_iter", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="PNG grid path (rows = classes); '{cfg}' is filled in")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    check_positive(per_class=args.per_class, threads=args.threads)
    for cfg in args.cfg:
        check_sampling_settings(num_iter=args.num_iter, cfg=cfg, temperature=args.temperature)
    torch.set_num_threads(args.threads)
    for cfg in args.cfg:
        grid = args.grid.format(cfg=cfg) if args.grid else None
        r = class_accuracy(args.per_class, cfg, args.temperature, args.num_iter, args.seed, grid=grid,
                           device=args.device)
        print(json.dumps(dict(accuracy=r["accuracy"], n=r["n"], settings=r["settings"],
                              per_class=[round(x, 2) for x in r["per_class"]], grid=grid)), flush=True)


if __name__ == "__main__":
    from util import cli
    cli.run(main)
