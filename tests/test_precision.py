"""Sampling precision: float32 weights, autocast for bf16/fp16; half-precision weights are refused clearly."""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_mar
import util.precision as precision
from util.precision import autocast, cpu_has_native_bf16, resolve_precision


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
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        autocast("cpu", "auto")  # auto is decided once, by the script, and recorded: never per context


@pytest.mark.parametrize("capability,avx512_bf16,amx,onednn,expected", [
    ("AVX512", True, False, True, "bf16"),   # AVX-512 BF16 (Zen 4, Cooper Lake)
    ("AVX512", False, True, True, "bf16"),   # AMX tiles (Sapphire Rapids)
    ("AVX512", False, False, True, "fp32"),  # AVX-512 without bf16 (Skylake-SP): bf16 emulated
    ("AVX2", True, False, True, "fp32"),     # ATEN_CPU_CAPABILITY=avx2 on a bf16 CPU: ATen's kernels are AVX2
    ("AVX512", True, False, False, "fp32"),  # ONEDNN_MAX_CPU_ISA=AVX2: the bf16 matmuls are not native
    ("AVX2", False, False, False, "fp32"),   # the CPU
    ("DEFAULT", False, False, False, "fp32"),
])
def test_auto_precision_follows_native_bf16(monkeypatch, capability, avx512_bf16, amx, onednn, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    assert cpu_has_native_bf16() == (expected == "bf16")
    assert resolve_precision("auto", "cpu") == resolve_precision("auto", torch.device("cpu")) == expected
    for name in precision.PRECISIONS:  # an explicit precision is never second-guessed
        assert resolve_precision(name, "cpu") == name


def test_auto_precision_elsewhere(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cuda") == "fp32"  # a GPU's bf16 is asked for, not assumed
    assert resolve_precision("auto", "meta") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("bf32", "cpu")


def test_auto_precision_of_this_process():
    """Whatever this CPU is, auto names a precision that autocast runs, and agrees with what torch reports."""
    chosen = resolve_precision("auto", "cpu")
    native = (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
              and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
              and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert chosen == ("bf16" if native else "fp32")
    with autocast("cpu", chosen):
        assert (torch.randn(2, 4) @ torch.randn(4, 2)).dtype == (torch.bfloat16 if native else torch.float32)


def test_sample_py_resolves_auto_once(monkeypatch, tmp_path):
    """sample.py's default --precision auto reaches the sampler resolved (bf16 or fp32), never as 'auto'."""
    import numpy as np
    import sample
    args = sample.build_parser().parse_args(["--model", "tiny-random", "--num_per_class", "1",
                                             "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    assert args.precision == "auto"
    seen = []

    def fake_generate(gen, labels, settings, seed, accel, precision="fp32"):
        seen.append(precision)
        return np.zeros((len(labels), 32, 32, 3), dtype=np.uint8), 0.0
    monkeypatch.setattr(sample, "generate", fake_generate)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        args.precision = "auto"
        sample.main(args)
        assert seen[-1] == expected and args.precision == expected


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
