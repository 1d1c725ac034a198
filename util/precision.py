"""Sampling and training precision: float32 weights always, matrix products optionally in bf16/fp16 via autocast.

Why autocast and not half-precision weights: the diffusion head's 100-step DDPM loop accumulates
its updates in the token tensor; autocast keeps that tensor (and the schedules) in float32 while the
linear layers and attention run in the low precision, which is where the time goes. Upstream MAR's
evaluation wraps its sampling in ``torch.cuda.amp.autocast()`` (fp16 on GPU; docs/REPRODUCING.md).

``auto`` (the default of ``train.py`` and ``sample.py``) is resolved once, by :func:`resolve_precision`,
to ``bf16`` on a CPU that multiplies bf16 natively and to ``fp32`` everywhere else: without AVX-512
BF16 or AMX the bf16 products leave oneDNN for a generic kernel, and on AVX2 kernels the demo model
trained ~3x and sampled 2-2.4x slower in bf16 than in float32 (demo/TRAINING.md, "Precision by CPU").
The resolved name, never ``auto``, is what a script records, so a run says which precision it used.
"""
from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
AUTO = "auto"
PRECISION_CHOICES = (AUTO, *PRECISIONS)  # what the scripts' --precision accepts
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this process's CPU kernels multiply bf16 in hardware (AVX-512 BF16 or AMX tiles).

    Three conditions, all needed: ATen dispatches its AVX-512 kernels
    (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY=avx2`` lowers), the CPU
    has the bf16 instructions (cpuinfo), and oneDNN, which runs autocast's bf16 matmuls, may use them
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which ``ONEDNN_MAX_CPU_ISA=AVX2`` turns off).
    """
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    has = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(f is not None and f() for f in has):
        return False
    onednn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(onednn is None or onednn())


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision to run in on ``device``: ``precision`` itself, or for ``auto`` ``bf16`` on a CPU with
    native bf16 (:func:`cpu_has_native_bf16`) and ``fp32`` otherwise.

    Why fp32 on GPUs: ``auto`` decides what was measured, the CPU cases (demo/TRAINING.md); on a GPU bf16
    is a choice to make with ``--precision bf16`` (the GPU recipes name it).
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")
    if precision != AUTO:
        return precision
    return "bf16" if torch.device(device).type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device | str, precision: str = "fp32") -> torch.autocast:
    """Context for running in ``precision`` on ``device`` (``fp32``: autocast disabled).

    ``auto`` is refused: resolve it once with :func:`resolve_precision` and record what it chose.
    """
    if precision not in PRECISIONS:
        hint = " (resolve 'auto' first: util.precision.resolve_precision)" if precision == AUTO else ""
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}{hint}")
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=_DTYPES.get(precision, torch.bfloat16), enabled=precision != "fp32")
