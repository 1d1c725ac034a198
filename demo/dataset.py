"""Procedural, class-conditional 64x64 "shapes" dataset for the demo MAR model.

Why this exists: the released ImageNet MAR checkpoints are large and not downloadable everywhere,
so the project trains a small MAR on data it can generate itself. The data is designed for the
questions this project studies (training-free acceleration of MAR sampling), which behave
differently on flat regions and on fine detail, so every image mixes both:

* the class is a STRUCTURE (disk, ring, square, triangle, star, plus, striped disk, checkerboard,
  target, letter H, crescent, arrow) - never just a colour, so a generator must get shapes right;
* nuisance factors vary per image: position, scale, rotation, foreground / secondary / background
  colours, and a background texture (flat, smooth gradient, low-frequency noise, fine grain, faint
  stripes), plus optional shading of the shape and global film grain;
* edges are anti-aliased analytically: every class is a signed-distance function (SDF) evaluated on
  the pixel-centre grid, and coverage is ``clip(0.5 - sdf / pixel_size, 0, 1)``. This is as smooth as
  supersampling but costs a single pass at the output resolution (thousands of images/s on one core).

Determinism: the image with global index ``i`` of a split with seed ``seed`` has label ``i % C`` and
is rendered from ``np.random.default_rng([seed, label, i // C])``. Labels are therefore INTERLEAVED
(0, 1, ..., C-1, 0, 1, ...), any prefix of ``C * k`` images is balanced, and image ``i`` does not
depend on how many images the split has. Different seeds never share a random stream, so the
named splits (:data:`TRAIN_SEED`, :data:`HELDOUT_SEED`, :data:`FLOOR_SEED`) do not overlap.

CLI: ``python -m demo.dataset --out grid.png`` writes a preview grid (one row per class).
"""
from __future__ import annotations

import argparse
import colorsys
import logging
import math
import time
from functools import lru_cache
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = (
    "disk",
    "ring",
    "square",
    "triangle",
    "star",
    "plus",
    "striped_disk",
    "checkerboard",
    "target",
    "letter_H",
    "crescent",
    "arrow",
)
NUM_CLASSES: int = len(CLASS_NAMES)

TRAIN_SEED: int = 0  # training data for the demo MAR and for the demo classifier
HELDOUT_SEED: int = 1  # classifier held-out accuracy, and the reference set of the demo FID
FLOOR_SEED: int = 2  # a second held-out split: "real vs real" demo-FID floor
SPLIT_SEEDS: dict[str, int] = {"train": TRAIN_SEED, "heldout": HELDOUT_SEED, "floor": FLOOR_SEED}

DEFAULT_SIZE: int = 64

# Geometry ranges, in units of the half image width (the image spans [-1, 1]).
_SCALE_RANGE = (0.40, 0.66)  # radius of the shape's unit circle
_MARGIN = 0.96  # keep the shape's unit circle within [-_MARGIN, _MARGIN]

_BG_TEXTURES = ("flat", "gradient", "lowfreq", "grain", "stripes")


