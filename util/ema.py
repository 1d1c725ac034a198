"""Exponential moving average of a model's parameters (what MAR samples with).

``ema = rate * ema + (1 - rate) * param`` after every optimiser step, over parameters only (buffers
are copied). ``state_dict()`` has the model's parameter names, so it loads straight into the model
(``MAR`` has no buffers that training changes) and is what checkpoints store as ``model_ema``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class ParamEMA:
    """Parameter EMA of ``model``.

    Args:
        model: the trained module (unwrap DDP first).
        rate: decay per update, e.g. 0.9999 (upstream MAR); short runs need faster ones (0.99-0.999).
        warmup: if True use ``min(rate, (1 + n) / (10 + n))`` at update ``n`` (as timm), so early
            averages do not stay dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, rate: float = 0.9999, warmup: bool = False) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"EMA rate must be in [0, 1], got {rate}")
        self.rate = float(rate)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {k: v.detach().clone().float() if v.is_floating_point()
                                                else v.detach().clone() for k, v in model.state_dict().items()}
        self._param_names = {n for n, _ in model.named_parameters()}

    def current_rate(self) -> float:
        if self.warmup:
            return min(self.rate, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return self.rate

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step; the floating parameters in two fused ``_foreach`` kernels (one launch per
        tensor list instead of two per parameter: the demo model has ~100 small tensors)."""
        rate = self.current_rate()
        shadows, values = [], []
        for name, value in model.state_dict().items():
            ema = self.shadow[name]
            if name in self._param_names and value.is_floating_point():
                shadows.append(ema)
                values.append(value.detach().float())
            else:
                ema.copy_(value)
        if shadows:
            torch._foreach_mul_(shadows, rate)
            torch._foreach_add_(shadows, values, alpha=1.0 - rate)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, with the model's keys (load with ``model.load_state_dict``)."""
        return {k: v.clone() for k, v in self.shadow.items()}

    def full_state(self) -> dict[str, Any]:
        """Everything needed to resume the EMA exactly."""
        return dict(shadow=self.state_dict(), num_updates=self.num_updates, rate=self.rate, warmup=self.warmup)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load either :meth:`full_state` or a plain averaged-weights dict."""
        shadow = state["shadow"] if "shadow" in state and isinstance(state["shadow"], dict) else state
        missing = set(self.shadow) - set(shadow)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} keys, e.g. {sorted(missing)[0]}")
        for k in self.shadow:
            self.shadow[k].copy_(shadow[k])
        if "num_updates" in state and not isinstance(state.get("num_updates"), torch.Tensor):
            self.num_updates = int(state["num_updates"])

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.state_dict(), strict=True)
