"""Continuous speculative decoding: the released sampler reproduced from its own arguments, its acceptance
test and residual sampler alone, every defect option, determinism, validation, compositions and FLOPs."""
from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import lazymar.cspd as cspd_module
from benchmarks.cspd_flops import main as flops_main
from conftest import build_tiny_mar, load_reference
from lazymar import CSpDConfig, StatsLog, cspd_preset, released_config
from lazymar.cspd import RELEASE_OPTIONS, CSpDStepPlan, check_composition
from lazymar.cspd_accept import HeadGaussian, acceptance_prob, residual_alpha, verify
from lazymar.cspd_flops import estimate, measure
from models.mar import MAR
from models.schedules import plain_mask_lens

# Measured: the released runs reproduce at 8.6e-7, 9.6e-7 and 9.7e-7 of max |token| (float32, CPU);
# 1e-5 relative noise on all weights moves them by <= 4e-6 without flipping an acceptance.
TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------------ vectors
@pytest.fixture(scope="module")
def vectors(reference_dir):
    data = load_reference(reference_dir, "cspd_tiny.pt")

    def build(config, state):
        model = MAR(norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), **config).eval()
        model.load_state_dict(state, strict=True)
        return model

    return data, build(data["draft_config"], data["draft_state_dict"]), build(data["target_config"],
                                                                               data["target_state_dict"])


def _sample(target, run, accel):
    case = run["case"]
    torch.manual_seed(run["torch_seed"])
    return target.sample_tokens(case["bsz"], num_iter=case["num_iter"], cfg=case["cfg"],
                                cfg_schedule=case["cfg_schedule"], labels=run["labels"],
                                temperature=case["temperature"], orders=run["orders"], accel=accel)


def _rel_err(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2])
def test_released_vectors(vectors, index, monkeypatch):
    data, draft, target = vectors
    run = data["results"][index]
    log = StatsLog()
    seen = []

    def recording_verify(x, q, p, **kwargs):
        verdict = verify(x, q, p, **kwargs)
        seen.append((x, q, p, verdict))
        return verdict

    monkeypatch.setattr(cspd_module, "verify", recording_verify)
    accel = replace(released_config("cspd", draft=draft, **run["settings"]), on_stats=log)
    tokens = _sample(target, run, accel)
    assert _rel_err(tokens, run["tokens"]) < TOLERANCE
    stats = log.last
    assert [(v.step, v.verified, v.accepted, v.residual_rounds) for v in stats.verifications] == \
        [tuple(a) for a in run["accept_counts"]]
    assert stats.prefill_steps == run["prefill_steps"]
    assert [v.step for v in stats.verifications] == run["verify_steps"]
    # Every verification's inputs and decisions, as the release's wrapper recorded them.
    for (x, q, p, verdict), ref in zip(seen, run["verifications"], strict=True):
        for ours, name in ((x, "x"), (q.mean, "draft_mean"), (q.std, "draft_std"), (q.logstd_sum, "draft_logstd_sum"),
                           (p.mean, "target_mean"), (p.std, "target_std"), (p.logstd_sum, "target_logstd_sum"),
                           (verdict.out, "out")):
            assert _rel_err(ours, ref[name]) < TOLERANCE, name
        assert torch.equal(verdict.accepted, ref["accepted"])
        assert int(verdict.residual_rounds) == ref["residual_rounds"]
        assert int(verdict.unaccepted.sum()) == ref["zero_tokens"]
        # prob is an exponential of (x - mu_p)^2 / (sigma Ti)^2 with x ~ 1e4 and sigma ~ 6e-3: 1e-6 in the
        # tokens is up to 8e-5 of it here (measured), far from any of the recorded decisions.
        torch.testing.assert_close(verdict.prob, ref["prob"], rtol=1e-3, atol=0)


