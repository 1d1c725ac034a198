"""The sampling scripts' ``--compile`` / ``--cuda_graph`` flags (off by default).

``--compile`` compiles the per-step work with ``torch.compile`` (:meth:`models.mar.MAR.compile_for_sampling`);
``--cuda_graph`` also replays the compiled steps as CUDA graphs (``mode="reduce-overhead"``), which only a
CUDA device has. Both change the last bits of the arithmetic, so they are part of a run's identity.
"""
from __future__ import annotations

import argparse

import torch


def add_compile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the head's denoising step and the transformer blocks for sampling")
    parser.add_argument("--cuda_graph", action="store_true",
                        help="as --compile, and replay the compiled steps as CUDA graphs (CUDA only)")


def compile_mode(args: argparse.Namespace, device: torch.device | str) -> str | None:
    """The ``torch.compile`` mode the flags ask for on ``device`` (None: eager); a clear error for a CUDA
    graph without CUDA."""
    if getattr(args, "cuda_graph", False):
        if torch.device(device).type != "cuda":
            raise ValueError(f"--cuda_graph needs a CUDA device (this run samples on {device}); use --compile")
        return "reduce-overhead"
    return "default" if getattr(args, "compile", False) else None


def apply_compile(model, mode: str | None) -> None:
    """Compile ``model``'s sampling in ``mode`` (None: leave it eager)."""
    if mode is not None:
        model.compile_for_sampling(mode)
