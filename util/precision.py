"""Sampling precision: float32 weights always, matrix products optionally in bf16/fp16 via autocast.

Why autocast and not half-precision weights: the diffusion head's 100-step DDPM loop accumulates
its updates in the token tensor; autocast keeps that tensor (and the schedules) in float32 while the
linear layers and attention run in the low precision, which is where the time goes. Upstream MAR's
evaluation wraps its sampling in ``torch.cuda.amp.autocast()`` (fp16 on GPU; docs/REPRODUCING.md).
"""
from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str = "fp32") -> torch.autocast:
    """Context for sampling in ``precision`` on ``device`` (``fp32``: autocast disabled)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=_DTYPES.get(precision, torch.bfloat16), enabled=precision != "fp32")