@pytest.mark.parametrize("index", [1, 2])
def test_ratio_one_is_the_target_on_the_aligned_noise(vectors, index):
    data, draft, target = vectors
    run = data["results"][index]
    log = StatsLog()
    accel = replace(released_config("cspd", draft=draft, **run["settings"]), ratio=1.0, on_stats=log)
    assert _rel_err(_sample(target, run, accel), run["tokens_target_aligned"]) < TOLERANCE
    assert log.last.verifications == [] and log.last.target_passes == run["case"]["num_iter"]


def test_plain_target_still_matches_upstream(vectors):
    data, _, target = vectors
    run = data["results"][2]
    assert _rel_err(_sample(target, run, None), run["tokens_baseline"]) < TOLERANCE


# ------------------------------------------------------------------------------------------ processor
def _case_heads(case):
    q = HeadGaussian(case["draft_mean"], case["draft_std"], case["draft_logstd_sum"])
    p = HeadGaussian(case["target_mean"], case["target_std"], case["target_logstd_sum"])
    return q, p


@pytest.mark.parametrize("name", ["overlap_inner42", "overlap_inner1", "identical_F_below_1"])
def test_processor_cases(vectors, name):
    """The release's test ratio and residual alpha, and its decisions from the same draws. Both are float32
    evaluations of one formula, ours in log space, the release's of products: against the formula in
    float64, the release's ratios are off by up to 1.8e-6 (relative) and its alphas by 9.8e-7, ours by
    6.7e-7 and 3.6e-7 (measured); they differ from each other by up to 1.8e-6 and 1.1e-6."""
    case = next(c for c in vectors[0]["processor_cases"] if c["name"] == name)
    q, p = _case_heads(case)
    x, ti = case["x"], case["inner_temperature"]
    q64, p64 = (HeadGaussian(*(t.double() for t in (g.mean, g.std, g.logstd_sum))) for g in (q, p))
    torch.testing.assert_close(acceptance_prob(x, q, p, ti).double(), acceptance_prob(x.double(), q64, p64, ti),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(residual_alpha(x, q, p).double(), residual_alpha(x.double(), q64, p64), rtol=0, atol=5e-7)
    torch.testing.assert_close(acceptance_prob(x, q, p, ti), case["prob"], rtol=3e-6, atol=0)
    torch.testing.assert_close(residual_alpha(x, q, p), case["alpha_at_x"], rtol=0, atol=2e-6)
    # The release's early exit, and every round run with the updates past its stop masked (no host read):
    # the same verdict from the same draws.
    for residual_exit in ("early", "fixed"):
        torch.manual_seed(case["torch_seed"])
        verdict = verify(x, q, p, inner_temperature=ti, **_verify_options({**RELEASE_OPTIONS,
                                                                           "residual_exit": residual_exit}))
        assert torch.equal(verdict.accepted, case["accepted"])
        assert int(verdict.residual_rounds) == case["residual_rounds"]
        assert int(verdict.unaccepted.sum()) == case["zero_tokens"]
        torch.testing.assert_close(verdict.out, case["out"], rtol=1e-6, atol=0)


def _verify_options(options):
    return dict(max_rounds=options["residual_rounds"], residual_inner_temperature=options["residual_inner_temperature"],
                residual_stop=options["residual_stop"], unaccepted=options["unaccepted"],
                residual_exit=options["residual_exit"])


# ------------------------------------------------------------------------------------------ defect options
def test_unaccepted_tokens_take_the_target_sample(vectors):
    case = next(c for c in vectors[0]["processor_cases"] if c["name"] == "identical_F_below_1")
    q, p = _case_heads(case)
    torch.manual_seed(case["torch_seed"])
    released = verify(case["x"], q, p, inner_temperature=1.0, unaccepted="zero")
    torch.manual_seed(case["torch_seed"])
    fixed = verify(case["x"], q, p, inner_temperature=1.0, unaccepted="target")
    never = released.unaccepted
    assert int(never.sum()) == 23 and torch.equal(fixed.unaccepted, never)
    assert (released.out[never] == 0).all()  # the release's zero latents
    assert torch.equal(fixed.out[never], p.mean[never])  # the target's own token instead
    assert torch.equal(fixed.out[~never], released.out[~never])


def test_residual_stop_waits_only_for_rejected_tokens(vectors):
    case = next(c for c in vectors[0]["processor_cases"] if c["name"] == "overlap_inner1")
    q, p = _case_heads(case)
    torch.manual_seed(case["torch_seed"])
    fixed = verify(case["x"], q, p, inner_temperature=1.0, residual_stop="rejected")
    assert torch.equal(fixed.accepted, case["accepted"])  # same test draws
    assert int(fixed.residual_rounds) <= case["residual_rounds"] and not fixed.unaccepted.any()
    assert torch.equal(fixed.out[fixed.accepted], case["x"][fixed.accepted])


@pytest.mark.parametrize("with_ti", [False, True])
def test_residual_inner_temperature_widens_the_residual(with_ti):
    n, C, ti = 512, 16, 42.0
    gen = torch.Generator().manual_seed(0)
    std = torch.full((n, C), 0.0063)
    logstd = torch.full((n, C), -174.0)
    p = HeadGaussian(torch.zeros(n, C), std, logstd)
    q = HeadGaussian(torch.full((n, C), 1e3), std, logstd)  # far away: every draft rejected, alpha ~ 1
    verdict = verify(q.mean, q, p, inner_temperature=ti, residual_inner_temperature=with_ti, generator=gen)
    assert not verdict.accepted.any() and int(verdict.residual_rounds) == 1
    spread = float(verdict.out.std() / 0.0063)
    assert spread == pytest.approx(ti if with_ti else 1.0, rel=0.05)


def _low_temperature_heads(n, delta, gen):
    """Heads like MAR's at temperature 0.15: last-step sd ~1e-3 per channel, so a product over 16 channels
    is ~1e-48, below float32's range; ``F = 1``; the draft's mean ``delta`` target sd from the target's."""
    C, sd = 16, 1e-3
    std_p, std_q = (sd * (1 + 0.01 * torch.randn(n, C, generator=gen)) for _ in range(2))
    direction = torch.nn.functional.normalize(torch.randn(n, C, generator=gen), dim=-1)
    mu_p = torch.randn(n, C, generator=gen)
    logstd = torch.full((n, C), -174.0)
    return HeadGaussian(mu_p + delta * std_p * direction, std_q, logstd), HeadGaussian(mu_p, std_p, logstd)


def test_low_temperature_accepts_as_the_math_says():
    """The release multiplies 16 standard deviations: at temperature 0.15 both products are 0 in float32,
    the ratio 0 / 0, and no draft is kept (the residual's densities are inf / inf: nothing accepted in
    100 rounds, zero tokens). In log space the share kept is E[min(1, r)] of the ratios ``r`` (computed
    in float64) within binomial noise, and the residual accepts as ``max(0, F p - q)`` says: here, at
    1.2 sd apart, each round keeps ~45%, so no token waits 100 rounds."""
    n, gen = 4096, torch.Generator().manual_seed(0)
    q, p = _low_temperature_heads(n, 1.2, gen)
    assert float(q.std.prod(-1).max()) == 0.0  # what the release multiplied
    x = q.mean
    q64, p64 = (HeadGaussian(*(t.double() for t in (g.mean, g.std, g.logstd_sum))) for g in (q, p))
    expected = acceptance_prob(x.double(), q64, p64, 1.0).clamp(max=1).mean().item()
    assert 0.4 < expected < 0.6  # a test that decides: neither all kept nor all rejected
    verdict = verify(x, q, p, inner_temperature=1.0, residual_stop="rejected", unaccepted="zero", generator=gen)
    kept = verdict.accepted.float().mean().item()
    assert abs(kept - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert not verdict.unaccepted.any() and 1 <= int(verdict.residual_rounds) <= 30
    rejected = ~verdict.accepted
    assert (verdict.out[rejected] != 0).all()
    # The residual moves away from the draft: its tokens lie on the target's side of the midpoint.
    toward_q = ((verdict.out - p.mean) * (q.mean - p.mean)).sum(-1) / ((q.mean - p.mean) ** 2).sum(-1)
    assert float(toward_q[rejected].mean()) < 0.0


def test_low_temperature_on_the_demo_pair():
    """The shipped demo pair at temperature 0.15 (2 images, 16 steps, the release's rules): with the
    release's products 0 of 122 drafts were kept, every verification ran 100 residual rounds and every
    drafted token came back zero; in log space 35 of 122 (29%; 43 of 122 at the demo's 0.4), one
    residual round per verification, no zero token."""
    from demo.registry import load_demo
    target, _, _ = load_demo(name="mar")
    draft, _, _ = load_demo(name="draft")
    log = StatsLog()
    with torch.no_grad():
        tokens = target.sample_tokens(2, num_iter=16, cfg=3.0, temperature=0.15, labels=torch.tensor([0, 1]),
                                      accel=cspd_preset("cspd-release", draft, on_stats=log),
                                      generator=torch.Generator().manual_seed(0))
    stats = log.last
    assert stats.verified == 122 and 0.15 < stats.acceptance_rate < 0.45
    assert all(v.unaccepted == 0 and v.residual_rounds <= 3 for v in stats.verifications)
    assert (tokens.flatten(2) != 0).any(dim=1).all()  # every latent position has a non-zero channel


def _tiny_pair(draft_steps="10", target_steps="10"):
    target = build_tiny_mar(seed=0, num_sampling_steps=target_steps)
    draft = build_tiny_mar(seed=1, encoder_embed_dim=16, decoder_embed_dim=16, diffloss_w=32,
                           num_sampling_steps=draft_steps)
    return draft, target


def _tiny_sample(target, accel, *, seed=0, cfg=2.0, num_iter=6, bsz=2, labels=(1, 2), **kwargs):
    torch.manual_seed(seed)
    lab = None if labels is None else torch.tensor(labels)
    return target.sample_tokens(bsz, num_iter=num_iter, cfg=cfg, labels=lab, accel=accel, **kwargs)


def test_draft_equal_to_target_keeps_every_draft_and_gives_the_target_tokens():
    """With the target as its own draft and a verification after every step, the verification sees what
    the draft saw: equal Gaussians, F = 1, prob = 1: every draft is kept and the tokens are the target's
    own on the aligned noise (ratio 1)."""
    _, target = _tiny_pair()
    log = StatsLog()
    config = cspd_preset("cspd-release", target, num_draft=1, inner_temperature=1.0, ratio=0.2, on_stats=log)
    tokens = _tiny_sample(target, config)
    assert log.last.accepted == log.last.verified == 2 * plain_mask_lens(6, 16)[1]  # all after pre-fill (0, 1)
    assert torch.allclose(tokens, _tiny_sample(target, replace(config, ratio=1.0)), rtol=0, atol=0)
    sampled = _tiny_sample(target, replace(config, draft_token="sample"))  # x = mu + std * step-0 noise
    assert not torch.equal(sampled, tokens)
    assert log.last.accepted == log.last.verified  # still all kept: the Gaussians are the same


def test_steps_past_the_sequence_length_predict_nothing():
    """With more MAR steps than tokens the last steps predict none (plain MAR runs them too): CSpD drafts
    nothing there, and a verification whose block drafted nothing verifies nothing."""
    draft, target = _tiny_pair()
    log = StatsLog()
    tokens = _tiny_sample(target, CSpDConfig(draft=draft, ratio=0.1, num_draft=3, on_stats=log), num_iter=24)
    lens = plain_mask_lens(24, 16)
    assert lens[14:] == [1] * 10  # steps 15-22 predict no token, step 23 the last one
    assert torch.isfinite(tokens).all() and (tokens != 0).any(dim=1).all()  # every position sampled
    stats = log.last
    assert stats.prefill_steps == [0, 1, 2] and stats.verified == 2 * lens[2]
    assert [(v.step, v.verified) for v in stats.verifications if v.step > 15] == [(18, 0), (21, 0), (23, 2)]


def test_num_draft_zero_is_refused():
    draft, _ = _tiny_pair()
    with pytest.raises(ValueError, match="num_draft must be an integer >= 1.*divides by zero"):
        CSpDConfig(draft=draft, num_draft=0)


def test_mismatched_diffusion_steps():
    draft, target = _tiny_pair(draft_steps="8", target_steps="10")
    with pytest.raises(ValueError, match="8 diffusion steps, target head 10"):
        _tiny_sample(target, CSpDConfig(draft=draft))
    log = StatsLog()
    tokens = _tiny_sample(target, CSpDConfig(draft=draft, step_mismatch="prefix", on_stats=log))
    assert torch.isfinite(tokens).all() and log.last.verifications
    # The release: noise sized by the draft's 8 steps; a target with fewer steps reads its first ones.
    draft, target = _tiny_pair(draft_steps="10", target_steps="8")
    assert torch.isfinite(_tiny_sample(target, released_config("cspd", draft=draft))).all()


def test_mismatched_noise_schedules_are_refused():
    """A cosine draft verified by a linear target passed: the same step index is another noise level on the
    other schedule, so the aligned Gaussians are not comparable. Refused whatever ``step_mismatch`` says
    (the release never met it: every released MAR is cosine), naming both schedules."""
    target = build_tiny_mar(seed=0, noise_schedule="linear")
    draft = build_tiny_mar(seed=1, encoder_embed_dim=16, decoder_embed_dim=16, diffloss_w=32, noise_schedule="cosine")
    for config in (CSpDConfig(draft=draft), released_config("cspd", draft=draft)):
        with pytest.raises(ValueError, match="draft head samples on the 'cosine' noise schedule, target head on "
                                             "'linear'"):
            config.check_target(target)
        with pytest.raises(ValueError, match="'cosine' noise schedule"):
            _tiny_sample(target, config)
    same = build_tiny_mar(seed=1, encoder_embed_dim=16, decoder_embed_dim=16, diffloss_w=32, noise_schedule="linear")
    CSpDConfig(draft=same).check_target(target)  # one schedule: accepted


def test_labels_none_is_unconditional_for_both_models():
    draft, target = _tiny_pair()
    config = CSpDConfig(draft=draft, ratio=0.2, num_draft=2)
    a = _tiny_sample(target, config, labels=None)
    assert torch.equal(a, _tiny_sample(target, config, labels=None))
    assert not torch.equal(a, _tiny_sample(target, config))
    small = build_tiny_mar(seed=1, encoder_embed_dim=16, decoder_embed_dim=16, diffloss_w=32, class_num=2)
    with pytest.raises(ValueError, match="for the draft too"):
        _tiny_sample(target, CSpDConfig(draft=small), labels=(1, 5))


def _first_verification(target, config, monkeypatch, *, seed=0, **kwargs):
    """The draft's and the target's Gaussians at the first verification of one tiny CSpD run."""
    seen = []

    def recording_verify(x, q, p, **options):
        seen.append((q, p))
        return verify(x, q, p, **options)

    monkeypatch.setattr(cspd_module, "verify", recording_verify)
    with torch.no_grad():
        target.sample_tokens(2, num_iter=6, cfg=2.0, labels=torch.tensor([1, 2]), accel=config,
                             generator=torch.Generator().manual_seed(seed), **kwargs)
    return seen[0]


def test_statistics_stay_float32_under_bf16_autocast(monkeypatch):
    """The test's statistics are sums of 99 steps' log-standard-deviations, ~-174 per channel, where bf16
    resolves only whole units: under ``--precision bf16`` they must stay float32 (the head's products may
    run in bf16). Same draws in float32 and under bf16 autocast, 100 head steps as MAR's: measured max
    |log F difference| 0.013-0.019 over 5 seeds with float32 statistics, 7.6-12.9 with bf16 ones (std:
    relative 3-4e-5 against 0.8-2.8e-2)."""
    draft, target = _tiny_pair("100", "100")
    config = CSpDConfig(draft=draft, ratio=0.2, num_draft=8)
    q32, p32 = _first_verification(target, config, monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q16, p16 = _first_verification(target, config, monkeypatch)
    for ours in (q16.mean, q16.std, q16.logstd_sum, p16.mean, p16.std, p16.logstd_sum):
        assert ours.dtype == torch.float32
    log_f16, log_f32 = ((p.logstd_sum - q.logstd_sum).sum(-1) for q, p in ((q16, p16), (q32, p32)))
    assert float((log_f16 - log_f32).abs().max()) < 0.1
    for bf, fp in ((q16, q32), (p16, p32)):
        assert float(((bf.std - fp.std) / fp.std).abs().max()) < 5e-4


# ------------------------------------------------------------------------------------------ determinism, stats
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_explicit_generator_is_deterministic_and_leaves_the_global_stream(cfg):
    draft, target = _tiny_pair()
    config = CSpDConfig(draft=draft, ratio=0.1, num_draft=2, inner_temperature=1e6)
    state = torch.get_rng_state()
    a = target.sample_tokens(2, num_iter=8, cfg=cfg, labels=torch.tensor([0, 3]), accel=config,
                             generator=torch.Generator().manual_seed(7))
    assert torch.equal(state, torch.get_rng_state())
    b = target.sample_tokens(2, num_iter=8, cfg=cfg, labels=torch.tensor([0, 3]), accel=config,
                             generator=torch.Generator().manual_seed(7))
    c = target.sample_tokens(2, num_iter=8, cfg=cfg, labels=torch.tensor([0, 3]), accel=config,
                             generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 16, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)


def test_stats_per_verification_and_overall():
    draft, target = _tiny_pair()
    log = StatsLog()
    _tiny_sample(target, CSpDConfig(draft=draft, ratio=0.1, num_draft=3, on_stats=log), num_iter=10)
    s = log.last
    layout = CSpDStepPlan.of(10, 0.1, 3)
    assert s.prefill_steps == list(layout.prefill) == [0, 1]
    assert [v.step for v in s.verifications] == list(layout.verifications) == [3, 6, 9]
    assert s.draft_steps == list(range(2, 10)) and s.target_passes == 5
    assert s.verified == 2 * plain_mask_lens(10, 16)[1] and 0 <= s.accepted <= s.verified  # all drafts verified
    assert s.acceptance_rate == s.accepted / s.verified
    summary = json.loads(json.dumps(s.as_dict()))
    assert summary["verifications"][0]["step"] == 3 and summary["target_passes"] == 5


def test_step_layout_as_released():
    layout = CSpDStepPlan.of(64, 0.15, 8)  # the release's defaults
    assert layout.prefill == tuple(range(10))
    assert layout.verifications == (16, 24, 32, 40, 48, 56, 63)
    notebook = CSpDStepPlan.of(256, 0.05, 4)
    assert len(notebook.prefill) == 13 and len(notebook.drafts) == 243 and len(notebook.verifications) == 61


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=-0.1), "ratio must be in"), (dict(ratio=1.5), "ratio must be in"),
    (dict(inner_temperature=0.0), "inner_temperature must be"), (dict(inner_temperature=math.inf), "inner_temperature"),
    (dict(num_draft=2.5), "num_draft must be an integer"), (dict(draft_token="x"), "draft_token must be one of"),
    (dict(unaccepted="nan"), "unaccepted must be one of"), (dict(residual_stop="x"), "residual_stop must be"),
    (dict(residual_rounds=0), "residual_rounds must be"), (dict(step_mismatch="x"), "step_mismatch must be"),
    (dict(residual_exit="late"), "residual_exit must be one of"),
    (dict(draft_accel="nope"), "preset name"),
])
def test_config_validation(kwargs, message):
    draft, _ = _tiny_pair()
    with pytest.raises(ValueError, match=message):
        CSpDConfig(draft=draft, **kwargs)


