"""Every preset against plain MAR on the same weights: a measured error band for each, with and without
guidance, so that a preset that silently does nothing, or something else, fails.

Setting: test_lazymar's model (8x8 tokens + 4 buffer, 5 decoder blocks, head adaLN perturbed so that it
depends on its condition) with a 50-step head and the linear noise schedule of our demo model; 32 MAR
steps, batch 2, seed 0, labels 0 and 1. Error: max |tokens - plain| / max |plain| (``rel_err``).

Why the linear schedule: the random head predicts a small eps, so its tokens are essentially its
starting noise times 1 / sqrt(alpha_bar) at the first timestep. That factor is 2.0e4 for MAR's cosine
schedule, where eps moves the tokens by ~1e-4 of them and head-side techniques disappear (the head cache
moved them by 4e-7 and 7e-7 at 16 steps, as little as an attention-kernel swap); with the linear
schedule it is 157 and the head cache moves them by 1.6e-3 and 3.8e-3. Float floor on this model: plain
MAR with the explicit instead of the fused attention kernel moves by 8.1e-7 (cfg 1) and 5.6e-7 (cfg 3).

Three kinds of preset, three kinds of band, each from the value measured here (in the comment):
- same random draws as plain MAR, approximate transformer or head (LazyMAR's caches, MARche): the error
  is the technique's approximation. Band [measured / 5, 4 x measured], rounded outwards to one digit;
  every lower bound is >= 300x the float floor, every upper bound <= 0.05 (another seed: 1.52 / 1.35).
- other random draws (GtR's staged orders and schedule, DiSA's and ReCAP's head step counts: each token
  starts from other noise): another picture, about as far from plain's as another seed's. Band
  [measured / 2, 1.5 x measured] rounded outwards to 0.1: the lower bound fails a preset that returns
  plain MAR's tokens (0) or approximates them (<= 1.2e-2 above); the upper bound one that blows up (NaN
  fails every comparison) or scales the tokens (a lost DiSA clamp moves them by alpha_bar ratios).
- equal to plain by construction: ``lazymar-off``, and ``lazymar-cond`` and ``interval`` without guidance
  (the condition cache reuses the guidance residual, interval guidance decides which steps are guided;
  at cfg 1 there is neither): exactly.
- combinations (``disa+lazymar``, ...): a band of the first two kinds would hold the combination's parts
  too (``disa`` measures 1.137309 against ``disa+lazymar``'s 1.137441), so a combination that silently
  dropped a technique would pass. Band: the measured error +- half its distance to the nearest part's
  (the presets, or configs, made of a subset of its techniques: :data:`DROPPED`), rounded down to one
  digit, so every part's error lies outside it. Where a part's error is within ``SEPARATION`` (3e-5,
  ~40x the float floor; one thread against two moves these errors by <= 2e-7) of the combination's, no
  band on this error can tell them apart: those pairs (:data:`UNSEPARATED`) are held apart directly.
The FLOPs of every preset are held to a real count of its run in test_flops.py (parametrized over
PRESETS, so a new preset is counted there without an edit).
"""
from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from lazymar.config import PRESETS
from test_lazymar import linear_model, run
from test_reference import rel_err

NUM_ITER = 32
CFGS = (1.0, 3.0)
EXACT = (0.0, 0.0)
SEPARATION = 3e-5


def around(measured: float, half_width: float) -> tuple[float, float]:
    return measured - half_width, measured + half_width


