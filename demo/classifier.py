"""Small CNN classifier for the demo shapes: the measuring stick of the demo setting.

Why: for ImageNet, sample quality is measured with Inception features (FID / IS). The demo MAR is
trained on procedural shapes (:mod:`demo.dataset`), where Inception features are both expensive on a
CPU and poorly matched to the data. This classifier is trained on the procedural train split and is
used ONLY for measurement:

* class accuracy - does a class-conditional sample show the requested class?
* "demo FID" - Frechet distance between Gaussian fits of its penultimate features
  (global-average-pooled last conv block, like Inception's pool3), see :mod:`demo.fidelity`.

It is deliberately small (~290k parameters, ~1.2 MB checkpoint, a stride-2 stem) so that training
takes a few minutes on 2 CPU cores and measuring 10k images takes seconds.

CLI (the checkpoint shipped in ``pretrained_models/demo/classifier.pt`` was made with)::

    python -m demo.classifier --out pretrained_models/demo/classifier.pt \
        --epochs 6 --num_per_class 2000 --seed 0
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from demo.dataset import CLASS_NAMES, DEFAULT_SIZE, HELDOUT_SEED, NUM_CLASSES, TRAIN_SEED, make_split
from util.checkpoint import atomic_save

logger = logging.getLogger(__name__)

DEFAULT_CLASSIFIER_PATH = Path(__file__).resolve().parents[1] / "pretrained_models" / "demo" / "classifier.pt"
TRAIN_COMMAND = ("python -m demo.classifier --out pretrained_models/demo/classifier.pt "
                 "--epochs 6 --num_per_class 2000 --seed 0")


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DemoClassifier(nn.Module):
    """VGG-style CNN: stride-2 stem, three conv stages, global average pooling, linear head.

    Input: float (N, 3, H, W) in [-1, 1] (trained at 64x64; any size works thanks to the global pool).

    Args:
        num_classes: number of output classes.
        widths: channels of the three stages; the feature dimension is ``widths[-1]``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        a, b, c = (int(w) for w in widths)
        self.num_classes = int(num_classes)
        self.widths = (a, b, c)
        self.body = nn.Sequential(
            *_conv_bn_relu(3, a, stride=2), *_conv_bn_relu(a, a), nn.MaxPool2d(2),  # 64 -> 16
            *_conv_bn_relu(a, b), *_conv_bn_relu(b, b), nn.MaxPool2d(2),  # 16 -> 8
            *_conv_bn_relu(b, c), *_conv_bn_relu(c, c),
        )
        self.head = nn.Linear(c, self.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim): globally average-pooled last conv block.

        Args:
            x: float images (N, 3, H, W) in [-1, 1].
        """
        # channels-last convolutions are ~1.4x faster on CPU (load_classifier converts the weights)
        return self.body(x.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one forward pass.

        Args:
            x: float images (N, 3, H, W) in [-1, 1].
        """
        f = self.features(x)
        return f, self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes).

        Args:
            x: float images (N, 3, H, W) in [-1, 1].
        """
        return self.head(self.features(x))


def uint8_to_input(images: torch.Tensor | np.ndarray, channels_last_input: bool = True,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 images -> float (N, 3, H, W) in [-1, 1] on ``device``.

    Args:
        images: uint8 (N, H, W, 3) if ``channels_last_input`` else (N, 3, H, W).
        channels_last_input: layout of ``images``.
        device: target device.
    """
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    if channels_last_input:
        t = t.permute(0, 3, 1, 2)
    return t.to(device).float().div_(127.5).sub_(1.0)


