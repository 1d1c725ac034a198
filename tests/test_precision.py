"""Sampling precision: float32 weights, autocast for bf16/fp16; half-precision weights are refused clearly."""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_mar
from util.precision import autocast


def test_autocast_context():
    a, b = torch.randn(4, 8), torch.randn(8, 2)
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp16"):
        assert (a @ b).dtype == torch.float16
    with pytest.raises(ValueError, match="precision"):
        autocast("cpu", "int8")


@pytest.mark.parametrize("accel", [None, "lazymar", "gtr+lazymar", "marche+lazymar"])
def test_bf16_autocast_sampling_stays_close_to_fp32(accel):
    model = build_tiny_mar(img_size=128, buffer_size=4, decoder_depth=4, num_sampling_steps="20").eval()
    labels = torch.tensor([0, 1])

    def run(precision):
        g = torch.Generator().manual_seed(0)
        with autocast("cpu", precision):
            return model.sample_tokens(2, num_iter=8, cfg=2.0, labels=labels, generator=g, accel=accel)
    ref, low = run("fp32"), run("bf16")
    assert low.dtype == torch.float32 and torch.isfinite(low).all()  # tokens are carried in float32
    assert not torch.equal(ref, low)  # the products did run in bf16
    # Same random draws, bf16 rounding only. Measured mean relative difference 1.18-1.21e-3 for these
    # four policies, against 1.41 for another seed: 5e-3 is ~4x the bf16 floor and 280x below a wrong draw.
    assert (low - ref).abs().mean() < 5e-3 * ref.abs().mean()


def test_half_weights_are_refused_with_the_way_out():
    model = build_tiny_mar().eval().to(torch.bfloat16)
    with pytest.raises(TypeError, match="autocast"):
        model.sample_tokens(1, num_iter=2, labels=torch.tensor([0]))


def test_non_finite_tokens_are_not_decoded_into_images():
    from models.vae import AutoencoderKL
    from util.generate import decode_images
    from util.loading import TINY_VAE, Generator
    gen = Generator(mar=build_tiny_mar(), vae=AutoencoderKL(**TINY_VAE).eval(), latent_scale=1.0, name="tiny",
                    is_random=True)
    tokens = torch.zeros(1, 16, 8, 8)
    assert decode_images(gen, tokens).shape == (1, 32, 32, 3)
    tokens[0, 3, 2, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        decode_images(gen, tokens)