# preset: (band at cfg 1, band at cfg 3)  # measured at cfg 1 / cfg 3 (combinations: their parts' errors)
BANDS = {
    "lazymar": ((8e-4, 2e-2), (2e-3, 5e-2)),  # 4.02e-3 / 1.15e-2
    "lazymar-token": ((7e-4, 2e-2), (1e-3, 3e-2)),  # 3.53e-3 / 5.75e-3
    "lazymar-cond": (EXACT, (1e-3, 3e-2)),  # 0 / 5.36e-3
    "lazymar-head": ((3e-4, 7e-3), (7e-4, 2e-2)),  # 1.59e-3 / 3.77e-3
    "lazymar-scaled": ((5e-4, 2e-2), (1e-3, 3e-2)),  # 2.56e-3 / 6.05e-3
    "lazymar-off": (EXACT, EXACT),  # 0 / 0
    "marche": ((8e-4, 2e-2), (7e-4, 2e-2)),  # 4.44e-3 / 3.80e-3
    # marche 4.443034e-3 / 3.798796e-3, lazymar 4.022378e-3 / 1.149336e-2
    "marche+lazymar": (around(4.295467e-3, 7e-5), around(4.505020e-3, 3e-4)),
    "gtr": ((0.6, 2.0), (0.7, 2.2)),  # 1.30 / 1.46
    "gtr-transformer": ((0.7, 2.1), (0.7, 2.3)),  # 1.40 / 1.51
    "gtr-diffusion": ((0.6, 1.9), (0.6, 2.1)),  # 1.23 / 1.38
    "gtr-nofts": ((0.7, 2.4), (0.7, 2.2)),  # 1.58 / 1.46
    "gtr-paper-rates": ((0.7, 2.3), (0.7, 2.3)),  # 1.49 / 1.51
    "gtr+lazymar": (around(1.294983, 2e-4), around(1.479350, 7e-3)),  # gtr 1.295444 / 1.463677
    # gtr+lazymar 1.294983 / 1.479350, gtr+marche 1.294421 / 1.464657, gtr 1.295444 / 1.463677
    "gtr+marche+lazymar": (around(1.294421, 2e-4), around(1.463688, 4e-4)),
    "disa": ((0.5, 1.8), (0.6, 1.8)),  # 1.14 / 1.20
    "disa+lazymar": (around(1.137441, 6e-5), around(1.197644, 2e-5)),  # disa 1.137309 / 1.197595
    # gtr+disa 1.324211 / 1.200646, disa+lazymar 1.137441 / 1.197644, gtr+lazymar 1.294983 / 1.479350
    "gtr+disa+lazymar": (around(1.324065, 7e-5), around(1.200579, 3e-5)),
    "recap": ((0.6, 2.0), (0.8, 2.6)),  # 1.27 / 1.69
    "recap+lazymar": (around(1.270059, 5e-5), around(1.690931, 9e-5)),  # recap 1.270166 / 1.691122
    # Interval guidance decides nothing without guidance (cfg 1), and draws other noise with it.
    "interval": (EXACT, (0.8, 2.6)),  # 0 / 1.71
    # interval 0 / 1.709794, lazymar 4.022378e-3 / 1.149336e-2 (at cfg 1 the combination is lazymar exactly)
    "interval+lazymar": (around(4.022378e-3, 2e-3), around(1.710569, 3e-4)),
}


@functools.lru_cache(maxsize=None)
def band_model():
    return linear_model(num_sampling_steps="50")


@functools.lru_cache(maxsize=None)
def tokens(accel, cfg: float) -> torch.Tensor:
    """One run per (policy, cfg) for the whole module: the same seed, labels and weights for all."""
    return run(band_model(), PRESETS.get(accel, accel), num_iter=NUM_ITER, cfg=cfg)


def test_every_preset_has_a_band():
    assert set(BANDS) == set(PRESETS), "measure the new preset's error against plain here and add its band"


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_error_band_against_plain(preset, cfg):
    if preset not in BANDS:
        pytest.fail(f"{preset!r} has no band: measure rel_err against plain MAR here and add it to BANDS")
    lo, hi = BANDS[preset][CFGS.index(cfg)]
    out, plain = tokens(preset, cfg), tokens(None, cfg)
    if (lo, hi) == EXACT:
        assert torch.equal(out, plain)
        return
    err = rel_err(out, plain)
    assert lo < err < hi, (preset, cfg, err)