@torch.no_grad()
def predict(model: DemoClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 500,
            channels_last_input: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of uint8 images, batched.

    Args:
        model: classifier (put in eval mode by the caller).
        images: uint8 (N, H, W, 3) (or (N, 3, H, W) with ``channels_last_input=False``).
        batch_size: images per forward pass.
        channels_last_input: layout of ``images``.

    Returns:
        (features float32 (N, D), logits float32 (N, C))
    """
    device = next(model.parameters()).device
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        x = uint8_to_input(images[i:i + batch_size], channels_last_input, device)
        f, lg = model.features_and_logits(x)
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
    if not feats:
        return np.zeros((0, model.feature_dim), np.float32), np.zeros((0, model.num_classes), np.float32)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def accuracy(model: DemoClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Fraction of uint8 (N, H, W, 3) images classified as their label.

    Args:
        model: classifier in eval mode.
        images: uint8 images (N, H, W, 3).
        labels: int labels (N,).
        batch_size: images per forward pass.
    """
    _, logits = predict(model, images, batch_size)
    return float((logits.argmax(1) == np.asarray(labels)).mean())


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations (every class is invariant to them), per sample."""
    n = x.shape[0]
    flip_h = torch.rand(n, generator=gen) < 0.5
    flip_v = torch.rand(n, generator=gen) < 0.5
    transpose = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(3), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(2), x)
    if x.shape[2] == x.shape[3]:
        x = torch.where(transpose[:, None, None, None], x.transpose(2, 3), x)
    return x


def train_classifier(out: str | os.PathLike | None = DEFAULT_CLASSIFIER_PATH, epochs: int = 6,
                     num_per_class: int = 2000, seed: int = 0, data_seed: int = TRAIN_SEED,
                     heldout_per_class: int = 500, batch_size: int = 128, lr: float = 3e-3,
                     weight_decay: float = 5e-4, widths: Sequence[int] = (32, 64, 128),
                     size: int = DEFAULT_SIZE, num_threads: int | None = 2,
                     progress: bool = True) -> dict[str, Any]:
    """Train :class:`DemoClassifier` on the procedural train split and report held-out accuracy.

    Deterministic given the arguments (weights init, shuffling and augmentation all use ``seed``).

    Args:
        out: checkpoint path (parent folders are created); ``None`` to not save.
        epochs: passes over the train split.
        num_per_class: train images per class (split seed ``data_seed``).
        seed: seed of the weight init, shuffling and augmentation.
        data_seed: seed of the training split (default :data:`demo.dataset.TRAIN_SEED`).
        heldout_per_class: held-out images per class (split :data:`demo.dataset.HELDOUT_SEED`).
        batch_size: minibatch size.
        lr: peak AdamW learning rate (one-cycle schedule: linear warm-up then cosine decay).
        weight_decay: AdamW weight decay.
        widths: channel widths of the three stages.
        size: image resolution.
        num_threads: ``torch.set_num_threads`` value (None leaves it alone).
        progress: show tqdm progress bars.

    Returns:
        The checkpoint dict ``{'model', 'config', 'heldout_accuracy', 'class_names', ...}``.
    """
    if data_seed == HELDOUT_SEED:
        raise ValueError("data_seed must differ from HELDOUT_SEED (held-out data must stay unseen)")
    from util.cli import check_positive
    check_positive(epochs=epochs, num_per_class=num_per_class, heldout_per_class=heldout_per_class,
                   batch_size=batch_size)  # an untrained classifier must never overwrite the shipped one
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t_start = time.perf_counter()

    logger.info("rendering train split: %d x %d images (seed %d)", num_per_class, NUM_CLASSES, data_seed)
    train_x, train_y = make_split(num_per_class, data_seed, size)
    logger.info("rendering held-out split: %d x %d images (seed %d)", heldout_per_class, NUM_CLASSES,
                HELDOUT_SEED)
    held_x, held_y = make_split(heldout_per_class, HELDOUT_SEED, size)
    train_x_t = torch.from_numpy(train_x).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    train_y_t = torch.from_numpy(train_y)

    model = DemoClassifier(NUM_CLASSES, widths).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    warmup = max(1, int(0.05 * total_steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))

    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train_y), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        loss_sum, correct, seen = 0.0, 0, 0
        for b in bar:
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x = train_x_t[idx].float().div_(127.5).sub_(1.0)
            x = _augment(x, gen)
            y = train_y_t[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if b % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        bar.close()
        model.eval()
        held_acc = accuracy(model, held_x, held_y)
        logger.info("epoch %d/%d: train loss %.4f acc %.4f | held-out acc %.4f (%.0fs)", epoch + 1, epochs,
                    loss_sum / max(seen, 1), correct / max(seen, 1), held_acc, time.perf_counter() - t_start)

    model.eval()
    model = model.to(memory_format=torch.contiguous_format)
    _, logits = predict(model, held_x)
    pred = logits.argmax(1)
    heldout_accuracy = float((pred == held_y).mean())
    per_class = {name: float((pred[held_y == c] == c).mean()) for c, name in enumerate(CLASS_NAMES)}
    config = {"num_classes": NUM_CLASSES, "widths": list(model.widths), "size": size, "epochs": epochs,
              "num_per_class": num_per_class, "seed": seed, "data_seed": data_seed,
              "heldout_seed": HELDOUT_SEED, "heldout_per_class": heldout_per_class,
              "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
    ckpt = {"model": {k: v.contiguous() for k, v in model.state_dict().items()}, "config": config,
            "heldout_accuracy": heldout_accuracy, "heldout_per_class_accuracy": per_class,
            "class_names": list(CLASS_NAMES), "train_seconds": time.perf_counter() - t_start}
    logger.info("held-out accuracy %.4f on %d images; per class: %s", heldout_accuracy, len(held_y),
                ", ".join(f"{k}={v:.3f}" for k, v in per_class.items()))
    if out is not None:
        out = atomic_save(ckpt, out)
        logger.info("saved %s (%.2f MB)", out, out.stat().st_size / 2 ** 20)
    return ckpt


def load_classifier(path: str | os.PathLike = DEFAULT_CLASSIFIER_PATH,
                    device: str | torch.device = "cpu") -> DemoClassifier:
    """Load a trained :class:`DemoClassifier` in eval mode.

    Args:
        path: checkpoint written by :func:`train_classifier`.
        device: where to put the model.

    Raises:
        FileNotFoundError: if ``path`` does not exist (the message gives the command that makes it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"demo classifier checkpoint not found: {path}. Train it (about 5 minutes on 2 CPU cores) with:\n"
            f"    {TRAIN_COMMAND.replace('pretrained_models/demo/classifier.pt', str(path))}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    model = DemoClassifier(cfg["num_classes"], cfg["widths"])
    model.load_state_dict(ckpt["model"])
    names = ckpt.get("class_names")
    if names is not None and tuple(names) != CLASS_NAMES[:len(names)]:
        logger.warning("classifier %s was trained with classes %s, dataset has %s", path, names, CLASS_NAMES)
    model.requires_grad_(False)
    return model.to(device=device, memory_format=torch.channels_last).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the demo shapes classifier (measurement only).")
    parser.add_argument("--out", default=str(DEFAULT_CLASSIFIER_PATH))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--num_per_class", type=int, default=2000, help="train images per class")
    parser.add_argument("--seed", type=int, default=0, help="init / shuffling / augmentation seed")
    parser.add_argument("--data_seed", type=int, default=TRAIN_SEED, help="train split seed")
    parser.add_argument("--heldout_per_class", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ckpt = train_classifier(args.out, epochs=args.epochs, num_per_class=args.num_per_class, seed=args.seed,
                            data_seed=args.data_seed, heldout_per_class=args.heldout_per_class,
                            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                            num_threads=args.threads, progress=not args.no_progress)
    print(f"held-out accuracy: {ckpt['heldout_accuracy']:.4f}")


if __name__ == "__main__":
    from util import cli
    cli.run(main)