def test_other_errors():
    draft, target = _tiny_pair()
    with pytest.raises(TypeError, match="draft must be a MAR"):
        CSpDConfig(draft="mar_base")
    with pytest.raises(ValueError, match="needs draft="):
        released_config("cspd", ratio=0.1)
    with pytest.raises(ValueError, match="unknown cspd argument"):
        released_config("cspd", draft=draft, cfg=2.0)
    with pytest.raises(ValueError, match="unknown CSpD preset"):
        cspd_preset("cspd-fast", draft)
    with pytest.raises(ValueError, match="temperature > 0"):
        _tiny_sample(target, CSpDConfig(draft=draft), temperature=0.0)
    other = build_tiny_mar(seed=1, img_size=32)
    with pytest.raises(ValueError, match="share the token grid"):
        _tiny_sample(target, CSpDConfig(draft=other))


def test_released_config_defaults_and_presets():
    draft, _ = _tiny_pair()
    config = released_config("cspd", draft=draft)
    assert (config.ratio, config.inner_temperature, config.num_draft) == (0.15, 42.0, 8)
    assert {k: getattr(config, k) for k in RELEASE_OPTIONS} == RELEASE_OPTIONS
    fixed = cspd_preset("cspd", draft, ratio=0.05)
    assert (fixed.unaccepted, fixed.residual_stop, fixed.step_mismatch) == ("target", "rejected", "error")
    assert (fixed.residual_exit, config.residual_exit) == ("fixed", "early")
    assert (fixed.draft_token, fixed.residual_inner_temperature) == ("mean", False)  # measured: as released


