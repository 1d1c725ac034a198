"""Interval guidance (lazymar.interval_guidance): exact at both ends of its interval, composed with the
caches that hold rows across steps, priced from its plans, and searched by the planner.

The ends: the whole interval guides every step, so it is plain guided MAR bit for bit; an interval no step
falls in guides none, so it is plain MAR sampled without guidance (cfg 1.0) bit for bit (both draw the
same noise: an unguided head step draws one half's). In between, a guided step after unguided ones brings
back unconditional rows no cache holds; with every cache refreshed at every step, a composition must equal
interval guidance alone, which checks that those rows are recomputed and that the buffers grow to them.
"""
from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lazymar.config import OFF, PRESETS, AccelConfig
from lazymar.flops import estimate
from lazymar.interval_guidance import IntervalGuidanceConfig
from lazymar.marche import MARcheConfig
from lazymar.planned import config_from_dict, config_to_dict
from lazymar.recap import ReCAPConfig
from lazymar.search_space import SPACES, SearchSpace, candidates
from lazymar.steps import AccelSteps
from models.schedules import guidance_scale, plain_mask_lens
from test_lazymar import linear_model, run
from test_reference import rel_err

ROOT = Path(__file__).resolve().parents[1]
NUM_ITER, CFG = 16, 3.0
FLOAT_FLOOR = 1e-5  # as in test_pairing: another kernel path moves plain MAR by ~6e-7


@functools.lru_cache(maxsize=None)
def model():
    return linear_model(num_sampling_steps="50")


@functools.lru_cache(maxsize=None)
def tokens(accel, cfg: float = CFG) -> torch.Tensor:
    return run(model(), accel, num_iter=NUM_ITER, cfg=cfg, bsz=3)


def interval(t_min: float, t_max: float, **accel) -> AccelConfig:
    return replace(OFF, interval=IntervalGuidanceConfig(t_min, t_max), **accel)


def fractions() -> list[float]:
    """The masked fraction after each step, which decides its guidance."""
    seq_len = model().seq_len
    return [m / seq_len for m in plain_mask_lens(NUM_ITER, seq_len)]


def between() -> float:
    """A masked fraction no step leaves: an interval [x, x] there guides no step."""
    f = sorted(set(fractions()))
    return (f[0] + f[1]) / 2


def test_the_whole_interval_is_plain_guided_mar():
    assert torch.equal(tokens(interval(0.0, 1.0)), tokens(None))


def test_an_interval_no_step_falls_in_is_plain_mar_without_guidance():
    x = between()
    assert torch.equal(tokens(interval(x, x)), tokens(None, cfg=1.0))


def test_the_steps_it_guides_are_those_in_the_interval():
    config = interval(0.2, 0.6)
    steps = AccelSteps(model(), config, num_iter=NUM_ITER, guided=True)
    assert [p.guided for p in steps.plans] == [0.2 <= f <= 0.6 for f in fractions()]
    assert any(p.guided for p in steps.plans) and not all(p.guided for p in steps.plans)
    assert [p.halves for p in steps.plans] == [2 if p.guided else 1 for p in steps.plans]
    # Rows come back at the first guided step, and only there.
    first = [p.guided for p in steps.plans].index(True)
    assert [p.new_rows for p in steps.plans] == [i == first for i in range(len(steps.plans))]
    # Without guidance for the run, nothing is decided: every step unguided, one half.
    off = AccelSteps(model(), config, num_iter=NUM_ITER, guided=False)
    assert all(not p.guided and p.halves == 1 for p in off.plans)


def test_it_changes_the_samples_where_it_skips_guidance():
    # Not a no-op: skipping the first steps' guidance moves every image (another noise stream too).
    assert rel_err(tokens(interval(0.0, 0.5)), tokens(None)) > 0.3


# Every cache at its most faithful: refreshed at every step (LazyMAR), every token active (MARche). Each
# keeps per-row state across steps, so each must recompute the unconditional rows that come back.
FAITHFUL = {
    "token and condition caches": dict(token_cache=PRESETS["lazymar"].token_cache,
                                       condition_cache=PRESETS["lazymar"].condition_cache, refresh_warmup=1.0),
    "marche": dict(marche=MARcheConfig(active_fraction=1.0, refresh_every=1)),
}


@pytest.mark.parametrize("name", sorted(FAITHFUL))
def test_a_faithful_cache_with_it_is_interval_guidance_alone(name):
    alone = tokens(interval(0.0, 0.5))
    assert rel_err(tokens(interval(0.0, 0.5, **FAITHFUL[name])), alone) < FLOAT_FLOOR


def test_it_composes_with_lazymar_at_the_release_schedule():
    # The condition cache records its residual at the first guided step (it had none before), and the
    # token cache's buffers grow from one half to two there; the result stays near interval alone.
    accel = replace(PRESETS["lazymar"], interval=IntervalGuidanceConfig(0.0, 0.5), schedule_steps=None)
    steps = AccelSteps(model(), accel, num_iter=NUM_ITER, guided=True)
    first = [p.guided for p in steps.plans].index(True)
    assert steps.plans[first].refresh and steps.plans[first].uncond_refresh and steps.plans[first].halves == 2
    assert rel_err(tokens(accel), tokens(interval(0.0, 0.5))) < 0.3


