"""The device a script runs on when ``--device`` is not given: the best one this machine has.

One rule for every script (eval.py, sample.py, the benchmarks): a CUDA GPU when torch sees one, else the
CPU. (Apple's MPS is not chosen on its own: the sampler is not tested there; pass ``--device mps``.)
"""
from __future__ import annotations

import torch


def best_device(index: int | None = None) -> torch.device:
    """``cuda`` (GPU ``index``; None: the current one) if torch sees a CUDA device, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda") if index is None else torch.device("cuda", index)
    return torch.device("cpu")
