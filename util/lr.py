"""Learning-rate schedule shared by the project's training scripts (MAR, tokenizer, classifier)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, base_lr: float, warmup_steps: int, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps`` (step 0 gets ``base_lr / warmup_steps``), then a cosine
    from ``base_lr`` down to ``floor * base_lr`` at ``total_steps`` (held there afterwards)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
