"""The measurement behind the defaults of CSpD's defect options: :func:`lazymar.cspd_accept.verify` on
synthetic heads shaped like MAR's (16 channels, last-step standard deviation ~0.0063, earlier steps'
log-standard-deviations summing to ~-174 per channel), for drafts ``delta`` target standard deviations
from the target's token and trajectory ratios ``F``.

Measured per setting, over many tokens: the share of drafts kept, of tokens left at zero, the mean
residual rounds, and the error against the target's own token on the same trajectory (the token
target-only sampling gives, ``mu_p``) in target standard deviations (RMS over channels; a zero token is
~160 of them away for unit-scale latents).

    python -m lazymar.cspd_study [--tokens 4096] [--seed 0]
"""
from __future__ import annotations

import argparse
import math

import torch

from lazymar.cspd import RELEASE_OPTIONS
from lazymar.cspd_accept import HeadGaussian, verify

CHANNELS = 16
LAST_STD = 0.0063  # last-step standard deviation of MAR's head at 100 steps (0.00624-0.00643)
LOGSTD_SUM = -174.0  # per channel, sum of the earlier steps' log-standard-deviations at 100 steps
OPTION_SETS = {
    "release": dict(RELEASE_OPTIONS),
    "unaccepted=target": {**RELEASE_OPTIONS, "unaccepted": "target"},
    "residual_stop=rejected": {**RELEASE_OPTIONS, "residual_stop": "rejected"},
    "residual Ti": {**RELEASE_OPTIONS, "residual_inner_temperature": True},
    "draft_token=sample": {**RELEASE_OPTIONS, "draft_token": "sample"},
}


def synthetic_heads(n: int, delta: float, log_f: float, gen: torch.Generator) -> tuple[HeadGaussian, HeadGaussian]:
    """Draft ``q`` and target ``p`` for ``n`` tokens: unit-scale target tokens, the draft's mean ``delta``
    target standard deviations away (in a random direction), ``sum_c (L_p - L_q) = log_f``."""
    mu_p = torch.randn(n, CHANNELS, generator=gen)
    direction = torch.nn.functional.normalize(torch.randn(n, CHANNELS, generator=gen), dim=-1)
    std_p = LAST_STD * (1 + 0.01 * torch.randn(n, CHANNELS, generator=gen))
    std_q = LAST_STD * (1 + 0.01 * torch.randn(n, CHANNELS, generator=gen))
    mu_q = mu_p + delta * std_p * direction
    l_q = torch.full((n, CHANNELS), LOGSTD_SUM)
    l_p = l_q + log_f / CHANNELS
    return HeadGaussian(mu_q, std_q, l_q), HeadGaussian(mu_p, std_p, l_p)


def measure(options: dict, delta: float, log_f: float, inner_temperature: float, n: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q, p = synthetic_heads(n, delta, log_f, gen)
    x = q.mean if options["draft_token"] == "mean" else q.mean + q.std * torch.randn(q.mean.shape, generator=gen)
    # One verification of n tokens in blocks of 64 (a block's residual rounds wait on its own tokens).
    kept = zero = rounds = 0
    err = []
    for s in range(0, n, 64):
        sl = slice(s, s + 64)
        v = verify(x[sl], HeadGaussian(q.mean[sl], q.std[sl], q.logstd_sum[sl]),
                   HeadGaussian(p.mean[sl], p.std[sl], p.logstd_sum[sl]), inner_temperature=inner_temperature,
                   max_rounds=options["residual_rounds"], residual_inner_temperature=options["residual_inner_temperature"],
                   residual_stop=options["residual_stop"], unaccepted=options["unaccepted"], generator=gen)
        kept += int(v.accepted.sum())
        zero += int(v.unaccepted.sum()) if options["unaccepted"] == "zero" else 0
        rounds += int(v.residual_rounds)
        err.append((((v.out - p.mean[sl]) / p.std[sl]) ** 2).mean(-1))
    err = torch.cat(err)
    return {"kept": kept / n, "zero": zero / n, "rounds": rounds / math.ceil(n / 64),
            "err_rms": float(err.mean().sqrt())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{'options':<24}{'Ti':>5}{'delta':>7}{'log F':>7}{'kept':>8}{'zero':>8}{'rounds':>8}{'err (sd)':>10}")
    for ti in (1.0, 42.0):
        for delta in (0.0, 2.0, 8.0, 64.0):
            for log_f in (-0.5, 0.0, 0.5):
                for name, options in OPTION_SETS.items():
                    m = measure(options, delta, log_f, ti, args.tokens, args.seed)
                    print(f"{name:<24}{ti:>5g}{delta:>7g}{log_f:>7g}{m['kept']:>8.3f}{m['zero']:>8.3f}"
                          f"{m['rounds']:>8.1f}{m['err_rms']:>10.2f}")
                print()
    return 0


if __name__ == "__main__":
    main()