# ----------------------------------------------------------------------------------------------
# grids and helpers
# ----------------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x to the right, y downwards), float32 (size, size)."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@lru_cache(maxsize=32)
def _smooth_upsample_matrix(g: int, size: int) -> np.ndarray:
    """(size, g) row-normalised Gaussian interpolation weights: a g x g grid -> a smooth field."""
    centres = (np.arange(g, dtype=np.float64) + 0.5) / g
    x = (np.arange(size, dtype=np.float64) + 0.5) / size
    sigma = 0.55 / g
    w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / sigma) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _random_color(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.0, 1.0) ** 0.7, rng.uniform(0.08, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _contrasting_color(rng: np.random.Generator, ref: np.ndarray, min_dluma: float,
                       max_tries: int = 24) -> np.ndarray:
    """A random colour whose luma differs from ``ref`` by at least ``min_dluma``.

    Rejection sampling with a bounded number of tries (the rng stream stays deterministic);
    falls back to a luma-inverted grey-ish colour.
    """
    for _ in range(max_tries):
        c = _random_color(rng)
        if abs(_luma(c) - _luma(ref)) >= min_dluma:
            return c
    target = 1.0 if _luma(ref) < 0.5 else 0.05
    return np.full(3, target, dtype=np.float32)


def _coverage(sdf_local: np.ndarray, scale: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a local-unit SDF (negative inside)."""
    pix = 2.0 / size
    return np.clip(0.5 - sdf_local * (scale / pix), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# signed distance functions (local coordinates: the shape fits in the unit circle)
# ----------------------------------------------------------------------------------------------

def _sd_circle(px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    return np.sqrt(px * px + py * py) - r


def _sd_box(px: np.ndarray, py: np.ndarray, bx: float, by: float,
            cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    qx = np.abs(px - cx) - bx
    qy = np.abs(py - cy) - by
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside


def _sd_polygon(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Exact SDF of a simple polygon (I. Quilez' winding-number formulation), vectorised."""
    v = verts.astype(np.float32)
    d = (px - v[0, 0]) ** 2 + (py - v[0, 1]) ** 2
    inside = np.zeros(px.shape, dtype=bool)
    n = len(v)
    for i in range(n):
        vi, vj = v[i], v[i - 1]
        ex, ey = vj[0] - vi[0], vj[1] - vi[1]
        wx, wy = px - vi[0], py - vi[1]
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        bx, by = wx - ex * t, wy - ey * t
        np.minimum(d, bx * bx + by * by, out=d)
        c1 = py >= vi[1]
        c2 = py < vj[1]
        c3 = ex * wy > ey * wx
        inside ^= (c1 & c2 & c3) | ~(c1 | c2 | c3)
    return np.where(inside, -1.0, 1.0).astype(np.float32) * np.sqrt(d)


def _sd_star5(px: np.ndarray, py: np.ndarray, r: float, rf: float) -> np.ndarray:
    """Five-pointed star, outer radius ``r``, inner/outer ratio ~``rf`` (I. Quilez' folding SDF)."""
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    x = np.abs(px)
    y = -py  # point up in image coordinates (y grows downwards)
    d1 = np.maximum(k1x * x + k1y * y, 0.0) * 2.0
    x, y = x - d1 * k1x, y - d1 * k1y
    d2 = np.maximum(k2x * x + k2y * y, 0.0) * 2.0
    x, y = x - d2 * k2x, y - d2 * k2y
    x = np.abs(x)
    y = y - r
    bax, bay = rf * (-k1y), rf * k1x - 1.0
    h = np.clip((x * bax + y * bay) / (bax * bax + bay * bay), 0.0, r)
    dx, dy = x - bax * h, y - bay * h
    return np.sqrt(dx * dx + dy * dy) * np.sign(y * bax - x * bay)


# ----------------------------------------------------------------------------------------------
# classes: each returns (alpha SDF, optional pattern SDF for the fg/secondary colour mix)
# ----------------------------------------------------------------------------------------------

ShapeOut = tuple[np.ndarray, "np.ndarray | None"]
ShapeFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], ShapeOut]


