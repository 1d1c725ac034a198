"""GtR and MARche: the formulas, the exact cases, composition with LazyMAR, any step count."""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
import torch

from conftest import build_tiny_mar
from lazymar.config import OFF, PRESETS, AccelConfig
from lazymar.flops import estimate, measure
from lazymar.gtr import (GtRConfig, fts_scores, fts_select, fts_steps_split, head_steps_of, stage_of_tokens,
                         stage_step_counts, staged_mask_lens, staged_orders)
from lazymar.marche import MARcheConfig, merge_partials, partial_attention
from lazymar.gtr import GtR
from lazymar.steps import AccelSteps
from models.mar import PlainSteps, build_released
from models.schedules import plain_mask_lens
from test_lazymar import run
from test_reference import rel_err

# 8x8 tokens + 4 buffer, 100 head steps (GtR's 50/20 steps are respacings of it).
GTR_TINY = dict(img_size=128, buffer_size=4, decoder_depth=4, num_sampling_steps="100")
NEW_PRESETS = [p for p in PRESETS if p.startswith(("gtr", "marche"))]


def model_for(**overrides):
    return build_tiny_mar(seed=0, **{**GTR_TINY, **overrides})


# ------------------------------------------------------------------------------------- GtR stages
@pytest.mark.parametrize("h, w", [(16, 16), (8, 8), (5, 7)])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_stages_cover_every_token_once(h, w, K):
    stage = stage_of_tokens(h, w, K)
    assert stage.shape == (h * w,)
    assert set(stage.tolist()) <= set(range(K))
    assert sum(int((stage == k).sum()) for k in range(K)) == h * w  # a partition: one stage per token


def test_stages_match_the_formulas():
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    d = (i + j).reshape(-1)
    s3 = stage_of_tokens(16, 16, 3)
    assert torch.equal(s3 == 0, d % 4 == 0)
    assert torch.equal(s3 == 1, d % 4 == 2)
    assert torch.equal(s3 == 2, d % 2 == 1)
    s4 = stage_of_tokens(16, 16, 4)  # the first half bisected once more
    assert torch.equal(s4 == 0, d % 8 == 0)
    assert torch.equal(s4 == 1, d % 8 == 4)
    assert torch.equal(s4 == 2, d % 4 == 2)
    assert torch.equal(s4 == 3, d % 2 == 1)
    assert [int((s3 == k).sum()) for k in range(3)] == [64, 64, 128]
    assert torch.equal(stage_of_tokens(16, 16, 1), torch.zeros(256, dtype=torch.long))


@pytest.mark.parametrize("num_iter", [1, 7, 16, 32, 64])
def test_one_stage_schedule_is_plain_mar(num_iter):
    assert staged_mask_lens([256], [num_iter]) == plain_mask_lens(num_iter, 256)


@pytest.mark.parametrize("num_iter", [16, 32, 64, 100])
def test_staged_schedule_finishes_each_stage_in_its_steps(num_iter):
    cfg = GtRConfig()
    sizes = [64, 64, 128]
    steps = stage_step_counts(num_iter, cfg, sizes)
    plan = staged_mask_lens(sizes, steps)
    assert len(plan) == sum(steps)
    assert all(a > b for a, b in zip([256] + plan, plan[:-1]))  # every step generates something
    assert plan[steps[0] - 1] == 192 and plan[steps[0] + steps[1] - 1] == 128  # stage boundaries
    assert steps == [max(1, math.floor(f * num_iter + 0.5)) for f in cfg.stage_steps]