# ------------------------------------------------------------------------------------------ compositions
@pytest.mark.parametrize("accel, conflict", [
    ("lazymar", "token_cache"), ("lazymar-cond", "condition_cache"), ("gtr", "gtr"), ("marche", "marche"),
    ("disa", "disa"), ("recap", "recap"),
])
@pytest.mark.parametrize("role", ["draft", "target"])
def test_conflicting_compositions_are_rejected(accel, conflict, role):
    draft, _ = _tiny_pair()
    with pytest.raises(ValueError, match=f"CSpD with {conflict} on the {role}"):
        CSpDConfig(draft=draft, **{f"{role}_accel": accel})
    with pytest.raises(ValueError, match="Only LazyMAR's head cache composes"):
        check_composition(accel, role)


def test_head_cache_composes_on_either_model():
    draft, target = _tiny_pair("30", "30")  # at 10 head steps the release's cache refreshes every step
    # Ti huge keeps drafts: where all are rejected, the output does not depend on the draft at all.
    base = CSpDConfig(draft=draft, ratio=0.1, num_draft=2, inner_temperature=1e30)
    alone = _tiny_sample(target, base)
    for role in ("draft", "target"):
        cached = _tiny_sample(target, replace(base, **{f"{role}_accel": "lazymar-head"}))
        assert torch.isfinite(cached).all() and not torch.equal(cached, alone), role
    off = replace(base, draft_accel="lazymar-off", target_accel="lazymar-off")  # every technique off
    assert torch.equal(_tiny_sample(target, off), alone)


