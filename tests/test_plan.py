"""Planning in phases: every plan field has one owner, conflicts are errors at plan time naming both
techniques, a technique is one class and one config field, and a step with several head calls needs the
technique that planned them to split the tokens among them."""
from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
import torch

from conftest import build_tiny_mar
from lazymar.config import OFF, PRESETS, AccelConfig, technique
from lazymar.plan import FIELD_MEANING, RUN_FIELDS, STEP_PHASES, HeadCall, StepPlan
from lazymar.steps import AccelSteps
from lazymar.technique import Technique


@dataclass(frozen=True)
class Settings:
    """A technique's (empty) config."""


class TwoHeadCalls(Technique):
    """Plans two head calls at every step and does not say which tokens each samples."""

    label = "TwoHeadCalls"
    writes = frozenset({"head"})

    def __init__(self, model, config, accel) -> None:
        super().__init__(model)

    def plan_head_calls(self, p: StepPlan) -> dict:
        return {"head": [HeadCall(1, 5), HeadCall(p.n_pred - 1, 5)]}


class Split(TwoHeadCalls):
    """The same, with the split: the first token of each image in the first call."""

    label = "Split"

    def split_head(self, p, z, cfg, bsz):
        rows = torch.arange(z.shape[0] // 2 if p.guided else z.shape[0], device=z.device).reshape(bsz, -1)
        return [rows[:, :1].reshape(-1), rows[:, 1:].reshape(-1)]


class OneHalf(Technique):
    """Runs the conditional half alone, like the condition cache, without declaring it."""

    label = "OneHalf"
    writes = frozenset()

    def __init__(self, model, config, accel) -> None:
        super().__init__(model)

    def plan_rows(self, p: StepPlan) -> dict:
        return {"halves": 1}


# A technique is its class plus one config field (the one registration line).
@dataclass(frozen=True)
class WithTwoHeadCalls(AccelConfig):
    two: Settings | None = technique(TwoHeadCalls, Settings())


@dataclass(frozen=True)
class WithSplit(AccelConfig):
    split: Settings | None = technique(Split, Settings())


@dataclass(frozen=True)
class WithOneHalf(AccelConfig):
    half: Settings | None = technique(OneHalf, Settings())


def off(cls):
    """``cls`` with every technique of ``OFF`` off (only its own on)."""
    return cls(**{f.name: getattr(OFF, f.name) for f in fields(OFF)})


def test_every_field_has_one_phase():
    owned = [f for phase in STEP_PHASES for f in phase.fields] + list(RUN_FIELDS)
    assert len(owned) == len(set(owned)) == len(FIELD_MEANING)
    plan_fields = {f.name for f in fields(StepPlan)}
    assert all(f in plan_fields for phase in STEP_PHASES for f in phase.fields)


def test_several_head_calls_without_a_split_is_a_plan_time_error():
    """Issue 21: a step with several head calls and no technique to split the tokens among them raised a
    bare StopIteration in the middle of sampling; it is refused when the steps are planned."""
    model = build_tiny_mar()
    with pytest.raises(ValueError, match="TwoHeadCalls plans 2 head calls at step 0 .*split_head"):
        AccelSteps(model, off(WithTwoHeadCalls), num_iter=4, guided=True)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_a_technique_in_one_file_and_one_line(cfg):
    """A new technique (here: two head calls split by a rule of its own) samples through the same step."""
    model = build_tiny_mar()
    out = model.sample_tokens(2, num_iter=4, cfg=cfg, accel=off(WithSplit), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 16, 4, 4) and torch.isfinite(out).all()


def test_undeclared_field_is_refused():
    with pytest.raises(ValueError, match="OneHalf decides 'halves'.*does not declare"):
        AccelSteps(build_tiny_mar(), off(WithOneHalf), num_iter=4, guided=True)


def test_two_deciders_of_one_field_are_named_at_plan_time(monkeypatch):
    """Config time rejects what the declarations forbid; plan time holds the techniques to them again."""
    monkeypatch.setattr(OneHalf, "writes", frozenset({"halves"}))
    with pytest.raises(ValueError, match="LazyMAR's condition cache and OneHalf both decide which guidance halves"):
        WithOneHalf()  # the condition cache is on in the defaults
    config = off(WithOneHalf)
    monkeypatch.setattr(OneHalf, "writes", frozenset({"halves", "head"}))
    monkeypatch.setattr(OneHalf, "plan_head_calls", lambda self, p: {"head": [HeadCall(p.n_pred)]}, raising=False)
    monkeypatch.setattr(TwoHeadCalls, "writes", frozenset())  # slips past the config check ...

    @dataclass(frozen=True)
    class Both(WithOneHalf):
        two: Settings | None = technique(TwoHeadCalls, Settings())

    both = Both(**{f.name: getattr(config, f.name) for f in fields(config)})
    monkeypatch.setattr(TwoHeadCalls, "writes", frozenset({"head"}))  # ... and is caught when planning
    with pytest.raises(ValueError, match="OneHalf and TwoHeadCalls both decide how the predicted tokens"):
        AccelSteps(build_tiny_mar(), both, num_iter=4, guided=True)


@pytest.mark.parametrize("config, names", [
    (dict(marche=PRESETS["marche"].marche), ("LazyMAR's token cache", "MARche")),
    (dict(recap=PRESETS["recap"].recap, token_cache=None, gtr=PRESETS["gtr"].gtr), ("GtR", "ReCAP")),
    (dict(recap=PRESETS["recap"].recap, token_cache=None, disa=PRESETS["disa"].disa), ("DiSA", "ReCAP")),
])
def test_config_conflicts_name_both_techniques(config, names):
    with pytest.raises(ValueError) as err:
        AccelConfig(**config)
    assert all(name in str(err.value) for name in names), str(err.value)


def test_gtr_yields_its_head_step_counts_to_disa():
    steps = AccelSteps(build_tiny_mar(img_size=128), PRESETS["gtr+disa+lazymar"], num_iter=32, guided=True)
    assert all(p.decided_by["head_steps"].label == "DiSA" for p in steps.plans)
    assert any(p.decided_by.get("head") is not None and p.decided_by["head"].label == "GtR" for p in steps.plans)


def test_later_phases_read_earlier_ones():
    """MARche recomputes everything where the condition cache records the guidance residual (rows phase
    before the transformer phase); ReCAP's cheap steps run their full step's rows (the condition cache
    reads the schedule's ``reuses``)."""
    model = build_tiny_mar(img_size=128)
    steps = AccelSteps(model, PRESETS["marche+lazymar"], num_iter=32, guided=True)
    marche = next(t for t in steps.techniques if t.label == "MARche")
    assert all(marche.full[p.step] for p in steps.plans if p.uncond_refresh)
    steps = AccelSteps(model, PRESETS["recap+lazymar"], num_iter=32, guided=True)
    cheap = [p for p in steps.plans if p.reuses is not None]
    assert cheap and all(p.halves == steps.plans[p.reuses].halves and not p.uncond_refresh for p in cheap)
    assert all(p.transformer is not None for p in cheap)
