"""Pure schedule functions of MAR's masked decoding (MaskGIT/MUSE cosine masking, guidance ramps).

Everything here is a function of the step index and the step count, so it holds for any ``num_iter``.
"""
from __future__ import annotations

import math

import numpy as np

CFG_SCHEDULES = ("linear", "constant")


def check_sampling_settings(num_iter: int | None = None, cfg: float | None = None,
                            cfg_schedule: str | None = None, temperature: float | None = None) -> None:
    """Raise ``ValueError`` naming the first given sampling setting that no schedule here can honour.

    One place for the rules, so that scripts can check their flags before loading gigabytes of
    weights and the sampler checks the same ones. Settings left ``None`` are not checked.
    """
    if num_iter is not None and num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    if cfg is not None and not cfg >= 0:  # also NaN
        raise ValueError(f"cfg must be >= 0 (1.0 = no guidance, 0 = unconditional), got {cfg}")
    if cfg_schedule is not None and cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    if temperature is not None and not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def guidance_on(cfg: float) -> bool:
    """Whether a run with guidance scale ``cfg`` is guided: it runs an unconditional half beside the
    conditional one (upstream's rule). Decided once per ``sample_tokens`` call and passed down."""
    return cfg != 1.0


def next_mask_len(step: int, num_iter: int, seq_len: int, num_masked: int) -> int:
    """Number of tokens still masked after ``step`` (0-based) of ``num_iter``.

    Cosine schedule ``floor(seq_len * cos(pi/2 * (step+1)/num_iter))``, clamped so that every step unmasks
    at least one token and at least one stays masked (upstream clamps to [1, num_masked - 1]; at the last
    step the caller predicts all remaining tokens regardless).
    """
    mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
    mask_len = int(np.floor(seq_len * mask_ratio))
    return max(1, min(num_masked - 1, mask_len))


def plain_mask_lens(num_iter: int, seq_len: int) -> list[int]:
    """MAR's whole schedule: tokens left masked after each of ``num_iter`` steps (chained
    :func:`next_mask_len`; the last step predicts all that is left whatever its entry says)."""
    out, masked = [], seq_len
    for step in range(num_iter):
        masked = next_mask_len(step, num_iter, seq_len, masked)
        out.append(masked)
    return out


def guidance_scale(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
    """Classifier-free guidance scale for a step that leaves ``mask_len`` tokens masked.

    ``linear`` ramps from 1 to ``cfg`` with the fraction of tokens generated (MUSE); ``constant`` is ``cfg``.
    """
    if schedule == "linear":
        return 1 + (cfg - 1) * (seq_len - mask_len) / seq_len
    if schedule == "constant":
        return cfg
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")