def test_staged_orders_generate_stage_by_stage_and_keep_random_order_within():
    stage = stage_of_tokens(8, 8, 3)
    g = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(64, generator=g) for _ in range(3)])
    out = staged_orders(orders, stage)
    for row_in, row in zip(orders, out):
        assert sorted(row.tolist()) == list(range(64))
        # MAR generates from the end of an order: stage 0 last in the order, the odd half first.
        assert stage[row].tolist() == sorted(stage[row].tolist(), reverse=True)
        for k in range(3):  # relative order within a stage is the input's
            assert [p for p in row.tolist() if stage[p] == k] == [p for p in row_in.tolist() if stage[p] == k]
    assert torch.equal(staged_orders(orders, torch.zeros(64, dtype=torch.long)), orders)


def test_sampler_generates_the_stages_in_order():
    model = model_for()
    steps = AccelSteps(model, PRESETS["gtr"], num_iter=64, guided=True)
    gtr = next(t for t in steps.techniques if isinstance(t, GtR))
    plan, stage = steps.mask_lens(), stage_of_tokens(model.seq_h, model.seq_w, gtr.config.num_stages)
    orders = steps.arrange_orders(model.sample_orders(2))
    masked = torch.ones(2, 64, dtype=torch.bool)
    for i, mask_len in enumerate(plan):
        nxt = model.mask_by_order(mask_len, orders)
        pred = masked if i == len(plan) - 1 else masked & ~nxt
        stages = {int(s) for s in stage[pred[0].nonzero().flatten()]}
        assert len(stages) == 1  # a step never mixes stages
        assert (min(stages) == 2) == (i >= gtr.generation_steps)  # reconstruction = the odd half
        masked = nxt


def test_head_steps_fall_linearly_then_reconstruction():
    cfg = GtRConfig()
    G = 19
    got = [head_steps_of(s, G, cfg) for s in range(G + 1)]
    assert got[0] == 50 and got[G - 1] == 20 and got[G] == 20
    assert all(a >= b for a, b in zip(got, got[1:]))
    assert got[9] == round(50 - 30 * 9 / 18)
    assert head_steps_of(0, 1, cfg) == 50


def test_fts_scores_match_a_direct_dft():
    z = torch.randn(5, 16, dtype=torch.float64)
    D, half = 16, 8
    direct = torch.zeros(5, dtype=torch.float64)
    for m in range(1, half + 1):
        ang = 2 * math.pi * m * torch.arange(D, dtype=torch.float64) / D
        re, im = (z * torch.cos(ang)).sum(1), -(z * torch.sin(ang)).sum(1)
        direct += torch.sqrt(re ** 2 + im ** 2) * (1 + m / half)
    # Measured 3.4e-8 relative (the score is returned in float32: epsilon 1.2e-7).
    assert torch.allclose(fts_scores(z).double(), direct, rtol=1e-6, atol=0)


def test_fts_selects_the_top_fraction_of_each_image():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 7.0, 1.0, 2.0, 3.0])
    sel = fts_select(scores, rows=2, fraction=0.2)  # one of five per image
    assert sel.tolist() == [False, True, False, False, False, False, True, False, False, False]
    assert fts_steps_split(10, 20, GtRConfig()) == [(1, 50), (9, 20)]
    assert fts_steps_split(10, 20, GtRConfig(fts=False)) == [(10, 20)]


def test_gtr_one_stage_uniform_head_equals_plain_sampling():
    model = model_for()
    one = replace(OFF, gtr=GtRConfig(num_stages=1, stage_steps=(1.0,), head_steps_start=100,
                                     head_steps_end=100))
    g = torch.Generator().manual_seed(3)
    orders = torch.stack([torch.randperm(64, generator=g) for _ in range(2)])
    for num_iter, cfg in [(16, 3.0), (9, 1.0)]:
        plain = run(model, None, num_iter=num_iter, cfg=cfg, orders=orders)
        gtr = run(model, one, num_iter=num_iter, cfg=cfg, orders=orders)
        assert torch.equal(plain, gtr)


