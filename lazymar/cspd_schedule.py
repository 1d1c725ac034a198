"""Which steps of a CSpD generation the target pre-fills, which the draft makes, and which are followed by a
verification, as released: what the sampler (:mod:`lazymar.cspd`) runs and its FLOPs count
(:mod:`lazymar.cspd_flops`) prices.
"""
from __future__ import annotations

from dataclasses import dataclass


def is_prefill(step: int, num_iter: int, ratio: float) -> bool:
    """Step ``step`` (0-based) is made by the target alone: ``step <= num_iter * ratio`` as released."""
    return step <= num_iter * ratio


def is_verification(step: int, num_iter: int, num_draft: int) -> bool:
    """A verification follows draft step ``step`` when ``step % num_draft == 0 and step != 0`` or it is the
    last: blocks end at multiples of ``num_draft``, not counted from the end of pre-fill."""
    return (step % num_draft == 0 and step != 0) or step == num_iter - 1


@dataclass(frozen=True)
class CSpDStepPlan:
    """The layout of a generation: which steps pre-fill, which draft, which are followed by a verification."""

    num_iter: int
    prefill: tuple[int, ...]
    drafts: tuple[int, ...]
    verifications: tuple[int, ...]

    @classmethod
    def of(cls, num_iter: int, ratio: float, num_draft: int) -> "CSpDStepPlan":
        prefill = tuple(s for s in range(num_iter) if is_prefill(s, num_iter, ratio))
        drafts = tuple(s for s in range(num_iter) if not is_prefill(s, num_iter, ratio))
        return cls(num_iter, prefill, drafts, tuple(s for s in drafts if is_verification(s, num_iter, num_draft)))
