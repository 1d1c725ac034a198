"""GtR and MARche checked against small cases worked out by hand from the papers' definitions (as the
module docstrings of lazymar/gtr.py and lazymar/marche.py state them), and the FLOPs of a one-block
model counted by hand. Every expected value below is written out, not computed by the code under test.

The grid: 4x4 tokens, row-major positions p = 4 i + j, d = i + j:

    d:  0 1 2 3     position:  0  1  2  3
        1 2 3 4                4  5  6  7
        2 3 4 5                8  9 10 11
        3 4 5 6               12 13 14 15

GtR with K = 3: stage 2 (reconstruction) is d odd; stage 0 is d % 4 == 0, stage 1 is d % 4 == 2.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import build_tiny_mar
from lazymar.config import AccelConfig
from lazymar.flops import estimate, measure
from lazymar.gtr import (GtRConfig, fts_scores, fts_select, fts_steps_split, head_steps_of, stage_of_tokens,
                         stage_step_counts, staged_mask_lens, staged_orders)
from lazymar.marche import MARcheConfig, score_cached

# 4x4 tokens (64 px / stride 16), buffer 2, one encoder and one decoder block of width 8 (2 heads,
# MLP 16), 4-channel tokens, a one-block head of width 8 with 5 diffusion steps.
ONE_BLOCK = dict(img_size=64, vae_embed_dim=4, buffer_size=2, encoder_embed_dim=8, encoder_depth=1,
                 encoder_num_heads=2, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2,
                 mlp_ratio=2.0, diffloss_d=1, diffloss_w=8, num_sampling_steps="5")

STAGE_0 = [0, 7, 10, 13]  # d = 0, 4, 4, 4
STAGE_1 = [2, 5, 8, 15]  # d = 2, 2, 2, 6
STAGE_2 = [1, 3, 4, 6, 9, 11, 12, 14]  # d odd

# GtR with 2 / 1 / 1 MAR steps for the three stages: 4 MAR steps in all.
GTR_2_1_1 = GtRConfig(stage_steps=(2 / 4, 1 / 4, 1 / 4))


def gtr_accel(gtr: GtRConfig) -> AccelConfig:
    return AccelConfig(token_cache=None, condition_cache=None, head_cache=None, gtr=gtr)


# ------------------------------------------------------------------------------------- GtR
def test_stage_partition_of_a_4x4_grid():
    expected = [0, 2, 1, 2,
                2, 1, 2, 0,
                1, 2, 0, 2,
                2, 0, 2, 1]
    assert stage_of_tokens(4, 4, 3).tolist() == expected
    assert [p for p in range(16) if expected[p] == 0] == STAGE_0
    assert [p for p in range(16) if expected[p] == 1] == STAGE_1
    assert [p for p in range(16) if expected[p] == 2] == STAGE_2


def test_stage_steps_and_staged_schedule_at_4_steps():
    sizes = [4, 4, 8]
    # Default stage steps 15/64, 4/64, 1/64 of 4: 0.94 -> 1, 0.25 -> 0 -> at least 1, 0.06 -> 1.
    assert stage_step_counts(4, GtRConfig(), sizes) == [1, 1, 1]
    # Stage 0 in one step (12 left masked), stage 1 in one (8 left), the last step predicts the 8 of
    # stage 2 and its entry is MAR's clamp: floor(8 cos(pi/2)) = 0 -> at least 1.
    assert staged_mask_lens(sizes, [1, 1, 1]) == [12, 8, 1]
    assert stage_step_counts(4, GTR_2_1_1, sizes) == [2, 1, 1]
    # Stage 0 over 2 steps: floor(4 cos(pi/4)) = 2 of its 4 stay masked (12 + 2 = 14), then the stage
    # is finished (12); stage 1 in one step (8); stage 2 as above (1).
    assert staged_mask_lens(sizes, [2, 1, 1]) == [14, 12, 8, 1]


def test_staged_order_of_the_identity_order():
    # MAR generates an order from its end, so stage 2 comes first in the order and stage 0 last,
    # each keeping the input's relative order.
    out = staged_orders(torch.arange(16)[None], stage_of_tokens(4, 4, 3))
    assert out[0].tolist() == STAGE_2 + STAGE_1 + STAGE_0


def test_head_steps_and_fts_split_at_4_steps():
    cfg = GtRConfig()
    # 3 generation steps (stages 0 and 1 of GTR_2_1_1): 50 -> 20 linearly, i.e. 50, 35, 20; then 20.
    assert [head_steps_of(s, 3, cfg) for s in range(4)] == [50, 35, 20, 20]
    # 2 generation steps (the default at 4 MAR steps): 50, 20; reconstruction 20.
    assert [head_steps_of(s, 2, cfg) for s in range(3)] == [50, 20, 20]
    # FTS on the 8 reconstructed tokens of an image: 10% of 8 = 0.8 -> 1 token gets 50 steps.
    assert fts_steps_split(8, 20, cfg) == [(1, 50), (7, 20)]


def test_fts_scores_of_hand_made_conditions():
    """D = 4, score = |Z_1| (1 + 1/2) + |Z_2| (1 + 2/2) with Z the DFT over channels."""
    z = torch.tensor([[1.0, 1.0, 1.0, 1.0],  # constant: Z_1 = Z_2 = 0 -> 0
                      [1.0, -1.0, 1.0, -1.0],  # alternating: Z_1 = 1 + i - 1 - i = 0, Z_2 = 4 -> 8
                      [1.0, 0.0, 0.0, 0.0],  # impulse: |Z_m| = 1 -> 1.5 + 2 = 3.5
                      [1.0, 1.0, 0.0, 0.0]])  # Z_1 = 1 - i (|.| = sqrt 2), Z_2 = 1 - 1 = 0 -> 1.5 sqrt 2
    expected = torch.tensor([0.0, 8.0, 3.5, 1.5 * math.sqrt(2)])
    torch.testing.assert_close(fts_scores(z), expected, rtol=0, atol=1e-6)  # float32 FFT rounding
    # Two images of 4 tokens, top 25% (one each) and top 50% (two each).
    scores = torch.cat([expected, expected.flip(0)])
    assert fts_select(scores, rows=2, fraction=0.25).tolist() == [False, True, False, False,
                                                                  False, False, True, False]
    assert fts_select(scores, rows=2, fraction=0.5).tolist() == [False, True, True, False,
                                                                 False, True, True, False]


def test_gtr_sampler_follows_the_hand_worked_plan():
    """The sampler on the 4x4 grid with the identity order, GtR 2/1/1 steps, guidance off: which
    positions are known at each step, and the head's (tokens, steps) per call."""
    model = build_tiny_mar(**ONE_BLOCK)
    masks, head_calls = [], []
    encoder, head = model.forward_mae_encoder, model.diffloss.sample

    def spy_encoder(x, mask, class_embedding, keep=None):
        masks.append(mask[0].tolist())
        return encoder(x, mask, class_embedding, keep)

    def spy_head(z, temperature=1.0, cfg=1.0, *, num_steps=None, **kwargs):
        head_calls.append((len(masks) - 1, z.shape[0], num_steps, z.clone()))
        return head(z, temperature, cfg, num_steps=num_steps, **kwargs)

    model.forward_mae_encoder, model.diffloss.sample = spy_encoder, spy_head
    with torch.no_grad():
        model.sample_tokens(1, num_iter=4, cfg=1.0, labels=torch.tensor([3]), orders=torch.arange(16)[None],
                            accel=gtr_accel(GTR_2_1_1))

    def masked_except(known):
        return [0.0 if p in known else 1.0 for p in range(16)]

    assert masks == [masked_except([]),
                     masked_except([10, 13]),  # step 0: the last 2 of the staged order
                     masked_except([0, 7, 10, 13]),  # step 1: stage 0 complete
                     masked_except(STAGE_0 + STAGE_1)]  # step 2: stage 1 complete; step 3: stage 2
    calls = sorted((step, n, steps) for step, n, steps, _ in head_calls)
    assert calls == [(0, 2, 50), (1, 2, 35), (2, 4, 20), (3, 1, 50), (3, 7, 20)]
    # FTS: the reconstruction token given 50 steps is the one with the highest score.
    z50 = next(z for step, n, steps, z in head_calls if (step, steps) == (3, 50))
    z20 = next(z for step, n, steps, z in head_calls if (step, steps) == (3, 20))
    assert fts_scores(z50).min() > fts_scores(z20).max()


