"""Time the plain MAR sampler by component (encoder, decoder, diffusion head, VAE decode).

Random weights: the cost of sampling does not depend on the weights, so any released size can be timed
without its checkpoint. Example (CPU, MAR-B, 64 steps)::

    python -m benchmarks.profile_sampler --model mar_base --num_iter 64 --bsz 1 --cfg 3.0 [--ops 15]

The first run is a short warm-up and is not timed; on GPU the clock is read after synchronizing.
``--ops N`` also prints the N operators with the most self time (torch.profiler over the timed run), which
is where to look before optimizing anything.
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch

from models.vae import KL16_CONFIG, VAE_LATENT_SCALE, AutoencoderKL
from util.precision import autocast
from util.timing import ComponentTimer, add_sampler_args, build_timed_model, check_sampler_args, time_call

PARTS = (("forward_mae_encoder", "encoder"), ("forward_mae_decoder", "decoder"))


def profile(model, vae, *, bsz: int, num_iter: int, cfg: float, device: torch.device,
            seed: int = 0) -> tuple[dict[str, float], float]:
    """Seconds per component and in total for one plain-MAR generation of ``bsz`` images.

    Plain MAR only: the component timers wrap the encoder, decoder and head methods the plain step
    calls; an acceleration technique runs its own parts of the transformer, which they would not see.
    """
    timer = ComponentTimer(device)
    labels = torch.arange(bsz, device=device) % model.num_classes
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad(), timer.wrap(model, *PARTS[0]), timer.wrap(model, *PARTS[1]), \
            timer.wrap(model.diffloss, "sample", "diffusion_head"), timer.wrap(vae, "decode", "vae_decode"):
        def run():
            tokens = model.sample_tokens(bsz, num_iter=num_iter, cfg=cfg, labels=labels, generator=gen)
            return vae.decode(tokens / VAE_LATENT_SCALE)
        total, _ = time_call(run, device)
    seconds = dict(timer.seconds)
    seconds["other"] = total - sum(seconds.values())
    return seconds, total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sampler_args(p)
    p.add_argument("--ops", type=int, default=0, help="also print the N operators with the most self time")
    args = p.parse_args(argv)
    check_sampler_args(args)
    if args.ops < 0:
        raise ValueError(f"--ops must be >= 0, got {args.ops}")
    model, device = build_timed_model(args)
    vae = AutoencoderKL(**KL16_CONFIG).to(device).eval()
    with autocast(device, args.precision):
        profile(model, vae, bsz=args.bsz, num_iter=2, cfg=args.cfg, device=device)  # warm-up, not timed
        recorder = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        with recorder if args.ops else nullcontext():
            seconds, total = profile(model, vae, bsz=args.bsz, num_iter=args.num_iter, cfg=args.cfg, device=device)
    print(f"{args.model}, {args.num_iter} steps, batch {args.bsz}, cfg {args.cfg}, "
          f"{args.num_sampling_steps} diffusion steps, {device} ({torch.get_num_threads()} threads), "
          f"{args.precision}")
    print(f"{'component':<16}{'seconds':>10}{'per image':>11}{'share':>8}")
    for name, s in seconds.items():
        print(f"{name:<16}{s:>10.2f}{s / args.bsz:>11.2f}{s / total:>8.1%}")
    print(f"{'total':<16}{total:>10.2f}{total / args.bsz:>11.2f}")
    if args.ops:
        print(recorder.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
    return 0


if __name__ == "__main__":
    from util import cli
    cli.run(main)
