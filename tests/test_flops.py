"""The FLOPs formula equals a real count of the sampler, component by component, for every policy."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_mar
from lazymar.config import PRESETS
from lazymar.flops import estimate, main, measure
from models.mar import build_released
from models.vae import AutoencoderKL

SMALL = dict(img_size=128, buffer_size=4, decoder_depth=5, num_sampling_steps="30")


@pytest.mark.parametrize("accel", [None, *sorted(PRESETS)])
@pytest.mark.parametrize("cfg, num_iter", [(3.0, 64), (1.0, 16), (2.0, 9)])
def test_formula_equals_real_count(accel, cfg, num_iter):
    model = build_tiny_mar(**SMALL)
    real = measure(model, num_iter=num_iter, cfg=cfg, accel=accel, bsz=2)
    formula = estimate(model, num_iter=num_iter, cfg=cfg, accel=accel, bsz=2)
    assert real.components == formula.components


def test_vae_decode_counted():
    vae = AutoencoderKL(8, (1, 2), ch=32)
    model = build_tiny_mar(**SMALL)
    real = measure(model, num_iter=4, cfg=1.0, bsz=1, vae=vae)
    assert real.components["vae_decode"] > 0
    assert estimate(model, num_iter=4, cfg=1.0, vae=vae).components["vae_decode"] == real.components["vae_decode"]


def test_attention_products_are_counted():
    """CPU attention is not in PyTorch's FLOP registry; our counter must still see it."""
    model = build_tiny_mar(**SMALL)
    with_attn = measure(model, num_iter=2, cfg=1.0)
    s = model.seq_len + model.buffer_size
    attn_products = 2 * 2 * s * s * model.decoder_embed.out_features * len(model.decoder_blocks) * 2
    linear_only = with_attn.components["decoder"] - attn_products
    assert linear_only > 0 and with_attn.components["decoder"] > attn_products


@pytest.mark.parametrize("name, base, lazy, ratio", [("mar_base", 15.49, 5.54, 2.80),
                                                      ("mar_large", 35.05, 12.52, 2.80),
                                                      ("mar_huge", 69.06, 24.38, 2.83)])
def test_released_sizes_close_to_lazymar_paper(name, base, lazy, ratio):
    with torch.device("meta"):
        model = build_released(name)
    b = estimate(model, num_iter=64, cfg=3.25).total / 1e12
    a = estimate(model, num_iter=64, cfg=3.25, accel="lazymar").total / 1e12
    assert abs(b / base - 1) < 0.08 and abs(a / lazy - 1) < 0.08
    assert abs((b / a) / ratio - 1) < 0.03


def test_cli_json(capsys):
    main(["--model", "mar_base", "--num_iter", "16", "--cfg", "2.0", "--accel", "lazymar", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["components"]) == {"encoder", "decoder", "diffusion_head", "vae_decode"}
    assert 0 < out["total_tflops"] < out["baseline_total_tflops"]