# ------------------------------------------------------------------------------------- MARche
def test_marche_active_count_and_refresh_steps():
    # 25% of 16 tokens = 4; 50% = 8; 100% = every position, the buffer of 2 included.
    assert MARcheConfig().active_count(16, 2) == 4
    assert MARcheConfig(active_fraction=0.5).active_count(16, 2) == 8
    assert MARcheConfig(active_fraction=1.0).active_count(16, 2) == 18
    assert [s for s in range(10) if MARcheConfig().is_refresh(s)] == [0, 3, 6, 9]


def test_marche_scores_cached_tokens_by_attention_of_the_generated_ones():
    """One image, one head, 2 active queries, 3 cached keys; total log-sum-exp 0 so the probabilities
    are exp(score): query 0 gives the cached keys 0.5 / 0.2 / 0.1, query 1 gives 0.1 / 0.1 / 0.6."""
    probs = torch.tensor([[0.5, 0.2, 0.1], [0.1, 0.1, 0.6]])
    scores = probs.log()[None, None]  # (R=1, H=1, Nq=2, Nc=3)
    lse = torch.zeros(1, 1, 2)
    only_0 = score_cached(scores, lse, torch.tensor([[0]]), "mean")
    both = score_cached(scores, lse, torch.tensor([[0, 1]]), "mean")
    most = score_cached(scores, lse, torch.tensor([[0, 1]]), "max")
    torch.testing.assert_close(only_0, torch.tensor([[0.5, 0.2, 0.1]]))
    torch.testing.assert_close(both, torch.tensor([[0.3, 0.15, 0.35]]))  # mean over the two queries
    torch.testing.assert_close(most, torch.tensor([[0.5, 0.2, 0.6]]))
    assert both.argmax().item() == 2 and only_0.argmax().item() == 0  # who joins the active set