# ------------------------------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("cfg, head_cache", [(1.0, None), (2.5, None), (2.5, "lazymar-head")])
def test_flops_estimate_equals_a_real_count(cfg, head_cache):
    draft, target = _tiny_pair("30", "30") if head_cache else _tiny_pair()
    config = CSpDConfig(draft=draft, ratio=0.1, num_draft=3, draft_accel=head_cache, target_accel=head_cache)
    counted = measure(target, config, num_iter=9, cfg=cfg, bsz=2)
    priced = estimate(target, config, num_iter=9, cfg=cfg, bsz=2)
    for role in ("target", "draft"):
        for component, flops in priced.__getattribute__(role).components.items():
            assert counted.__getattribute__(role).components[component] == pytest.approx(flops, rel=1e-9), \
                (role, component)


def _spy_on_work(monkeypatch, models):
    """Count what each model executes, at the code that executes it: transformer passes (calls, rows, known
    tokens), head calls (calls, tokens) and head network evaluations (calls, rows); and the residual
    rounds run (one normal draw each)."""
    import lazymar.cspd_accept as accept
    counts = {}

    def spy(obj, name, key, sizes):
        original = getattr(obj, name)

        def counting(*args, **kwargs):
            row = counts.setdefault(key, [0] * (1 + len(sizes)))
            row[0] += 1
            for i, size in enumerate(sizes):
                row[1 + i] += size(*args)
            return original(*args, **kwargs)

        monkeypatch.setattr(obj, name, counting)

    for role, model in models.items():
        spy(model, "transformer", f"{role} transformer", (lambda t, m, c, n: t.shape[0], lambda t, m, c, n: n))
        spy(model.diffloss, "sample", f"{role} head", (lambda z, *a: z.shape[0],))
        spy(model.diffloss.net, "forward_modulated", f"{role} head net", (lambda x, *a: x.shape[0],))
    spy(accept, "_randn", "residual rounds", ())
    return counts