# Caches added to a technique that draws other noise are invisible against plain MAR (the picture is
# another one either way): held against that technique instead, where they share its draws.
# (combination, technique): (band at cfg 1, band at cfg 3)  # measured; rule as for the caches above
ON_TOP = {
    ("disa+lazymar", "disa"): ((4e-4, 1e-2), (1e-3, 3e-2)),  # 2.47e-3 / 7.00e-3
    ("recap+lazymar", "recap"): ((3e-4, 7e-3), (9e-4, 2e-2)),  # 1.63e-3 / 4.64e-3
    # GtR + DiSA without LazyMAR's caches is no preset: the same config with the caches off.
    ("gtr+disa+lazymar", "gtr+disa"): ((4e-4, 9e-3), (5e-4, 2e-2)),  # 2.09e-3 / 2.55e-3
    ("interval+lazymar", "interval"): ((8e-4, 2e-2), (1e-3, 3e-2)),  # 4.02e-3 / 5.48e-3
}
NO_CACHES = dict(token_cache=None, condition_cache=None, head_cache=None)
PARTS = {"gtr+disa": replace(PRESETS["gtr+disa+lazymar"], **NO_CACHES),
         "gtr+marche": replace(PRESETS["gtr+marche+lazymar"], **NO_CACHES)}


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("combo, part", sorted(ON_TOP))
def test_caches_on_top_of_a_technique_act_and_stay_close(combo, part, cfg):
    lo, hi = ON_TOP[combo, part][CFGS.index(cfg)]
    err = rel_err(tokens(combo, cfg), tokens(PARTS.get(part, part), cfg))
    assert lo < err < hi, (combo, part, cfg, err)


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("combo, part", [("gtr+lazymar", "gtr"), ("gtr+marche+lazymar", "gtr+lazymar")])
def test_gtr_combinations_change_what_gtr_runs(combo, part, cfg):
    """LazyMAR's caches on GtR, and MARche on those, each change the run (at 16 steps GtR's 6 steps are
    all refresh steps and MARche changed nothing: 32 steps here). No closeness band: FTS gives more head
    steps to its top-scoring tokens, and a 1e-3 change of a condition can reorder that top list, after
    which the tokens draw other noise. Measured: 3.57e-3 and 1.65e-3 at cfg 1 (same FTS choice), 1.07
    and 0.995 at cfg 3 (another one). The lower bound is ~100x the float floor; the upper is another
    seed's distance (1.52 / 1.35) x 1.3."""
    err = rel_err(tokens(combo, cfg), tokens(part, cfg))
    assert 1e-4 < err < 2.0, (combo, part, cfg, err)


# combination: what it runs if a technique is silently dropped (the presets, or PARTS' configs, made of a
# subset of its techniques)
DROPPED = {
    "gtr+lazymar": ("gtr", "lazymar"),
    "marche+lazymar": ("marche", "lazymar"),
    "gtr+marche+lazymar": ("gtr+marche", "gtr+lazymar", "marche+lazymar", "gtr", "marche", "lazymar"),
    "disa+lazymar": ("disa", "lazymar"),
    "recap+lazymar": ("recap", "lazymar"),
    "gtr+disa+lazymar": ("gtr+disa", "gtr+lazymar", "disa+lazymar", "gtr", "disa", "lazymar"),
    "interval+lazymar": ("interval", "lazymar"),
}
# (combination, part, cfg) whose errors against plain MAR differ by less than SEPARATION (measured: 5e-7,
# the same token's error, and 1.1e-5).
UNSEPARATED = {("gtr+marche+lazymar", "gtr+marche", 1.0), ("gtr+marche+lazymar", "gtr", 3.0)}
# (combination, part, cfg) equal by construction: interval guidance without guidance decides nothing.
IDENTICAL = {("interval+lazymar", "lazymar", 1.0)}


def test_every_combination_names_its_parts():
    assert set(DROPPED) == {name for name in PRESETS if "+" in name}


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("combo, part", [(c, p) for c, parts in sorted(DROPPED.items()) for p in parts])
def test_a_combination_that_drops_a_technique_fails_its_band(combo, part, cfg):
    """The part's error against plain MAR (what the combination would measure with a technique dropped)
    lies outside the combination's band; the pairs no band can separate differ directly (by 3.2e-3 and
    1.07, against a float floor of 8e-7)."""
    out = tokens(PARTS.get(part, part), cfg)
    if (combo, part, cfg) in IDENTICAL:
        assert torch.equal(tokens(combo, cfg), out), (combo, part, cfg)
        return
    if (combo, part, cfg) in UNSEPARATED:
        assert rel_err(tokens(combo, cfg), out) > 1e-4, (combo, part, cfg)
        return
    lo, hi = BANDS[combo][CFGS.index(cfg)]
    err = rel_err(out, tokens(None, cfg))
    assert not lo < err < hi, f"{part} (error {err:.7g}) passes {combo}'s band ({lo:.7g}, {hi:.7g}) at cfg {cfg}"