def test_marche_active_sets_on_4_steps():
    """4 steps on 16 tokens: MAR leaves floor(16 cos(pi/8)) = 14, floor(16 cos(pi/4)) = 11,
    floor(16 cos(3pi/8)) = 6, then 1 masked, so 2, 3, 5, 6 tokens are generated. Refresh steps 0 and 3
    run all 18 positions. Step 1: active = generated now (3) + at step 0 (2) = 5 from the first block;
    at the score block (the 2nd of 2) the 3 most-attended cached tokens join (8 = 50% of 16). Step 2:
    3 + 5 = 8 already. Rows through each decoder block's qkv, in call order:"""
    model = build_tiny_mar(**{**ONE_BLOCK, "decoder_depth": 2})
    rows = []
    for block in model.decoder_blocks:
        def spy(x, original=block.qkv):
            rows.append(x.shape[1])
            return original(x)
        block.qkv = spy
    accel = AccelConfig(token_cache=None, condition_cache=None, head_cache=None,
                        marche=MARcheConfig(active_fraction=0.5))
    with torch.no_grad():
        model.sample_tokens(1, num_iter=4, cfg=1.0, labels=torch.tensor([3]), accel=accel)
    assert rows == [18, 18,  # step 0: refresh
                    5, 5, 3,  # step 1: 5 active through both blocks, 3 newcomers at block 2
                    8, 8,  # step 2
                    18, 18]  # step 3: refresh


# ------------------------------------------------------------------------------------- FLOPs
def _encoder_macs(n_e):
    """z_proj on all 16 tokens (16 x 4 x 8 = 512), then one block on n_e = buffer + known tokens:
    qkv n_e x 8 x 24, QK^T and AV 2 x n_e^2 x 8, proj n_e x 8 x 8, MLP n_e x 2 x 8 x 16."""
    return 512 + n_e * 192 + 16 * n_e * n_e + n_e * 64 + n_e * 256


# One decoder step: decoder_embed n_e x 8 x 8, then one block on all 18 positions:
# 18 x 192 + 16 x 18^2 + 18 x 64 + 18 x 256 = 3456 + 5184 + 1152 + 4608.
DECODER_BLOCK_MACS = 14400


def _head_macs(n, steps):
    """One DiffLoss.sample of n tokens (guidance off), W = 8, 4 channels: cond_embed n x 8 x 8 once;
    per diffusion step the timestep embedding once (256 x 8 + 8 x 8 = 2112) and per token
    input_proj 4 x 8 + block 5 x 8^2 (adaLN 3W^2, MLP 2W^2) + final layer 2 x 8^2 + 8 x 8 = 544."""
    return n * 64 + steps * (2112 + 544 * n)


