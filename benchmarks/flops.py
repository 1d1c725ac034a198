"""FLOPs of one image's generation, split by component, for any model size, preset and step count.

    python -m benchmarks.flops --model mar_huge --num_iter 64 --cfg 3.25 [--accel lazymar] [--json]
    python -m benchmarks.flops --model mar_huge --accel cspd --draft_model mar_base   # both models counted

The command line of :func:`lazymar.flops.estimate` (the exact formula; the models are built on the meta
device, so MAR-H counts in milliseconds): plain MAR, then each ``--accel`` preset with its ratio to plain.
Per model of speculative decoding: ``python -m benchmarks.cspd_flops``.
"""
from __future__ import annotations

import argparse
import json

import torch

from lazymar.config import PRESETS
from lazymar.cspd import named_accel
from lazymar.flops import COMPONENTS, FlopReport, estimate
from lazymar.names import ACCEL_NAMES, CSPD_PRESETS, check_draft_flags
from models.mar import MAR_FACTORIES, build_released
from models.schedules import check_sampling_settings
from models.vae import KL16_CONFIG, AutoencoderKL
from util import cli


def format_table(rows: list[tuple[str, FlopReport]]) -> str:
    head = f"{'preset':<20}" + "".join(f"{c:>16}" for c in COMPONENTS) + f"{'total':>12}{'ratio':>8}"
    lines = [head, "-" * len(head)]
    base = rows[0][1].total
    for name, r in rows:
        lines.append(f"{name:<20}" + "".join(f"{r.components[c] / 1e12:>15.3f}T" for c in COMPONENTS)
                     + f"{r.total / 1e12:>11.2f}T{base / r.total:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mar_huge", choices=sorted(MAR_FACTORIES))
    parser.add_argument("--num_iter", type=int, default=64)
    parser.add_argument("--cfg", type=float, default=3.25)
    parser.add_argument("--num_sampling_steps", type=int, default=100)
    parser.add_argument("--accel", default=None, nargs="+", choices=[*ACCEL_NAMES, "all"],
                        help="presets to count beside plain MAR (default: plain only; 'all': every preset but "
                             "CSpD's, which need --draft_model)")
    parser.add_argument("--draft_model", default=None, choices=sorted(MAR_FACTORIES),
                        help="the draft of --accel cspd / cspd-release (both models are counted)")
    parser.add_argument("--json", action="store_true", help="print the last preset's (or plain MAR's) report as JSON")
    args = parser.parse_args(argv)
    check_sampling_settings(num_iter=args.num_iter, cfg=args.cfg)
    names = sorted(PRESETS) if args.accel == ["all"] else (args.accel or [])
    cspd = [n for n in names if n in CSPD_PRESETS]
    check_draft_flags(cspd[0] if cspd else (names[-1] if names else None), args.draft_model)
    with torch.device("meta"):
        model = build_released(args.model, num_sampling_steps=args.num_sampling_steps)
        draft = build_released(args.draft_model, num_sampling_steps=args.num_sampling_steps) if cspd else None
        vae = AutoencoderKL(**KL16_CONFIG)
    rows = [("plain", estimate(model, num_iter=args.num_iter, cfg=args.cfg, vae=vae))]
    for name in names:
        accel = named_accel(name, draft if name in CSPD_PRESETS else None)
        label = f"{name} ({args.draft_model})" if name in CSPD_PRESETS else name
        rows.append((label, estimate(model, num_iter=args.num_iter, cfg=args.cfg, accel=accel, vae=vae)))
    if args.json:
        out = rows[-1][1].as_dict()
        out.update(model=args.model, num_iter=args.num_iter, cfg=args.cfg, accel=names[-1] if names else None,
                   plain_total_tflops=rows[0][1].total / 1e12)
        if names and names[-1] in CSPD_PRESETS:
            out.update(draft_model=args.draft_model)
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.model}, {args.num_iter} steps, cfg {args.cfg}, {args.num_sampling_steps} diffusion steps, "
              f"FLOPs per image (total excludes the VAE decode)")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    cli.run(main)