@pytest.mark.parametrize("residual_exit", ["fixed", "early"])
def test_executed_work_does_not_depend_on_acceptance(monkeypatch, residual_exit):
    """One target, a draft of its architecture, a verification after every step: every draft rejected (a
    draft whose head's eps is shifted, Ti 1e-3) and every draft kept (the target's own weights: equal
    Gaussians). Counted where it runs (not by the FLOPs counter, which prices the same decisions): each
    model's transformer passes, rows and known tokens, head calls and tokens, head network evaluations.
    They are equal, and what the plan says; so are the counted FLOPs. The residual rounds, elementwise
    and uncounted in FLOPs, are equal too with ``residual_exit="fixed"`` (all ``residual_rounds`` run per
    verification); the release's early exit runs none when every draft is kept."""
    target = build_tiny_mar(seed=0)
    kept, rejected = copy.deepcopy(target), copy.deepcopy(target)
    C = target.token_embed_dim
    with torch.no_grad():
        rejected.diffloss.net.final_layer.linear.bias[:C] += 1.0  # eps, not the variance: another mean
    runs = {}
    for name, draft, ti in (("rejected", rejected, 1e-3), ("kept", kept, 1.0)):
        log = StatsLog()
        config = CSpDConfig(draft=draft, ratio=0.2, num_draft=1, inner_temperature=ti, residual_rounds=7,
                            residual_exit=residual_exit, on_stats=log)
        with monkeypatch.context() as m:
            counts = _spy_on_work(m, {"target": target, "draft": draft})
            flops = measure(target, config, num_iter=6, cfg=2.0, bsz=2)
        runs[name] = (counts, flops, log.last)
    (counts_r, flops_r, stats_r), (counts_k, flops_k, stats_k) = runs["rejected"], runs["kept"]
    assert stats_r.accepted == 0 and stats_k.accepted == stats_k.verified == stats_r.verified > 0
    rounds_r, rounds_k = counts_r.pop("residual rounds", [0])[0], counts_k.pop("residual rounds", [0])[0]
    assert counts_r == counts_k
    assert flops_r.target.components == flops_k.target.components
    assert flops_r.draft.components == flops_k.draft.components
    layout = CSpDStepPlan.of(6, 0.2, 1)
    target_passes, draft_passes = len(layout.prefill) + len(layout.verifications), len(layout.drafts)
    steps = target.diffloss.gen_diffusion.num_timesteps
    assert counts_k["target transformer"][:2] == [target_passes, 2 * 2 * target_passes]  # guided: 2 rows per image
    assert counts_k["draft transformer"][:2] == [draft_passes, 2 * 2 * draft_passes]
    assert counts_k["target head"][0] == target_passes and counts_k["draft head"][0] == draft_passes
    for role in ("target", "draft"):
        assert counts_k[f"{role} head net"] == [steps * counts_k[f"{role} head"][0], steps * counts_k[f"{role} head"][1]]
    verifications = len(layout.verifications)
    if residual_exit == "fixed":
        assert rounds_r == rounds_k == 7 * verifications
    else:
        assert rounds_k == 0 and verifications <= rounds_r <= 7 * verifications


def test_flops_cli(capsys):
    flops_main(["--target", "mar_huge", "--draft", "mar_base", "--num_iter", "256", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["target_passes"] == 74 and out["draft_steps"] == 243
    assert out["plain_target_tflops"] > out["total_tflops"] > out["target"]["total_tflops"]