def test_gtr_ablation_switches():
    model = model_for()
    plain = run(model, None)
    assert not torch.equal(run(model, "gtr-transformer"), plain)
    assert not torch.equal(run(model, "gtr-diffusion"), plain)
    assert not torch.equal(run(model, "gtr"), run(model, "gtr-nofts"))
    # The diffusion-only ablation keeps MAR's schedule; the transformer-only one keeps 100 head steps.
    assert AccelSteps(model, PRESETS["gtr-diffusion"], num_iter=16, guided=True).mask_lens() == plain_mask_lens(16, 64)


# ------------------------------------------------------------------------------------- MARche
@pytest.mark.parametrize("n_a, n_b", [(5, 7), (0, 6), (9, 1)])
def test_log_sum_exp_merge_equals_full_attention(n_a, n_b):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 8, generator=g)
    k = torch.randn(2, 3, n_a + n_b, 8, generator=g) * 2
    v = torch.randn(2, 3, n_a + n_b, 8, generator=g)
    scale = 8 ** -0.5
    scores64 = (q.double() * scale) @ k.double().transpose(-2, -1)
    full64 = torch.softmax(scores64, dim=-1) @ v.double()  # the truth, in float64
    out_a, lse_a, _ = partial_attention(q, k[:, :, :n_a], v[:, :, :n_a], scale)
    out_b, lse_b, _ = partial_attention(q, k[:, :, n_a:], v[:, :, n_a:], scale)
    merged, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    # float32 rounding: unsplit float32 attention is 2.4-4.8e-7 from the truth here, the merge 4.8-8.3e-7
    # from the float32 unsplit result; 2e-6 is ~4x the floor, and a wrong weighting is off by O(0.1).
    assert (merged.double() - full64).abs().max() < 2e-6
    assert (lse.double() - torch.logsumexp(scores64, dim=-1)).abs().max() < 2e-6  # measured <= 4.8e-7


def recorded_inputs(model, monkeypatch, **kwargs) -> list[tuple]:
    """The inputs of every step's ``conditions`` call in a plain run."""
    records = []
    original = PlainSteps.conditions

    def record(self, step, tokens, mask, to_pred, class_embedding):
        records.append((step, tokens.clone(), mask.clone(), to_pred.clone(), class_embedding))
        return original(self, step, tokens, mask, to_pred, class_embedding)

    monkeypatch.setattr(PlainSteps, "conditions", record)
    run(model, None, **kwargs)
    monkeypatch.setattr(PlainSteps, "conditions", original)
    return records


@pytest.mark.parametrize("cfg, num_iter", [(3.0, 16), (1.0, 9)])
@pytest.mark.parametrize("cache_encoder", [False, True])
def test_marche_with_every_token_active_equals_plain(monkeypatch, cfg, num_iter, cache_encoder):
    # Step by step on the same inputs (a whole run would amplify float rounding chaotically through
    # the random-weight head): every condition equals plain MAR's to float rounding, although only
    # the first step is a refresh and every other step goes through the cached-set/active-set merge.
    # Measured: 8.7e-7 (cfg 3) and 7.3e-7 (cfg 1) of the max; plain MAR with the explicit attention
    # kernel instead of the fused one moves by 5.5e-7, so 1e-5 is ~20x the floor.
    model = model_for()
    marche = MARcheConfig(active_fraction=1.0, refresh_every=1000, cache_encoder=cache_encoder)
    steps = AccelSteps(model, replace(OFF, marche=marche), num_iter=num_iter, guided=cfg != 1.0)
    plain = PlainSteps(model, num_iter, cfg != 1.0)
    with torch.no_grad():
        for inputs in recorded_inputs(model, monkeypatch, num_iter=num_iter, cfg=cfg):
            z_plain = plain.conditions(*inputs)
            assert torch.allclose(steps.conditions(*inputs), z_plain, atol=1e-5 * z_plain.abs().max().item())


