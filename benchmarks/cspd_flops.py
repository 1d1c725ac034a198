"""FLOPs of a CSpD generation, both models counted, per model and component, beside plain MAR's.

    python -m benchmarks.cspd_flops --target mar_huge --draft mar_base --num_iter 256 --num_draft 4 --ratio 0.05

The command line of :func:`lazymar.cspd_flops.estimate` (the exact formula, which holds for any acceptance
rate; meta-device models). The VAE decode is left out.
"""
from __future__ import annotations

import argparse
import json

import torch

from lazymar.cspd import cspd_preset
from lazymar.cspd_flops import estimate
from lazymar.flops import COMPONENTS, estimate as estimate_plain
from models.mar import MAR_FACTORIES, build_released
from util import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="mar_huge", choices=sorted(MAR_FACTORIES))
    parser.add_argument("--draft", default="mar_base", choices=sorted(MAR_FACTORIES))
    parser.add_argument("--num_iter", type=int, default=256)
    parser.add_argument("--num_draft", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.05)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--head_cache", choices=("none", "draft", "target", "both"), default="none",
                        help="LazyMAR's head cache on these models")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with torch.device("meta"):
        target, draft = build_released(args.target), build_released(args.draft)
    cache = {"draft": args.head_cache in ("draft", "both"), "target": args.head_cache in ("target", "both")}
    config = cspd_preset("cspd", draft, ratio=args.ratio, num_draft=args.num_draft,
                         draft_accel="lazymar-head" if cache["draft"] else None,
                         target_accel="lazymar-head" if cache["target"] else None)
    plain = estimate_plain(target, num_iter=args.num_iter, cfg=args.cfg)
    cspd = estimate(target, config, num_iter=args.num_iter, cfg=args.cfg)
    if args.json:
        print(json.dumps({**cspd.as_dict(), "plain_target_tflops": plain.total / 1e12,
                          "ratio": plain.total / cspd.total}, indent=2))
        return 0
    print(f"{args.draft} drafts for {args.target}: {args.num_iter} steps, num_draft {args.num_draft}, ratio "
          f"{args.ratio}, cfg {args.cfg}, FLOPs per image (any acceptance rate), VAE decode excluded")
    d = cspd.as_dict()
    print(f"target passes {d['target_passes']} ({d['prefill_steps']} pre-fill + {d['verifications']} "
          f"verifications), draft steps {d['draft_steps']}")
    for name, report in (("plain target", plain), ("CSpD target", cspd.target), ("CSpD draft", cspd.draft)):
        parts = "  ".join(f"{c} {report.components[c] / 1e12:.2f}T" for c in COMPONENTS[:3])
        print(f"{name:<14}{report.total / 1e12:>8.2f}T   {parts}")
    print(f"{'CSpD total':<14}{cspd.total / 1e12:>8.2f}T   ratio {plain.total / cspd.total:.2f}x")
    return 0


if __name__ == "__main__":
    cli.run(main)