def _shape_disk(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    return _sd_circle(px, py, rng.uniform(0.8, 1.0)), None


def _shape_ring(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    half_w = rng.uniform(0.13, 0.22)
    r_mid = 1.0 - half_w
    return np.abs(np.sqrt(px * px + py * py) - r_mid) - half_w, None


def _shape_square(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    b = rng.uniform(0.62, 0.72)
    rounding = rng.uniform(0.0, 0.12)
    return _sd_box(px, py, b - rounding, b - rounding) - rounding, None


def _shape_triangle(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    a = np.array([[0.0, -1.0], [math.sin(2 * math.pi / 3), 0.5], [-math.sin(2 * math.pi / 3), 0.5]])
    return _sd_polygon(px, py, a * 1.02), None


def _shape_star(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    return _sd_star5(px, py, 1.0, rng.uniform(0.40, 0.52)), None


def _shape_plus(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    t = rng.uniform(0.20, 0.30)
    arm = rng.uniform(0.85, 0.98)
    return np.minimum(_sd_box(px, py, arm, t), _sd_box(px, py, t, arm)), None


def _shape_striped_disk(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    period = rng.uniform(0.42, 0.55)
    phase = rng.random()
    q = px / period + phase
    stripes = (np.abs(q - np.floor(q) - 0.5) - 0.25) * period
    return _sd_circle(px, py, 1.0), stripes


def _shape_checkerboard(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    n = int(rng.integers(3, 5))  # 3 or 4 cells per side
    half = 0.70
    cell = 2.0 * half / n
    ux = (px + half) / (2.0 * cell)
    uy = (py + half) / (2.0 * cell)
    ax = np.abs(ux - np.floor(ux) - 0.5) - 0.25
    ay = np.abs(uy - np.floor(uy) - 0.5) - 0.25
    checker = -np.sign(ax * ay) * np.minimum(np.abs(ax), np.abs(ay)) * (2.0 * cell)
    return _sd_box(px, py, half, half), checker


def _shape_target(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    # centre disk of radius p/2 and rings [p, 1.5p], [2p, 2.5p] with 2.5p = outer radius
    outer = rng.uniform(0.92, 1.0)
    p = outer / 2.5
    r = np.sqrt(px * px + py * py)
    q = np.maximum(r, 0.25 * p) / p - 0.25  # clamp the centre so the disk has no inner edge
    tri = np.abs(q - np.floor(q) - 0.5) - 0.25  # > 0 where (r mod p) < p/2: the disk and the rings
    return np.maximum(-tri * p, r - outer), None


def _shape_letter_h(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    t = rng.uniform(0.15, 0.21)
    h = rng.uniform(0.80, 0.92)
    xoff = rng.uniform(0.48, 0.58)
    left = _sd_box(px, py, t, h, cx=-xoff)
    right = _sd_box(px, py, t, h, cx=xoff)
    bar = _sd_box(px, py, xoff, t * 0.9)
    return np.minimum(np.minimum(left, right), bar), None


def _shape_crescent(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    r2 = rng.uniform(0.78, 0.92)
    off = rng.uniform(0.42, 0.58)
    return np.maximum(_sd_circle(px, py, 1.0), -_sd_circle(px - off, py, r2)), None


def _shape_arrow(px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> ShapeOut:
    t = rng.uniform(0.15, 0.22)
    hw = rng.uniform(0.50, 0.66)
    neck = rng.uniform(0.05, 0.25)
    verts = np.array([[-1.0, -t], [neck, -t], [neck, -hw], [1.0, 0.0], [neck, hw], [neck, t], [-1.0, t]])
    return _sd_polygon(px, py, verts), None


_SHAPES: tuple[ShapeFn, ...] = (
    _shape_disk,
    _shape_ring,
    _shape_square,
    _shape_triangle,
    _shape_star,
    _shape_plus,
    _shape_striped_disk,
    _shape_checkerboard,
    _shape_target,
    _shape_letter_h,
    _shape_crescent,
    _shape_arrow,
)
assert len(_SHAPES) == NUM_CLASSES


# ----------------------------------------------------------------------------------------------
# background
# ----------------------------------------------------------------------------------------------

def _background(rng: np.random.Generator, base: np.ndarray, size: int,
                textures: tuple[str, ...] = _BG_TEXTURES) -> np.ndarray:
    """Background (size, size, 3) float32: base colour plus one of ``textures`` (drawn when several)."""
    x, y = _grid(size)
    kind = textures[int(rng.integers(len(textures)))] if len(textures) > 1 else textures[0]
    if kind == "flat":
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind == "gradient":
        ang = rng.uniform(0.0, 2.0 * math.pi)
        tint = rng.normal(0.0, 1.0, 3).astype(np.float32)
        tint = tint / (np.linalg.norm(tint) + 1e-6) * rng.uniform(0.10, 0.22) + rng.uniform(-0.1, 0.1)
        ramp = (x * math.cos(ang) + y * math.sin(ang)) * 0.5
        return base + ramp[..., None] * tint
    if kind == "lowfreq":
        g = int(rng.integers(3, 7))
        a = _smooth_upsample_matrix(g, size)
        coarse = rng.standard_normal((3, g, g)).astype(np.float32)
        mono = rng.uniform(0.3, 1.0)  # mostly luminance, some chroma
        coarse = mono * coarse[:1] + (1.0 - mono) * coarse
        field = np.einsum("ia,cab,jb->ijc", a, coarse, a, optimize=True)
        field *= rng.uniform(0.05, 0.11) / (field.std() + 1e-6)
        return base + field
    if kind == "grain":
        sigma = rng.uniform(0.03, 0.075)
        return base + rng.standard_normal((size, size, 1), dtype=np.float32) * sigma
    # faint stripes: low amplitude so they never look like the "striped_disk" class
    ang = rng.uniform(0.0, math.pi)
    period = rng.uniform(0.10, 0.25)
    amp = rng.uniform(0.025, 0.055)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    wave = np.sin((x * math.cos(ang) + y * math.sin(ang)) * (2.0 * math.pi / period) + phase) * amp
    return base + wave[..., None]


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeStyle:
    """What varies in an image besides its class: the nuisance factors of a split.

    Attributes:
        backgrounds: background textures drawn from (one name: no draw), see ``_BG_TEXTURES``.
        shading_prob: probability of a soft shading across the shape (0: never, and no draw).
        grain_prob: probability of global film grain (0: never, and no draw).
        scale_range: radius of the shape's unit circle, in half image widths.
        centre_jitter: the centre is uniform in ``[-j, j]^2``; ``None``: anywhere the shape fits.
        rotation: the angle is uniform in ``[-r, r]`` radians; ``None``: any angle.
        colours: ``"independent"`` (background, shape and pattern colours drawn apart, with luma
            contrast) or ``"inverse"`` (the shape is the RGB inverse of the background and patterns
            alternate the two, so one colour decides the image's palette).
    """

    backgrounds: tuple[str, ...] = _BG_TEXTURES
    shading_prob: float = 0.35
    grain_prob: float = 0.25
    scale_range: tuple[float, float] = _SCALE_RANGE
    centre_jitter: float | None = None
    rotation: float | None = None
    colours: str = "independent"

    def __post_init__(self) -> None:
        if not self.backgrounds or set(self.backgrounds) - set(_BG_TEXTURES):
            raise ValueError(f"backgrounds must be a non-empty subset of {_BG_TEXTURES}, got {self.backgrounds}")
        if self.colours not in ("independent", "inverse"):
            raise ValueError(f"colours must be 'independent' or 'inverse', got {self.colours!r}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= _MARGIN:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi <= {_MARGIN}, got {self.scale_range}")
        if self.centre_jitter is not None and not 0 <= self.centre_jitter <= _MARGIN - hi:
            raise ValueError(f"centre_jitter must be in [0, {_MARGIN - hi:.2f}] (the shape stays inside), "
                             f"got {self.centre_jitter}")
        for name in ("shading_prob", "grain_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


# The named styles. "varied" is the full distribution: the classifier and the tokenizer are trained on it.
# "simple" is what the demo MAR learns on 2 CPU cores (demo/TRAINING.md, "Data"): flat backgrounds, no
# shading or grain, the shape near the centre at a narrow range of sizes and a small tilt, and the
# shape's colour tied to the background's, so an image's palette is one draw. Every class is still a
# structure, never a colour, and colours and geometry still vary from image to image.
STYLES: dict[str, ShapeStyle] = {
    "varied": ShapeStyle(),
    "simple": ShapeStyle(backgrounds=("flat",), shading_prob=0.0, grain_prob=0.0, scale_range=(0.55, 0.66),
                         centre_jitter=0.08, rotation=0.15, colours="inverse"),
}
DEFAULT_STYLE = "varied"
_MIN_BG_LUMA_GAP = 0.17  # "inverse" colours: |luma - 0.5| of the background, so the inverse contrasts


def shape_style(style: str | ShapeStyle) -> ShapeStyle:
    """A style by name (see :data:`STYLES`) or as given."""
    if isinstance(style, ShapeStyle):
        return style
    if style not in STYLES:
        raise ValueError(f"unknown data style {style!r}; choose one of {sorted(STYLES)}")
    return STYLES[style]


def _palette(rng: np.random.Generator, colours: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background, shape, pattern) colours."""
    if colours == "independent":  # shape contrasts the background by >= 0.28 luma, pattern the shape by 0.22
        bg_col = _random_color(rng)
        fg_col = _contrasting_color(rng, bg_col, 0.28)
        return bg_col, fg_col, _contrasting_color(rng, fg_col, 0.22)
    for _ in range(24):  # bounded rejection: the rng stream stays deterministic
        bg_col = _random_color(rng)
        if abs(_luma(bg_col) - 0.5) >= _MIN_BG_LUMA_GAP:
            break
    return bg_col, 1.0 - bg_col, bg_col


def render(label: int, rng: np.random.Generator, size: int = DEFAULT_SIZE,
           style: str | ShapeStyle = DEFAULT_STYLE) -> np.ndarray:
    """Render one image of class ``label``.

    Args:
        label: class index in ``[0, NUM_CLASSES)`` (see :data:`CLASS_NAMES`).
        rng: random generator; the image is a deterministic function of its state.
        size: output height and width in pixels (geometry is resolution independent).
        style: a name of :data:`STYLES` or a :class:`ShapeStyle`.

    Returns:
        ``(size, size, 3)`` uint8 RGB image.
    """
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")
    st = shape_style(style)
    x, y = _grid(size)

    bg_col, fg_col, c2_col = _palette(rng, st.colours)
    img = _background(rng, bg_col, size, st.backgrounds)

    # geometry
    scale = rng.uniform(*st.scale_range)
    lim = _MARGIN - scale if st.centre_jitter is None else st.centre_jitter
    cx, cy = rng.uniform(-lim, lim, 2)
    ang = rng.uniform(0.0, 2.0 * math.pi) if st.rotation is None else rng.uniform(-st.rotation, st.rotation)
    ca, sa = math.cos(ang), math.sin(ang)
    dx, dy = x - cx, y - cy
    px = (dx * ca + dy * sa) / scale
    py = (-dx * sa + dy * ca) / scale

    sdf, pattern = _SHAPES[int(label)](px, py, rng)
    alpha = _coverage(sdf, scale, size)[..., None]

    if pattern is not None:
        mix = _coverage(pattern, scale, size)[..., None]
        fg = c2_col + (fg_col - c2_col) * mix
    else:
        fg = np.broadcast_to(fg_col, (size, size, 3))
    if st.shading_prob and rng.random() < st.shading_prob:  # soft shading across the shape
        s_ang = rng.uniform(0.0, 2.0 * math.pi)
        k = rng.uniform(0.10, 0.25)
        shade = 1.0 + k * (px * math.cos(s_ang) + py * math.sin(s_ang)) * 0.5
        fg = fg * shade[..., None]

    img = img + (fg - img) * alpha
    if st.grain_prob and rng.random() < st.grain_prob:  # global film grain: fine detail on the shape too
        img = img + rng.standard_normal((size, size, 1), dtype=np.float32) * rng.uniform(0.01, 0.03)

    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def index_to_label(index: int) -> tuple[int, int]:
    """Global index -> (label, k): image ``index`` is the ``k``-th image of class ``label``.

    Args:
        index: global image index within a split (labels are interleaved).
    """
    return int(index) % NUM_CLASSES, int(index) // NUM_CLASSES


def render_index(index: int, seed: int, size: int = DEFAULT_SIZE,
                 style: str | ShapeStyle = DEFAULT_STYLE) -> tuple[np.ndarray, int]:
    """Render the image with global ``index`` of the split with ``seed``.

    Args:
        index: global image index (label ``index % NUM_CLASSES``).
        seed: split seed, e.g. :data:`TRAIN_SEED` or :data:`HELDOUT_SEED`.
        size: output resolution.
        style: a name of :data:`STYLES` or a :class:`ShapeStyle`.

    Returns:
        (uint8 image (size, size, 3), label)
    """
    label, k = index_to_label(index)
    rng = np.random.default_rng([int(seed), label, k])
    return render(label, rng, size, style), label


def split_labels(num_per_class: int) -> np.ndarray:
    """Labels of a split with ``num_per_class`` images per class (interleaved), int64 (N,).

    Args:
        num_per_class: images per class.
    """
    return np.arange(num_per_class * NUM_CLASSES, dtype=np.int64) % NUM_CLASSES


def make_split(num_per_class: int, seed: int, size: int = DEFAULT_SIZE,
               style: str | ShapeStyle = DEFAULT_STYLE) -> tuple[np.ndarray, np.ndarray]:
    """Render a balanced split.

    Labels are interleaved: image ``i`` has label ``i % NUM_CLASSES`` and is rendered from
    ``np.random.default_rng([seed, label, i // NUM_CLASSES])``, so it does not depend on
    ``num_per_class`` and the same seed always gives identical bytes.

    Args:
        num_per_class: images per class (N = num_per_class * NUM_CLASSES).
        seed: split seed (see :data:`SPLIT_SEEDS`).
        size: output resolution.
        style: a name of :data:`STYLES` or a :class:`ShapeStyle` (the same seed in another style is
            another set of images).

    Returns:
        (images uint8 (N, size, size, 3), labels int64 (N,))
    """
    if num_per_class < 0:
        raise ValueError(f"num_per_class must be >= 0, got {num_per_class}")
    labels = split_labels(num_per_class)
    st = shape_style(style)
    images = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for i in range(len(labels)):
        images[i] = render_index(i, seed, size, st)[0]
    return images, labels


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (or HWC) images -> float NCHW (or CHW) tensor in [-1, 1].

    Args:
        images: uint8 array/tensor of shape (..., H, W, 3).
    """
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    t = t.movedim(-1, -3).float()
    return t / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float NCHW images in [-1, 1] (clamped) -> uint8 NHWC numpy: the inverse of :func:`to_model_input`."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class ShapesDataset(Dataset):
    """Torch dataset over a procedural split: items are (float tensor (3, H, W) in [-1, 1], label).

    Args:
        num_per_class: images per class (length = num_per_class * NUM_CLASSES).
        seed: split seed; use :data:`TRAIN_SEED` / :data:`HELDOUT_SEED` / :data:`FLOOR_SEED`
            (or ``split=`` by name).
        size: resolution.
        split: optional split name (``'train'``, ``'heldout'``, ``'floor'``); overrides ``seed``.
        precompute: render everything up front (fast indexing, N*size*size*3 bytes of RAM);
            if False, each item is rendered on access (still deterministic).
        style: a name of :data:`STYLES` or a :class:`ShapeStyle`.
    """

    def __init__(self, num_per_class: int = 1000, seed: int = TRAIN_SEED, size: int = DEFAULT_SIZE,
                 split: str | None = None, precompute: bool = True,
                 style: str | ShapeStyle = DEFAULT_STYLE) -> None:
        if split is not None:
            if split not in SPLIT_SEEDS:
                raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
            seed = SPLIT_SEEDS[split]
        self.num_per_class = int(num_per_class)
        self.seed = int(seed)
        self.size = int(size)
        self.style = shape_style(style)
        self.labels = split_labels(self.num_per_class)
        self.images: np.ndarray | None = None
        if precompute:
            t0 = time.perf_counter()
            self.images, _ = make_split(self.num_per_class, self.seed, self.size, self.style)
            logger.debug("rendered %d images (seed %d) in %.2fs", len(self.labels), self.seed,
                         time.perf_counter() - t0)

    def __len__(self) -> int:
        return len(self.labels)

    def uint8_image(self, index: int) -> np.ndarray:
        """The raw uint8 (H, W, 3) image at ``index``.

        Args:
            index: global image index.
        """
        if self.images is not None:
            return self.images[index]
        return render_index(index, self.seed, self.size, self.style)[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_model_input(self.uint8_image(index)), int(self.labels[index])


# ----------------------------------------------------------------------------------------------
# CLI: preview grid
# ----------------------------------------------------------------------------------------------

def preview_grid(num_cols: int = 12, seed: int = TRAIN_SEED, size: int = DEFAULT_SIZE,
                 zoom: int = 2, pad: int = 2, label_width: int = 96, style: str | ShapeStyle = DEFAULT_STYLE):
    """A PIL image with one row per class (class name on the left).

    Args:
        num_cols: examples per class.
        seed: split seed the examples come from (first ``num_cols`` of each class).
        size: image resolution.
        zoom: integer nearest-neighbour magnification for viewing.
        pad: pixels between tiles.
        label_width: width of the class-name column in pixels.
        style: a name of :data:`STYLES` or a :class:`ShapeStyle`.
    """
    from PIL import Image, ImageDraw

    tile = size * zoom
    width = label_width + num_cols * (tile + pad) + pad
    height = NUM_CLASSES * (tile + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for label, name in enumerate(CLASS_NAMES):
        top = pad + label * (tile + pad)
        draw.text((4, top + tile // 2 - 6), f"{label}: {name}", fill=(0, 0, 0))
        for k in range(num_cols):
            img = render_index(k * NUM_CLASSES + label, seed, size, style)[0]
            im = Image.fromarray(img).resize((tile, tile), Image.NEAREST)
            canvas.paste(im, (label_width + pad + k * (tile + pad), top))
    return canvas


def benchmark(n: int = 2000, size: int = DEFAULT_SIZE) -> float:
    """Images per second of :func:`render_index` on the current thread.

    Args:
        n: number of images to render.
        size: resolution.
    """
    t0 = time.perf_counter()
    for i in range(n):
        render_index(i, 12345, size)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Preview the procedural demo shapes dataset.")
    parser.add_argument("--out", default="grid.png", help="output PNG path")
    parser.add_argument("--cols", type=int, default=12, help="examples per class")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--zoom", type=int, default=2)
    parser.add_argument("--style", default=DEFAULT_STYLE, choices=sorted(STYLES))
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="also time rendering N images and print images/s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    preview_grid(args.cols, args.seed, args.size, args.zoom, style=args.style).save(args.out)
    logger.info("wrote %s (%d classes x %d)", args.out, NUM_CLASSES, args.cols)
    if args.benchmark:
        logger.info("throughput: %.0f images/s at %dx%d", benchmark(args.benchmark, args.size),
                    args.size, args.size)


if __name__ == "__main__":
    main()