def test_marche_partial_step_beats_reusing_the_last_refresh(monkeypatch):
    """Per step, on plain MAR's recorded inputs (16 steps, cfg 3, refresh every 3): refresh steps are
    the plain computation (measured 0; float floor: an attention-kernel swap moves conditions by 5.5e-7),
    and a partial step must be closer to plain MAR than the trivial cache, the plain conditions of the
    same tokens computed from the last refresh step's inputs (what an implementation that never updates
    its active set would give). Measured relative L2 errors: MARche 0.027-0.32 against 0.033-0.75 for
    that trivial cache, a ratio of 0.43-0.81 (falling with the step), so <= 0.9 at every partial step.
    The errors are large in absolute terms because the random-weight decoder attends diffusely."""
    model = model_for()
    steps = AccelSteps(model, PRESETS["marche"], num_iter=16, guided=True)
    plain = PlainSteps(model, 16, True)
    ratios = []
    with torch.no_grad():
        for inputs in recorded_inputs(model, monkeypatch, num_iter=16, cfg=3.0):
            step, tokens, mask, to_pred, class_embedding = inputs
            z_plain = plain.conditions(*inputs)
            err = float((steps.conditions(*inputs) - z_plain).norm() / z_plain.norm())
            if step % 3 == 0:
                last = inputs
                assert err < 1e-5, (step, err)
                continue
            # Plain MAR's transformer on the stale inputs, read at this step's tokens.
            stale = [torch.cat([t, t]) for t in (last[1], last[2], to_pred)]
            z_stale = model.transformer(stale[0], stale[1].float(), last[4])[stale[2]]
            ratios.append(err / float((z_stale - z_plain).norm() / z_plain.norm()))
    assert len(ratios) == 10 and max(ratios) <= 0.9 and min(ratios) > 0.1, ratios


def test_marche_partial_steps_compute_fewer_tokens_and_stay_close():
    """Whole run, 16 steps cfg 3: MARche is 1.1e-2 from plain MAR (measured); the attention-kernel swap
    floor is 8.9e-7 and another seed (a different picture) is 1.56 away. > 1e-4 shows the partial steps
    changed the computation; < 0.05 keeps the measured error with a ~5x margin."""
    model = model_for()
    plain = run(model, None)
    marche = run(model, "marche")
    err = rel_err(marche, plain)
    assert 1e-4 < err < 0.05, err
    flops = estimate(model, num_iter=16, cfg=3.0, accel="marche").components["decoder"]
    assert flops < estimate(model, num_iter=16, cfg=3.0).components["decoder"]


def test_marche_score_reduce_ranks_cached_tokens_by_mean_or_max():
    """A crafted attention pattern (one head, two generated tokens as queries, three cached keys, total
    log-sum-exp 0 so that the probabilities are exp(score)): key 0 draws one query strongly (0.6 and
    0.01), key 1 both moderately (0.35 each), key 2 little. "mean" ranks key 1 first, "max" key 0, so
    an active set that grows by one token takes different tokens. With one head and one query the two
    reductions are the same number."""
    from lazymar.marche import score_cached
    probs = torch.tensor([[0.6, 0.35, 0.02], [0.01, 0.35, 0.02]])  # (queries, cached keys)
    scores = probs.log()[None, None]  # (R=1, H=1, Nq=2, Nc=3)
    lse, queries = torch.zeros(1, 1, 2), torch.tensor([[0, 1]])
    mean, top = score_cached(scores, lse, queries, "mean"), score_cached(scores, lse, queries, "max")
    torch.testing.assert_close(mean, torch.tensor([[0.305, 0.35, 0.02]]))
    torch.testing.assert_close(top, torch.tensor([[0.6, 0.35, 0.02]]))
    assert mean.topk(1).indices.item() == 1 and top.topk(1).indices.item() == 0
    one = torch.randn(2, 1, 3, 5)  # one head, the single generated token is query 2
    lse1, q1 = torch.logsumexp(one, dim=-1), torch.tensor([[2], [2]])
    assert torch.equal(score_cached(one, lse1, q1, "mean"), score_cached(one, lse1, q1, "max"))