def test_recap_cheap_steps_follow_their_full_step():
    accel = interval(0.0, 0.4, recap=ReCAPConfig(full_fraction=0.25, cheap_steps=2))
    steps = AccelSteps(model(), accel, num_iter=NUM_ITER, guided=True)
    cheap = [p for p in steps.plans if p.reuses is not None]
    assert cheap and all(p.guided == steps.plans[p.reuses].guided for p in cheap)
    # A group whose full step is unguided but whose cheap step would be guided exists, so the rule acts.
    assert any(not steps.plans[p.reuses].guided and 0.0 <= fractions()[p.step] <= 0.4 for p in cheap)
    run(model(), accel, num_iter=NUM_ITER, cfg=CFG, bsz=2)  # and it runs: the rows match the context


def test_the_flops_drop_by_the_unconditional_half_of_the_unguided_steps():
    m = model()
    plain = estimate(m, num_iter=NUM_ITER, cfg=CFG).total
    unguided = estimate(m, num_iter=NUM_ITER, cfg=1.0).total
    assert estimate(m, num_iter=NUM_ITER, cfg=CFG, accel=interval(0.0, 1.0)).total == plain
    x = between()
    assert estimate(m, num_iter=NUM_ITER, cfg=CFG, accel=interval(x, x)).total == unguided
    partial = estimate(m, num_iter=NUM_ITER, cfg=CFG, accel=interval(0.0, 0.5)).total
    assert unguided < partial < plain


def test_by_scale_threshold_it_guides_the_steps_whose_scale_reaches_it():
    seq_len = model().seq_len
    config = IntervalGuidanceConfig.from_scale(2.0, cfg=CFG)
    lens = plain_mask_lens(NUM_ITER, seq_len)
    scales = [guidance_scale(CFG, "linear", m, seq_len) for m in lens]
    steps = AccelSteps(model(), replace(OFF, interval=config), num_iter=NUM_ITER, guided=True)
    assert [p.guided for p in steps.plans] == [s >= 2.0 - 1e-12 for s in scales]
    assert IntervalGuidanceConfig.from_scale(2.0, cfg=CFG, cfg_schedule="constant") == IntervalGuidanceConfig(0, 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(t_min=0.6, t_max=0.5), "0 <= t_min <= t_max <= 1"),
    (dict(t_min=-0.1, t_max=0.5), "0 <= t_min <= t_max <= 1"),
    (dict(t_min=0.0, t_max=1.5), "0 <= t_min <= t_max <= 1"),
])
def test_bad_intervals_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IntervalGuidanceConfig(**kwargs)


def test_bad_scale_thresholds_are_refused():
    with pytest.raises(ValueError, match="guidance on"):
        IntervalGuidanceConfig.from_scale(1.5, cfg=1.0)
    with pytest.raises(ValueError, match=r"min_scale must be in \[1, cfg=3.0\]"):
        IntervalGuidanceConfig.from_scale(3.5, cfg=3.0)
    with pytest.raises(ValueError, match="leaves no step guided"):
        IntervalGuidanceConfig.from_scale(3.5, cfg=3.0, cfg_schedule="constant")


def test_it_has_no_plain_twins():
    assert not PRESETS["interval"].pairs_with_plain and not PRESETS["interval+lazymar"].pairs_with_plain


def test_the_planner_searches_it():
    space = SearchSpace(num_iter=(16,), cfg=(3.0,))
    cands, _ = candidates(space)
    chosen = {c.accel.interval for c in cands if c.accel is not None}
    assert chosen == {None, IntervalGuidanceConfig(t_max=0.75), IntervalGuidanceConfig(t_max=0.5)}
    assert any(c.accel is not None and c.accel.interval and c.accel.caches_transformer for c in cands)
    assert {c.accel.interval for c in candidates(SPACES["small"])[0] if c.accel} == {None, IntervalGuidanceConfig()}


def test_a_config_stored_before_the_technique_existed_loads_with_it_off():
    stored = config_to_dict(PRESETS["gtr+disa+lazymar"])
    del stored["interval"]
    assert config_from_dict(AccelConfig, stored) == PRESETS["gtr+disa+lazymar"]
    del stored["refresh_interval"]  # not a technique: still an error that names it
    with pytest.raises(ValueError, match="missing fields \\['refresh_interval'\\]"):
        config_from_dict(AccelConfig, stored)


def test_a_definition_names_the_techniques_that_are_on():
    text = PRESETS["interval+lazymar"].definition()
    assert "interval=IntervalGuidanceConfig(t_min=0.0, t_max=0.75)" in text and "token_cache=" in text
    assert "gtr=" not in text and "=None" not in text.replace("draft_accel=None", "")


def test_the_shipped_quality_tables_resume_with_the_technique_added():
    # Rows saved before interval guidance existed wrote every technique out (``gtr=None, ...``): each is
    # still the same config, and a changed setting still is not.
    from demo.evaluate import same_definition
    from lazymar.cspd import definition
    for table in ("demo_quality_t04", "demo_quality_t10"):
        saved = json.loads((ROOT / "docs" / f"{table}.json").read_text())["identity"]["presets"]
        accel = {p: text for p, text in saved.items() if not p.startswith("cspd")}
        assert accel and all(same_definition(definition(p), text) for p, text in accel.items())
    before = repr(PRESETS["lazymar"]).replace("interval=None, ", "")  # the form saved before it existed
    assert "gtr=None" in before and same_definition(definition("lazymar"), before)
    assert not same_definition(definition("lazymar"), before.replace("extra_tokens=15", "extra_tokens=16"))