@pytest.mark.parametrize("case", ["plain", "gtr", "gtr-2-1-1", "marche"])
def test_flops_of_a_one_block_model_by_hand(case):
    model = build_tiny_mar(**ONE_BLOCK)
    assert (model.seq_len, model.buffer_size, model.token_embed_dim) == (16, 2, 4)
    decoder_blocks = [DECODER_BLOCK_MACS] * 4  # one full decoder block per MAR step
    if case in ("plain", "marche"):
        accel = None if case == "plain" else "marche"
        # MAR's 4 steps leave 14, 11, 6, 1 masked: known before each step 0, 2, 5, 10 -> n_e = 2, 4, 7, 12;
        # 2, 3, 5, 6 tokens generated, each with the model's 5 head steps.
        n_e = [2, 4, 7, 12]
        head_calls = [(2, 5), (3, 5), (5, 5), (6, 5)]
        assert [_encoder_macs(n) for n in n_e] == [1600, 2816, 4880, 8960]
        assert sum(_head_macs(n, t) for n, t in head_calls) == 42240 + 2784 * 16  # 10560 + 2784 n per step
        if case == "marche":
            # Steps 0 and 3 refresh. Step 1: 3 + 2 = 5 active tokens (>= 25% of 16 = 4, so no growth)
            # through the block, each attending over all 18 positions: qkv 5 x 192, attention
            # 2 x 5 x 18 x 8, proj 5 x 64, MLP 5 x 256. Step 2: 5 + 3 = 8 active tokens likewise.
            decoder_blocks = [DECODER_BLOCK_MACS, 960 + 1440 + 320 + 1280, 1536 + 2304 + 512 + 2048,
                              DECODER_BLOCK_MACS]
    elif case == "gtr":
        accel = "gtr"
        # Stage steps 1 / 1 / 1 at 4 MAR steps (test above): 3 steps, plan 12, 8, 1; known 0, 4, 8 ->
        # n_e = 2, 6, 10; 4, 4, 8 tokens generated with 50 and 20 head steps (2 generation steps), and
        # FTS splits the last 8 into 1 x 50 + 7 x 20.
        n_e = [2, 6, 10]
        decoder_blocks = [DECODER_BLOCK_MACS] * 3
        head_calls = [(4, 50), (4, 20), (1, 50), (7, 20)]
        assert [_head_macs(n, t) for n, t in head_calls] == [214656, 86016, 132864, 118848]
    else:
        accel = gtr_accel(GTR_2_1_1)
        # Staged plan 14, 12, 8, 1 (test above): known 0, 2, 4, 8 -> n_e = 2, 4, 6, 10; 2, 2, 4, 8 tokens
        # generated with 50, 35, 20 head steps, and FTS splits the last 8 into 1 x 50 + 7 x 20.
        n_e = [2, 4, 6, 10]
        head_calls = [(2, 50), (2, 35), (4, 20), (1, 50), (7, 20)]
        assert [_head_macs(n, t) for n, t in head_calls] == [160128, 112128, 86016, 132864, 118848]
    encoder = sum(_encoder_macs(n) for n in n_e)
    decoder = sum(64 * n for n in n_e) + sum(decoder_blocks)
    head = sum(_head_macs(n, t) for n, t in head_calls)
    by_hand = {"encoder": 2.0 * encoder, "decoder": 2.0 * decoder, "diffusion_head": 2.0 * head,
               "vae_decode": 0.0}
    assert by_hand == {"plain": {"encoder": 36512.0, "decoder": 118400.0, "diffusion_head": 173568.0},
                       "marche": {"encoder": 36512.0, "decoder": 81600.0, "diffusion_head": 173568.0},
                       "gtr": {"encoder": 25984.0, "decoder": 88704.0, "diffusion_head": 1104768.0},
                       "gtr-2-1-1": {"encoder": 31616.0, "decoder": 118016.0, "diffusion_head": 1219968.0},
                       }[case] | {"vae_decode": 0.0}
    assert estimate(model, num_iter=4, cfg=1.0, accel=accel).components == by_hand
    assert measure(model, num_iter=4, cfg=1.0, accel=accel).components == by_hand
