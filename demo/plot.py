"""Quality vs FLOPs scatter plot of ``demo.evaluate`` rows, drawn with Pillow (no plotting dependency).

One point per (policy, step count): x = TFLOPs per image (log scale), y = demo FID (lower is better),
colour by policy, labelled with the step count; a vertical bar spans the range over seeds where the
points carry one (``demo_fid_range``). Small and plain on purpose: it goes in docs/quality.md.
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (174, 199, 232),
           (152, 223, 138), (255, 187, 120)]  # 14 colours: the comparison's 12 policies all differ


def _legend_and_save(img: Image.Image, draw: ImageDraw.ImageDraw, policies: list[str], *, x: int, top: int,
                     path: str | Path) -> Path:
    """A colour legend of ``policies`` right of the plot area (from ``x``), then the PNG at ``path``."""
    for i, name in enumerate(policies):
        colour = PALETTE[i % len(PALETTE)]
        draw.ellipse([x + 12, top + 8 + 16 * i, x + 20, top + 16 + 16 * i], fill=colour)
        draw.text((x + 26, top + 5 + 16 * i), name, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def plot_quality_vs_flops(rows, path: str | Path, size: tuple[int, int] = (720, 480)) -> Path:
    """Write the scatter plot of ``rows`` (objects with ``policy``, ``num_iter``, ``tflops_per_image``,
    ``demo_fid``) to ``path`` as PNG and return the path."""
    if not rows:
        raise ValueError("no rows to plot")
    W, H = size
    left, right, top, bottom = 70, 190, 20, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    xs = [math.log10(max(r.tflops_per_image, 1e-12)) for r in rows]
    ys = [r.demo_fid for r in rows]
    spans = [getattr(r, "demo_fid_range", (r.demo_fid, r.demo_fid)) for r in rows]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(lo for lo, _ in spans), max(hi for _, hi in spans)
    x0, x1 = (x0 - 0.05, x1 + 0.05) if x1 - x0 < 1e-9 else (x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0))
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-9 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for k in range(5):  # axis ticks
        xv, yv = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
        tx, _ = px(xv, y0)
        _, ty = px(x0, yv)
        draw.text((tx - 15, H - bottom + 5), f"{10 ** xv:.3g}", fill="black")
        draw.text((5, ty - 6), f"{yv:.3g}", fill="black")
    draw.text((left + 120, H - 20), "TFLOPs per image (log scale)", fill="black")
    draw.text((5, 2), "demo FID (lower is better)", fill="black")
    policies = list(dict.fromkeys(r.policy for r in rows))
    for r, x, y, (lo, hi) in zip(rows, xs, ys, spans):
        colour = PALETTE[policies.index(r.policy) % len(PALETTE)]
        cx, cy = px(x, y)
        if hi > lo:
            draw.line([px(x, lo), px(x, hi)], fill=colour, width=2)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        draw.text((cx + 6, cy - 6), str(r.num_iter), fill=colour)
    return _legend_and_save(img, draw, policies, x=W - right, top=top, path=path)


def plot_difference_vs_flops(rows, path: str | Path, size: tuple[int, int] = (760, 500), title: str = "",
                             band: float = 0.03) -> Path:
    """Each row's demo FID difference from plain MAR (``vs_plain``) with its 95% interval as a vertical bar,
    against its FLOPs reduction (plain / row, log scale); a grey band marks +-``band`` of plain's demo FID.

    ``rows``: :class:`demo.evaluate.Row` objects; plain MAR's rows give the reference of their step count
    and seed. Points below the zero line are better than plain.
    """
    plain = {(r.num_iter, r.seed): r for r in rows if r.policy == "plain"}
    points = []
    for r in rows:
        base = plain.get((r.num_iter, r.seed))
        if r.vs_plain is None or base is None:
            continue
        d = r.vs_plain["difference"]["demo_fid"]
        points.append((r, math.log10(base.tflops_per_image / r.tflops_per_image), d["value"], d["low"], d["high"],
                       band * base.demo_fid))
    if not points:
        raise ValueError("no rows measured against plain MAR to plot")
    W, H = size
    left, right, top, bottom = 70, 190, 30, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    x0, x1 = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
    y0 = min(min(p[3] for p in points), -max(p[5] for p in points))
    y1 = max(max(p[4] for p in points), max(p[5] for p in points))
    x0, x1 = x0 - 0.05 * (x1 - x0 + 1e-9), x1 + 0.05 * (x1 - x0 + 1e-9)
    y0, y1 = y0 - 0.05 * (y1 - y0 + 1e-9), y1 + 0.05 * (y1 - y0 + 1e-9)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    tol = max(p[5] for p in points)
    draw.rectangle([px(x0, tol), px(x1, -tol)], fill=(235, 235, 235))  # within +-band of plain
    draw.line([px(x0, 0), px(x1, 0)], fill=(120, 120, 120))
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for k in range(5):
        xv, yv = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
        tx, _ = px(xv, y0)
        _, ty = px(x0, yv)
        draw.text((tx - 15, H - bottom + 5), f"{10 ** xv:.3g}x", fill="black")
        draw.text((5, ty - 6), f"{yv:+.2f}", fill="black")
    draw.text((left + 120, H - 20), "fewer FLOPs than plain MAR (log scale)", fill="black")
    draw.text((5, 2), f"demo FID - plain's, 95% CI (below 0: better; grey: +-{band:.0%} of plain)", fill="black")
    if title:
        draw.text((5, 15), title[:120], fill=(90, 90, 90))
    policies = list(dict.fromkeys(p[0].policy for p in points))
    for r, x, y, lo, hi, _ in points:
        colour = PALETTE[policies.index(r.policy) % len(PALETTE)]
        cx, cy = px(x, y)
        draw.line([px(x, lo), px(x, hi)], fill=colour, width=2)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
    return _legend_and_save(img, draw, policies, x=W - right, top=top, path=path)
