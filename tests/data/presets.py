"""Record every preset's tokens on a tiny model: the safety net of refactors that must not change outputs.

    python tests/data/presets.py            # rewrite presets_tiny.pt and its SHA256SUMS line
    python tests/data/presets.py --check    # compare the current code with the stored tokens

Unlike the other vectors here (outputs of upstream releases), these are outputs of this project's own
sampler at one commit (stored in the file): every name in ``lazymar.PRESETS`` and plain MAR
(``accel=None``), at cfg 1 and cfg 3 (linear), with fixed orders, labels and an explicit generator, on
the test suite's tiny MAR (``tests/conftest.py:build_tiny_mar``, the head's zero-initialised adaLN
perturbed so that it depends on its conditions) at 8x8 tokens, 5 decoder blocks, 30 head steps and 24
MAR steps: enough for every technique to act (LazyMAR's decoder drops tokens from step 20, its head
cache reuses on half of the head steps; GtR, MARche, ReCAP and DiSA run their own schedules), small enough
for the test suite.
``tests/test_preset_outputs.py`` holds the current code to them.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]  # tests/ (conftest) and the repository root

from conftest import build_tiny_mar  # noqa: E402

FILE = HERE / "presets_tiny.pt"
MODEL = dict(img_size=128, buffer_size=4, decoder_depth=5, num_sampling_steps="30")
RUN = dict(bsz=2, num_iter=24, cfg_schedule="linear", temperature=1.0)
CFGS = (1.0, 3.0)
SEED = 0


def platform_key() -> dict[str, str]:
    """What bit-identical outputs depend on besides the code: the torch build and the CPU kernels."""
    return {"torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def names() -> list[str | None]:
    from lazymar import PRESETS
    return [None, *PRESETS]


def sample(model, accel, cfg: float, orders: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.sample_tokens(RUN["bsz"], num_iter=RUN["num_iter"], cfg=cfg, cfg_schedule=RUN["cfg_schedule"],
                                   labels=labels, temperature=RUN["temperature"], orders=orders,
                                   generator=torch.Generator().manual_seed(SEED), accel=accel)


def inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    orders = torch.stack([torch.randperm(model.seq_len, generator=g) for _ in range(RUN["bsz"])])
    labels = torch.randint(0, model.num_classes, (RUN["bsz"],), generator=g)
    return orders, labels


def record() -> dict:
    model = build_tiny_mar(seed=SEED, **MODEL)
    orders, labels = inputs(model)
    outputs = {}
    for name in names():
        for cfg in CFGS:
            outputs[(name, cfg)] = sample(model, name, cfg, orders, labels)
            print(f"{name or 'plain':<22} cfg {cfg}: |tokens| max {outputs[(name, cfg)].abs().max():.4g}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    return {"model": MODEL, "run": RUN, "seed": SEED, "orders": orders, "labels": labels, "outputs": outputs,
            "commit": commit, "platform": platform_key()}


def write_sum(path: Path) -> None:
    """Put ``path``'s line into SHA256SUMS (the other lines are left as they are)."""
    spec = __import__("importlib.util").util.spec_from_file_location("refresh", HERE / "refresh.py")
    refresh = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(refresh)
    lines = [ln for ln in refresh.SUMS.read_text().splitlines() if ln.split(maxsplit=1)[1].strip() != path.name]
    lines.append(f"{refresh.sha256(path)}  {path.name}")
    refresh.SUMS.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare the current code with the stored tokens")
    p.add_argument("--only", nargs="+", default=None, help="with --check: these presets ('plain' for None)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the tokens were recorded with 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.check:
        names()  # the acceleration package, for preset names
        stored = torch.load(FILE, weights_only=False)
        model = build_tiny_mar(seed=SEED, **stored["model"])
        worst = 0.0
        for (name, cfg), ref in stored["outputs"].items():
            if args.only is not None and (name or "plain") not in args.only:
                continue
            out = sample(model, name, cfg, stored["orders"], stored["labels"])
            err = float((out - ref).abs().max() / ref.abs().max())
            worst = max(worst, err)
            print(f"{name or 'plain':<22} cfg {cfg}: {'identical' if torch.equal(out, ref) else f'{err:.2e}'}",
                  flush=True)
        return 0 if worst == 0 else 1
    torch.save(record(), FILE)
    write_sum(FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
