"""DiSA and ReCAP: the released samplers reproduced from their own arguments, and the behaviour the
releases leave implicit (any step count, guidance on or off, any batch, composition rules)."""
from __future__ import annotations

import functools
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from benchmarks.flops import main as flops_main
from conftest import build_tiny_mar, load_reference
from lazymar import PRESETS, AccelConfig, DiSAConfig, GtRConfig, MARcheConfig, ReCAPConfig, released_config
from lazymar.config import OFF
from lazymar.disa import disa_head_steps
from lazymar.flops import estimate, measure
from lazymar.steps import AccelSteps
from lazymar.recap import recap_groups
from models.diffloss import respaced_diffusion
from models.mar import MAR, build_released
from test_reference import rel_err

# Measured here: the released DiSA runs reproduce at 2.5-4.2e-7 and the ReCAP runs at 4.7-8.5e-7
# (float32, CPU). DiSA changes only head step counts, so it is held to the MAR vectors' 1e-5; ReCAP's
# documented tolerance is 1e-3 (its release sums attention in another order), but matching its key
# order lands us at the same ~1e-6 floor, so 1e-5 holds it far tighter.
TOLERANCE = 1e-5


def _reference_model(data: dict) -> MAR:
    model = MAR(norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), **data["config"]).eval()
    model.load_state_dict(data["state_dict"])
    return model


