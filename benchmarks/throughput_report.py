"""The reports of :mod:`benchmarks.throughput`: one result per cell, speedups, JSON and a markdown table.

Every cell planned appears in both reports with its status (``ok``, ``skipped (budget)``, ``OOM``,
``error``): a cell that did not run is never silently left out, so a table cut by the budget says so.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PLAIN = "plain"  # accel=None: the preset every speedup is relative to
OK, SKIPPED, OOM, ERROR = "ok", "skipped (budget)", "OOM", "error"


@dataclass(frozen=True)
class Cell:
    """One measurement: ``batch`` images of ``model`` sampled with ``preset`` in ``precision``."""

    model: str
    batch: int
    preset: str
    precision: str


@dataclass
class Result:
    """What one cell gave.

    Attributes:
        cell: what was measured.
        status: ``ok``, ``skipped (budget)``, ``OOM`` or ``error``.
        tflops_per_image: from :func:`lazymar.flops.estimate` (known for every cell, run or not).
        seconds: one timed generation of the whole batch (``ok`` only). 0.0 means the clock did not
            advance (a clock coarser than the work): reported as such, and nothing is divided by it.
        speedup: plain seconds / these seconds, same model, batch and precision; None when either did
            not run or measured no time.
        peak_mem_gib: peak device memory of the timed generation (CUDA only).
        detail: why a cell is not ``ok`` (the exception's first line), empty otherwise.
    """

    cell: Cell
    status: str
    tflops_per_image: float
    seconds: float | None = None
    speedup: float | None = None
    peak_mem_gib: float | None = None
    detail: str = ""

    @property
    def measured(self) -> bool:
        """Ran, and took a time that can be divided by."""
        return self.status == OK and self.seconds is not None and self.seconds > 0

    @property
    def images_per_s(self) -> float | None:
        return self.cell.batch / self.seconds if self.measured else None

    @property
    def tflops_per_s(self) -> float | None:
        """Achieved TFLOP/s: how far a cell is from the device's peak (compute-bound or launch-bound)."""
        ips = self.images_per_s
        return ips * self.tflops_per_image if ips is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self.cell), "status": self.status, "seconds": self.seconds,
                "images_per_s": self.images_per_s, "speedup": self.speedup,
                "tflops_per_image": self.tflops_per_image, "tflops_per_s": self.tflops_per_s,
                "peak_mem_gib": self.peak_mem_gib, "detail": self.detail}


def fill_speedups(results: Sequence[Result]) -> None:
    """Set each result's speedup against the plain cell of its model, batch and precision."""
    plain = {(r.cell.model, r.cell.batch, r.cell.precision): r.seconds
             for r in results if r.cell.preset == PLAIN and r.measured}
    for r in results:
        base = plain.get((r.cell.model, r.cell.batch, r.cell.precision))
        r.speedup = base / r.seconds if base is not None and r.measured else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` in ``spec``, in 3 significant digits where ``spec`` would round it to zero (tiny models)."""
    if value is None:
        return "-"
    text = f"{value:{spec}}"
    return (f"{value:.3g}" if value and float(text) == 0 else text) + suffix


def format_markdown(meta: dict[str, Any], results: Sequence[Result]) -> str:
    """Device, versions, command and settings, then a row per cell in the order they ran."""
    lines = [f"GPU throughput of sampling: {meta['device_name']}, torch {meta['torch']} (CUDA {meta['cuda']}), "
             f"float32 matmul precision '{meta['float32_matmul_precision']}'",
             "",
             f"`{meta['command']}`",
             "",
             f"{meta['num_iter']} MAR steps, cfg {meta['cfg']} ({meta['cfg_schedule']}), "
             f"{meta['num_sampling_steps']} head steps, random weights, VAE decode excluded; one timed "
             f"generation per cell after {meta['warmup_runs']} identical untimed one(s); compile "
             f"{meta['compile'] or 'off'}; budget {meta['budget_s']:g} s, {meta['elapsed_s']:.1f} s used.",
             "",
             "| model | batch | preset | precision | s / batch | images/s | speedup | TFLOPs / image | "
             "TFLOP/s | peak GiB | status |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        status = f"{r.status}: {r.detail}" if r.detail else r.status
        if r.status == OK and not r.measured:
            status = f"{OK}: no time measured"
        lines.append(f"| {r.cell.model} | {r.cell.batch} | {r.cell.preset} | {r.cell.precision} | "
                     f"{_fmt(r.seconds, '.3f')} | {_fmt(r.images_per_s, '.2f')} | {_fmt(r.speedup, '.2f', 'x')} | "
                     f"{_fmt(r.tflops_per_image, '.2f')} | {_fmt(r.tflops_per_s, '.1f')} | {_fmt(r.peak_mem_gib, '.1f')} | "
                     f"{status.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    """Whole or not at all: the run may be interrupted while it writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_reports(meta: dict[str, Any], results: Sequence[Result], *, out_json: Path | None,
                  out_md: Path | None) -> str:
    """Fill the speedups, write the reports that have a path, and return the markdown."""
    fill_speedups(results)
    markdown = format_markdown(meta, results)
    if out_json is not None:
        _write(out_json, json.dumps({"meta": meta, "cells": [r.as_dict() for r in results]}, indent=2) + "\n")
    if out_md is not None:
        _write(out_md, markdown)
    return markdown
