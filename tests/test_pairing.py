"""Which presets have plain-MAR twins (``lazymar.names.pairs_with_plain``), checked by sampling.

A technique claims pairing when it decides none of the plan fields that change the random draws
(``lazymar.technique.DRAW_FIELDS``). Two checks that the claim is true, on test_preset_bands' model
(linear noise schedule, 32 steps, cfg 3, seed 0):
- each paired technique, present but with its approximation switched off, equals plain MAR to the float
  floor (its presence alone moves no random draw);
- at the defaults, a paired preset stays near plain (its approximation: <= 5e-2 in test_preset_bands) and
  an unpaired one is as far from plain as another seed is (>= 0.5; another seed: 1.35).
"""
from __future__ import annotations

import functools
from dataclasses import replace

import pytest

from lazymar.config import OFF, PRESETS, AccelConfig
from lazymar.names import CSPD_PRESETS, pairs_with_plain
from lazymar.head_cache import HeadCacheConfig
from lazymar.marche import MARcheConfig
from lazymar.technique import DRAW_FIELDS
from test_lazymar import linear_model, run
from test_reference import rel_err

PAIRED = {"lazymar", "lazymar-token", "lazymar-cond", "lazymar-head", "lazymar-scaled", "lazymar-off", "marche",
          "marche+lazymar"}
FLOAT_FLOOR = 1e-5  # plain MAR with another attention kernel moves by 5.6e-7 here (test_preset_bands)


@functools.lru_cache(maxsize=None)
def model():
    return linear_model(num_sampling_steps="50")


@functools.lru_cache(maxsize=None)
def tokens(accel, seed: int = 0):
    return run(model(), PRESETS.get(accel, accel), num_iter=32, cfg=3.0, seed=seed)


def test_the_claims_follow_the_draw_fields():
    assert {name for name in PRESETS if pairs_with_plain(name)} == PAIRED
    assert pairs_with_plain(None) and not any(pairs_with_plain(name) for name in CSPD_PRESETS)
    for cls, _ in AccelConfig(gtr=None).enabled():
        assert cls.draws_as_plain() == (not cls.writes & DRAW_FIELDS)


# Each paired technique with its approximation off: caches refreshed at every step, every head step
# recomputed, MARche's active set all tokens refreshed every step.
SWITCHED_OFF = {
    "token and condition caches": replace(OFF, token_cache=PRESETS["lazymar"].token_cache,
                                          condition_cache=PRESETS["lazymar"].condition_cache, refresh_warmup=1.0),
    "head cache": replace(OFF, head_cache=HeadCacheConfig(interval=0.01, mlp_warmup=1.0)),
    "marche": replace(OFF, marche=MARcheConfig(active_fraction=1.0, refresh_every=1)),
}


@pytest.mark.parametrize("name", sorted(SWITCHED_OFF))
def test_a_paired_technique_switched_off_is_plain_mar(name):
    accel = SWITCHED_OFF[name]
    assert accel.pairs_with_plain
    assert rel_err(tokens(accel), tokens(None)) < FLOAT_FLOOR


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_paired_presets_stay_near_their_twins_and_unpaired_ones_do_not(name):
    err = rel_err(tokens(name), tokens(None))
    if name in PAIRED:
        assert err <= 5e-2
    else:
        another_seed = rel_err(tokens(None, seed=1), tokens(None))
        assert err >= 0.5 and another_seed >= 0.5
