"""The benchmark scripts run and report what they claim (no timing is asserted)."""
from __future__ import annotations

import torch

from conftest import build_tiny_mar
from lazymar.bench import bench, format_rows
from models.vae import AutoencoderKL
from util.profile_sampler import profile


def test_bench_rows_pair_latency_with_flops():
    model = build_tiny_mar(img_size=128, buffer_size=4, num_sampling_steps="20")
    rows = bench(model, [None, "lazymar", "lazymar-off"], num_iter=16, cfg=3.0, bsz=2, repeats=1,
                 device=torch.device("cpu"), warmup_iter=2)
    assert [r.policy for r in rows] == ["baseline", "lazymar", "lazymar-off"]
    assert rows[0].speedup == 1.0 and rows[0].flops_ratio == 1.0
    assert rows[1].flops_ratio > 1.0 and rows[2].flops_ratio == 1.0
    assert all(r.seconds_per_image > 0 for r in rows)
    assert "lazymar" in format_rows(rows)


def test_profile_covers_every_component():
    model = build_tiny_mar()
    vae = AutoencoderKL(16, (1, 1, 1, 1, 2), ch=32).eval()  # stride 16, like the tiny model expects
    seconds, total = profile(model, vae, bsz=1, num_iter=3, cfg=2.0, device=torch.device("cpu"))
    assert set(seconds) == {"encoder", "decoder", "diffusion_head", "vae_decode", "other"}
    assert all(seconds[k] > 0 for k in ("encoder", "decoder", "diffusion_head", "vae_decode"))
    assert abs(sum(seconds.values()) - total) < 1e-6