def _sample(model: MAR, run: dict, accel) -> torch.Tensor:
    case = run["case"]
    torch.manual_seed(run["torch_seed"])
    return model.sample_tokens(case["bsz"], num_iter=case["num_iter"], cfg=case["cfg"],
                               cfg_schedule=case["cfg_schedule"], temperature=case["temperature"],
                               labels=run["labels"], orders=run["orders"], accel=accel)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _released(method: str, settings: dict) -> AccelConfig:
    args = {k: v for k, v in settings.items() if k != "effective_fast_sampling_steps"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diff_fast_ratio's warning is tested on its own
        return released_config(method, **args)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["disa", "recap"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_released_vectors(reference_dir, method, index):
    data = load_reference(reference_dir, f"{method}_tiny.pt")
    model, run = _reference_model(data), data["results"][index]
    assert _rel_err(_sample(model, run, _released(method, run["settings"])), run["tokens"]) < TOLERANCE
    assert _rel_err(_sample(model, run, None), run["tokens_baseline"]) < TOLERANCE


# ------------------------------------------------------------------------------------------ DiSA
def test_disa_schedules_by_hand():
    """Release formulas (index into range(lower, upper + 1), truncated), worked out by hand."""
    linear = DiSAConfig(50, 5, "linear")
    # U = 63: step 0 -> 45 -> 50; step 32 -> int(31 / 63 * 45) = int(22.14) = 22 -> 27; step 63 -> 5.
    assert [disa_head_steps(s, 64, linear) for s in (0, 32, 62, 63)] == [50, 27, 5, 5]
    cosine = DiSAConfig(25, 5, "cosine")
    # U = 31: step 0 -> 20 -> 25; step 15 -> int((cos(15 pi / 31) + 1) / 2 * 20) = int(10.51) = 10 -> 15.
    assert [disa_head_steps(s, 32, cosine) for s in (0, 15, 31)] == [25, 15, 5]
    two = DiSAConfig(50, 5, "two-stage")
    # U = 15: steps 0..7 are < 7.5 -> 50, 8..15 -> 5.
    assert [disa_head_steps(s, 16, two) for s in range(16)] == [50] * 8 + [5] * 8
    assert {disa_head_steps(s, 16, DiSAConfig(50, 5, "constant")) for s in range(16)} == {5}
    assert disa_head_steps(0, 1, linear) == 50  # one step: the release divides by zero; we take upper


def test_disa_timestep_clamp_merges_steps():
    """The release's 950 clamp: 50 respaced steps keep 48 distinct timesteps, 25 keep 24, 5 keep 5."""
    for steps, distinct in ((50, 48), (25, 24), (5, 5)):
        diffusion = respaced_diffusion(steps, "cosine", 950)
        assert diffusion.num_timesteps == distinct and max(diffusion.timestep_map) == 950
    assert max(respaced_diffusion(50, "cosine", None).timestep_map) == 999


def test_disa_without_annealing_or_clamp_is_plain():
    model = build_tiny_mar()  # 10 head steps
    same = replace(OFF, disa=DiSAConfig(10, 10, "linear", max_timestep=None))
    for cfg in (1.0, 2.5):
        torch.manual_seed(3)
        plain = model.sample_tokens(2, num_iter=6, cfg=cfg)
        torch.manual_seed(3)
        assert torch.equal(model.sample_tokens(2, num_iter=6, cfg=cfg, accel=same), plain)


def test_disa_replaces_gtr_head_counts_but_keeps_fts():
    model = build_tiny_mar(img_size=128)
    steps = AccelSteps(model, PRESETS["gtr+disa+lazymar"], num_iter=32, guided=True)
    gtr = AccelSteps(model, PRESETS["gtr+lazymar"], num_iter=32, guided=True)
    assert steps.mask_lens() == gtr.mask_lens()  # GtR's transformer schedule stays
    n = steps.num_steps
    for p in steps.plans:
        base = [c for c in p.head if not c.detail]
        assert all(c.steps == disa_head_steps(p.step, n, DiSAConfig()) and c.max_timestep == 950 for c in base)
        assert all(c.steps == GtRConfig().fts_steps for c in p.head if c.detail)
    assert any(c.detail for p in steps.plans for c in p.head)


# ------------------------------------------------------------------------------------------ ReCAP
def test_recap_groups_by_hand():
    # 10 steps, 4 plain ones, then a full step and 2 cheap ones, the last group cut at the end.
    assert recap_groups(10, ReCAPConfig(pre_full_iters=4, cheap_steps=2)) == [(0, 1), (1, 1), (2, 1), (3, 1),
                                                                             (4, 3), (7, 3)]
    assert recap_groups(8, ReCAPConfig(full_fraction=0.5, cheap_steps=1)) == [(0, 1), (1, 1), (2, 1), (3, 1),
                                                                             (4, 2), (6, 2)]
    assert recap_groups(5, ReCAPConfig(pre_full_iters=0, cheap_steps=3)) == [(0, 4), (4, 1)]


def test_recap_predicts_each_group_in_position_order():
    """Within a group the release predicts the group's tokens by ascending position: a cheap step's
    tokens all lie above every position the group's earlier steps predicted."""
    model = build_tiny_mar()  # 16 tokens
    config = replace(OFF, recap=ReCAPConfig(pre_full_iters=0, cheap_steps=3))
    steps = AccelSteps(model, config, num_iter=8, guided=False)
    orders = steps.arrange_orders(torch.stack([torch.randperm(16) for _ in range(3)]))
    mask = torch.ones(3, 16, dtype=torch.bool)
    predicted = []
    for step, mask_len in enumerate(steps.mask_lens()):
        nxt = model.mask_by_order(mask_len, orders)
        predicted.append(mask if step == 7 else mask & ~nxt)
        mask = nxt
    for start, size in steps.techniques[0].groups:
        for a in range(start, start + size):
            for b in range(a + 1, start + size):
                for row in range(3):
                    earlier = predicted[a][row].nonzero().max()
                    assert bool((predicted[b][row].nonzero() > earlier).all())


def test_recap_without_cheap_steps_is_plain_with_constant_guidance():
    """With every step full, ReCAP is MAR; the one release difference left is the last step's linear
    guidance (read at 0 masked tokens), which a constant schedule does not see."""
    model = build_tiny_mar()
    config = replace(OFF, recap=ReCAPConfig(full_fraction=1.0))
    torch.manual_seed(5)
    plain = model.sample_tokens(2, num_iter=6, cfg=2.0, cfg_schedule="constant")
    torch.manual_seed(5)
    assert torch.equal(model.sample_tokens(2, num_iter=6, cfg=2.0, cfg_schedule="constant", accel=config), plain)


def test_recap_fast_ratio_takes_effect():
    model = build_tiny_mar(num_sampling_steps="20")
    plans = AccelSteps(model, replace(OFF, recap=ReCAPConfig(fast_ratio=0.4)), num_iter=8, guided=True).plans
    cheap = [p for p in plans if p.transformer is not None]
    assert cheap and all(p.head[0].steps == 8 for p in cheap)  # int(20 * 0.4)
    assert all(p.head[0].steps is None for p in plans if p.transformer is None)


def test_released_recap_ignores_fast_ratio_with_a_warning():
    with pytest.warns(UserWarning, match="diff_fast_ratio"):
        config = released_config("recap", pre_full_iters=8, num_cache_iters=1, diff_fast_ratio=0.4)
    assert config.recap == ReCAPConfig(pre_full_iters=8, cheap_steps=1, fast_ratio=0.5)


# ------------------------------------------------------------------------------------------ both
# Against plain MAR on the same weights, seed and labels (rel_err of the tokens), with the linear noise
# schedule (test_preset_bands.py: with the cosine one the random head's tokens are its noise x 2e4, and
# DiSA's clamp at t = 950 alone shrinks them 1000x). DiSA and ReCAP draw other noise (other head step
# counts; ReCAP also reorders its groups), so the picture is another one (another seed: 1.2-1.9 away):
# band [min / 2, 1.5 x max] to 0.1 over the four cases, measured min-max beside. One ReCAP step is one
# full step: plain MAR exactly.
ANY_CASES = [(1, 1.0, 1), (5, 2.5, 3), (16, 1.0, 2), (16, 3.0, 1)]
AGAINST_PLAIN = {
    "disa": (0.2, 2.1),  # 0.594-1.38
    "disa+lazymar": (0.2, 2.1),  # 0.595-1.38
    "gtr+disa+lazymar": (0.5, 2.1),  # 1.07-1.39
    "recap": (0.4, 2.4),  # 0.979-1.56, and 0 at one step
    "recap+lazymar": (0.4, 2.4),  # 0.979-1.57, and 0 at one step
}
GTR_DISA = replace(PRESETS["gtr+disa+lazymar"], token_cache=None, condition_cache=None, head_cache=None)
# LazyMAR's caches against the same technique without them, which draws the same noise: band
# [min / 5, 4 x max] to one digit. ReCAP + caches is ReCAP exactly where the caches have nothing to do:
# no guidance residual at cfg 1, every step a refresh at 5 steps, and this model's 10-step head (5 on
# cheap steps) refreshes at every step; DiSA's 50-5 step head calls give the head cache work.
ON_TOP = {
    "disa+lazymar": ("disa", (2e-4, 7e-2)),  # 1.15e-3-1.58e-2
    "recap+lazymar": ("recap", (4e-3, 9e-2)),  # 2.15e-2 at 16 steps cfg 3
    "gtr+disa+lazymar": (GTR_DISA, (1e-4, 2e-2)),  # 8.34e-4-2.64e-3
}
RECAP_CACHES_IDLE = [(1, 1.0, 1), (5, 2.5, 3), (16, 1.0, 2)]


@functools.lru_cache(maxsize=None)
def _any_run(accel, num_iter: int, cfg: float, bsz: int) -> torch.Tensor:
    model = _linear_tiny()
    torch.manual_seed(0)
    return model.sample_tokens(bsz, num_iter=num_iter, cfg=cfg, labels=torch.arange(bsz) % model.num_classes,
                               accel=accel)


@functools.lru_cache(maxsize=None)
def _linear_tiny() -> MAR:
    return build_tiny_mar(noise_schedule="linear")


@pytest.mark.parametrize("accel", sorted(AGAINST_PLAIN))
@pytest.mark.parametrize("num_iter, cfg, bsz", ANY_CASES)
def test_any_steps_guidance_and_batch(accel, num_iter, cfg, bsz):
    out = _any_run(accel, num_iter, cfg, bsz)
    assert out.shape == (bsz, 16, 4, 4) and bool((out != 0).all())  # every token generated
    plain = _any_run(None, num_iter, cfg, bsz)
    if accel.startswith("recap") and num_iter == 1:
        assert torch.equal(out, plain)
    else:
        lo, hi = AGAINST_PLAIN[accel]
        err = rel_err(out, plain)
        assert lo < err < hi, err
    if accel in ON_TOP:
        part, (lo, hi) = ON_TOP[accel]
        without = _any_run(part, num_iter, cfg, bsz)
        if accel == "recap+lazymar" and (num_iter, cfg, bsz) in RECAP_CACHES_IDLE:
            assert torch.equal(out, without)
        else:
            err = rel_err(out, without)
            assert lo < err < hi, err


@pytest.mark.parametrize("accel", ["disa", "recap", "recap+lazymar", "gtr+disa+lazymar"])
def test_explicit_generator_is_deterministic(accel):
    model = build_tiny_mar()
    draws = [model.sample_tokens(2, num_iter=8, cfg=2.0, labels=torch.tensor([1, 2]), accel=accel,
                                 generator=torch.Generator().manual_seed(11)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    other = model.sample_tokens(2, num_iter=8, cfg=2.0, labels=torch.tensor([1, 2]), accel=accel,
                                generator=torch.Generator().manual_seed(12))
    assert not torch.equal(draws[0], other)


def test_other_model_sizes():
    """ReCAP's cached context and DiSA's counts for a deeper, wider model with another buffer: the FLOPs
    executed equal the planned ones (the cached context's size is in them), each preset is another
    picture than plain MAR's (another seed: 1.42 away) and LazyMAR's caches stay close to the technique
    they are added to. Bands as for test_any_steps_guidance_and_batch, measured value beside."""
    model = build_tiny_mar(encoder_depth=3, decoder_depth=4, encoder_embed_dim=48, decoder_embed_dim=40,
                           buffer_size=7, img_size=96, noise_schedule="linear")

    def sample(accel):
        torch.manual_seed(0)
        return model.sample_tokens(2, num_iter=12, cfg=2.0, labels=torch.tensor([0, 3]), accel=accel)

    plain = sample(None)
    outs = {accel: sample(accel) for accel in ("recap", "recap+lazymar", "disa", "disa+lazymar")}
    for accel, (lo, hi) in {"recap": (0.7, 2.2),  # 1.46
                            "recap+lazymar": (0.7, 2.2),  # 1.46
                            "disa": (0.5, 1.8),  # 1.17
                            "disa+lazymar": (0.5, 1.8)}.items():  # 1.17
        out = outs[accel]
        assert out.shape == (2, 16, 6, 6) and bool((out != 0).all())
        assert lo < rel_err(out, plain) < hi, (accel, rel_err(out, plain))
    assert 2e-3 < rel_err(outs["recap+lazymar"], outs["recap"]) < 6e-2  # 1.32e-2
    assert 1e-3 < rel_err(outs["disa+lazymar"], outs["disa"]) < 3e-2  # 7.33e-3
    for accel in ("recap", "recap+lazymar", "disa+lazymar"):
        real = measure(model, num_iter=12, cfg=2.0, accel=accel, bsz=2)
        assert real.components == estimate(model, num_iter=12, cfg=2.0, accel=accel, bsz=2).components, accel


@pytest.mark.parametrize("config, conflict", [
    (dict(recap=ReCAPConfig()), "token cache"),
    (dict(recap=ReCAPConfig(), token_cache=None, marche=MARcheConfig()), "MARche"),
    (dict(recap=ReCAPConfig(), token_cache=None, gtr=GtRConfig()), "GtR"),
    (dict(recap=ReCAPConfig(), token_cache=None, disa=DiSAConfig()), "DiSA"),
])
def test_conflicting_compositions_are_rejected(config, conflict):
    with pytest.raises(ValueError, match=conflict):
        AccelConfig(**config)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="dis"), "choose 'disa', 'recap' or 'cspd'"),
    (dict(method="disa", diff_sampler="DDIM"), "diff_sampler must be one of"),
    (dict(method="disa", diff_sampler="DiSA", diff_annealing_strategy="exp"), "diff_annealing_strategy"),
    (dict(method="disa", diff_upper=50), "unknown disa argument"),
    (dict(method="recap", cache_buffer=False), "cache_buffer"),
    (dict(method="recap", num_cache_iter=1), "unknown recap argument"),
])
def test_released_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        released_config(**kwargs)


def test_released_disa_defaults_and_settings():
    assert released_config("disa") == OFF  # the release's default sampler: no annealing, no clamp
    config = released_config("disa", diff_sampler="DiSA", diff_upper_steps=50, diff_lower_steps=5,
                             diff_annealing_strategy="linear")
    assert config == PRESETS["disa"]


def test_gtr_disa_lazymar_is_the_cheapest_preset():
    with torch.device("meta"):
        model = build_released("mar_huge")
    totals = {name: estimate(model, num_iter=64, cfg=3.25, accel=name).total for name in PRESETS}
    assert min(totals, key=totals.get) == "gtr+disa+lazymar"
    assert totals["disa"] < estimate(model, num_iter=64, cfg=3.25).total


@pytest.mark.parametrize("accel", ["disa", "recap", "gtr+disa+lazymar", "recap+lazymar"])
def test_flops_cli_prints_totals(accel, capsys):
    flops_main(["--model", "mar_huge", "--num_iter", "64", "--accel", accel])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(accel + " "))
    assert row.split()[-2].endswith("T") and row.split()[-1].endswith("x")