# Each MARche option against the default MARche (16 steps, cfg 3, model_for(): 4 decoder blocks), alone
# and under marche+lazymar: the option changes the run by more than float rounding (an attention-kernel
# swap moves the tokens by 5-9e-7), and its FLOPs move as it says. score_reduce and include_prev change
# only the active set (which cached tokens join it; whether last step's tokens are in it from the first
# block), score_layer the block where it grows (3 = the last block here), cache_encoder the encoder.
# Band [measured / 5, 4 x measured] rounded outwards to one digit; measured alone / under marche+lazymar.
MARCHE_OPTIONS = {
    "score_reduce": (MARcheConfig(score_reduce="max"), ((2e-5, 5e-4), (6e-6, 2e-4))),  # 1.15e-4 / 3.14e-5
    "include_prev": (MARcheConfig(include_prev=False), ((2e-3, 5e-2), (9e-4, 2e-2))),  # 1.25e-2 / 4.95e-3
    "score_layer": (MARcheConfig(score_layer=3), ((3e-5, 7e-4), (1e-5, 3e-4))),  # 1.75e-4 / 6.44e-5
    "cache_encoder": (MARcheConfig(cache_encoder=True), ((1e-4, 3e-3), (3e-5, 7e-4))),  # 6.62e-4 / 1.59e-4
}
MARCHE_BASES = {"marche": OFF, "marche+lazymar": PRESETS["marche+lazymar"]}


@pytest.mark.parametrize("base", sorted(MARCHE_BASES))
@pytest.mark.parametrize("option", sorted(MARCHE_OPTIONS))
def test_marche_option_changes_the_run(option, base):
    model = model_for()
    config, bands = MARCHE_OPTIONS[option]
    default, changed = (replace(MARCHE_BASES[base], marche=c) for c in (MARcheConfig(), config))
    lo, hi = bands[sorted(MARCHE_BASES).index(base)]
    err = rel_err(run(model, changed), run(model, default))
    assert lo < err < hi, (option, base, err)
    a, b = (estimate(model, num_iter=16, cfg=3.0, accel=c).components for c in (default, changed))
    if option == "score_reduce":  # the same counts, other tokens
        assert b == a
    elif option == "cache_encoder":
        assert b["encoder"] < a["encoder"] and b["decoder"] == a["decoder"]
    else:  # a smaller active set in the first blocks (without last step's tokens; grown later)
        assert b["decoder"] < a["decoder"] and b["encoder"] == a["encoder"]
    real = measure(model, num_iter=10, cfg=2.0, accel=changed, bsz=2)
    assert real.components == estimate(model, num_iter=10, cfg=2.0, accel=changed, bsz=2).components


def test_marche_score_layer_is_clamped_to_the_last_block():
    model = model_for()
    last, beyond = (replace(OFF, marche=MARcheConfig(score_layer=k)) for k in (3, 9))
    assert torch.equal(run(model, beyond), run(model, last))


def test_marche_mean_and_max_agree_with_one_head_and_one_token_per_step():
    """64 steps on 64 tokens generate one token per step; with one decoder head the score of a cached
    token is one attention probability, its own mean and max: the runs are identical."""
    model = model_for(decoder_num_heads=1, num_sampling_steps="10")
    assert plain_mask_lens(64, 64)[:-1] == list(range(63, 0, -1))  # the last step predicts the last token
    by_mean = run(model, "marche", num_iter=64, cfg=1.0)
    assert torch.equal(run(model, replace(OFF, marche=MARcheConfig(score_reduce="max")), num_iter=64, cfg=1.0),
                       by_mean)


# ------------------------------------------------------------------------------------- composition
# Against plain MAR on the same weights, seed and labels, over the six settings below (bsz 3, the
# linear noise schedule: test_preset_bands.py says why). MARche approximates plain MAR's draws: band
# [min / 5, 4 x max] to one digit; GtR's presets draw other noise (staged orders, other head step
# counts), another picture (another seed: 1.21-1.56): band [min / 2, 1.5 x max] to 0.1. Measured min-max.
ANY_STEP_BANDS = {
    "gtr": (0.5, 2.2),  # 1.00-1.42
    "gtr-transformer": (0.5, 2.1),  # 1.16-1.39
    "gtr-diffusion": (0.5, 2.2),  # 1.09-1.42
    "gtr-nofts": (0.5, 2.1),  # 1.01-1.40
    "gtr-paper-rates": (0.5, 2.4),  # 1.13-1.56
    "gtr+lazymar": (0.5, 2.2),  # 1.00-1.42
    "gtr+marche+lazymar": (0.5, 2.2),  # 1.00-1.42
    "gtr+disa+lazymar": (0.4, 1.8),  # 0.949-1.17
    "marche": (4e-4, 3e-2),  # 2.05e-3-7.21e-3
    "marche+lazymar": (4e-4, 6e-2),  # 2.37e-3-1.26e-2
}


@functools.lru_cache(maxsize=None)
def linear_gtr_model():
    return model_for(noise_schedule="linear")


@functools.lru_cache(maxsize=None)
def linear_gtr_run(accel, num_iter: int, cfg: float) -> torch.Tensor:
    return run(linear_gtr_model(), accel, num_iter=num_iter, cfg=cfg, bsz=3)


@pytest.mark.parametrize("preset", NEW_PRESETS)
@pytest.mark.parametrize("num_iter", [16, 32, 64])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_every_preset_any_step_count_guidance_and_batch(preset, num_iter, cfg):
    out = linear_gtr_run(preset, num_iter, cfg)
    assert out.shape == (3, 16, 8, 8) and (out != 0).all()  # every token generated
    lo, hi = ANY_STEP_BANDS[preset]
    err = rel_err(out, linear_gtr_run(None, num_iter, cfg))
    assert lo < err < hi, (preset, num_iter, cfg, err)


def test_conflicting_combination_is_rejected():
    with pytest.raises(ValueError, match="token cache"):
        AccelConfig(marche=MARcheConfig())


@pytest.mark.parametrize("make", [
    lambda: GtRConfig(num_stages=0, stage_steps=()),
    lambda: GtRConfig(stage_steps=(0.5, 0.5)),
    lambda: GtRConfig(stage_steps=(0.5, 0.0, 0.1)),
    lambda: GtRConfig(fts_fraction=1.5),
    lambda: GtRConfig(fts_source="mean"),
    lambda: GtRConfig(head_steps_end=0),
    lambda: MARcheConfig(active_fraction=1.5),
    lambda: MARcheConfig(refresh_every=0),
    lambda: MARcheConfig(score_reduce="sum"),
    lambda: MARcheConfig(score_layer=-1),
])
def test_config_validation(make):
    with pytest.raises(ValueError):
        make()


def test_fts_without_the_stage_aware_head_is_refused():
    """FTS splits the stage-aware head calls; with diffusion=False there are none, and the setting was
    silently dropped."""
    with pytest.raises(ValueError, match="fts=True needs diffusion=True"):
        GtRConfig(diffusion=False)
    assert not GtRConfig(diffusion=False, fts=False).fts  # the transformer-only ablation


def test_composed_preset_is_cheaper_than_gtr_alone_on_mar_huge():
    with torch.device("meta"):
        model = build_released("mar_huge")
    base = estimate(model, num_iter=64, cfg=3.25).total
    gtr = estimate(model, num_iter=64, cfg=3.25, accel="gtr").total
    assert round(base / gtr, 2) == 3.67  # the default stage steps' ratio (lazymar/gtr.py, docs/techniques.md)
    for combo in ("gtr+lazymar", "gtr+marche+lazymar"):
        assert estimate(model, num_iter=64, cfg=3.25, accel=combo).total < gtr
