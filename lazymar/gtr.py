"""GtR (generation then reconstruction, arXiv 2510.17171): generate a structural subset slowly, fill in
the rest quickly, and give detailed tokens more diffusion steps.

- **Stages.** The token grid is split by recursive checkerboard bisection of ``(i + j)``: with K
  stages the last (reconstruction) stage is the odd half ``(i + j) % 2 == 1``; the even half is
  bisected again and again, the finest residue class first. K = 3: ``(i+j) % 4 == 0``, then
  ``(i+j) % 4 == 2``, then the odd half. Stages are generated in order, each in random order within
  (MAR is trained on random orders, so no retraining).
- **Transformer schedule.** Stage ``k`` takes ``stage_steps[k] * num_iter`` MAR steps (at least one),
  unmasking its tokens on MAR's cosine schedule within the stage.
- **Diffusion schedule.** The head's step count falls linearly from ``head_steps_start`` to
  ``head_steps_end`` over the generation steps and is ``head_steps_recon`` in reconstruction.
- **FTS.** In reconstruction, tokens whose condition has the most high-frequency energy over channels
  (:func:`fts_scores`) get ``fts_steps`` diffusion steps: the top ``fts_fraction``.

Everything here is a pure function of the config, the grid and the step count.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from lazymar.plan import HeadCall, Schedule, StepPlan
from lazymar.schedules import scaled_count
from lazymar.technique import Technique
from models.indexing import positions
from models.schedules import next_mask_len


# Stage step counts at 64 MAR steps. The paper's generation rates r = {2.67, 10.67, 64} tokens per step
# (K = 3) read as 24 / 6 / 2 steps (:data:`PAPER_STAGE_STEPS`) reach only ~2.5x fewer FLOPs in our
# count, not its 3.7x; the default keeps its 4:1 split of the structure stages and reconstructs in one
# step, which reaches 3.7x (docs/techniques.md, "GtR and MARche", has the counts).
PAPER_STAGE_STEPS = (24 / 64, 6 / 64, 2 / 64)
DEFAULT_STAGE_STEPS = (15 / 64, 4 / 64, 1 / 64)


@dataclass(frozen=True)
class GtRConfig:
    """GtR settings (defaults: the paper's MAR setting with K = 3, stage steps from :data:`DEFAULT_STAGE_STEPS`).

    Attributes:
        num_stages: K; 1 is plain MAR's single stage.
        stage_steps: MAR steps of each stage as a fraction of ``num_iter`` (rounded half up, >= 1).
            Length ``num_stages``. ``transformer=False`` ignores it (plain schedule and orders).
        transformer: apply the staged orders and step schedule (the "transformer schedule" ablation).
        diffusion: apply the stage-aware head step counts (the "diffusion schedule" ablation).
        head_steps_start / head_steps_end: head steps at the first / last generation step.
        head_steps_recon: head steps in reconstruction.
        fts: frequency-weighted token selection in reconstruction.
        fts_fraction: share of reconstruction tokens (per image) that get ``fts_steps``.
        fts_steps: head steps of the selected tokens.
        fts_source: which condition is scored with guidance on: ``"cond"`` (the conditional z) or
            ``"guided"`` (``z_u + cfg * (z_c - z_u)`` with the step's guidance scale).
    """

    num_stages: int = 3
    stage_steps: tuple[float, ...] = DEFAULT_STAGE_STEPS
    transformer: bool = True
    diffusion: bool = True
    head_steps_start: int = 50
    head_steps_end: int = 20
    head_steps_recon: int = 20
    fts: bool = True
    fts_fraction: float = 0.1
    fts_steps: int = 50
    fts_source: str = "cond"

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if len(self.stage_steps) != self.num_stages:
            raise ValueError(f"stage_steps needs one fraction per stage ({self.num_stages}), got {self.stage_steps}")
        if any(f <= 0 for f in self.stage_steps):
            raise ValueError(f"stage_steps fractions must be > 0, got {self.stage_steps}")
        for name in ("head_steps_start", "head_steps_end", "head_steps_recon", "fts_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.fts_fraction <= 1.0:
            raise ValueError(f"fts_fraction must be in [0, 1], got {self.fts_fraction}")
        if self.fts_source not in ("cond", "guided"):
            raise ValueError(f"fts_source must be 'cond' or 'guided', got {self.fts_source!r}")
        if self.fts and not self.diffusion:
            raise ValueError("fts=True needs diffusion=True: FTS splits the stage-aware head calls, which "
                             "diffusion=False turns off (pass fts=False for the transformer-only ablation)")

    @property
    def has_reconstruction(self) -> bool:
        """With one stage there is nothing to reconstruct: every step is a generation step."""
        return self.num_stages > 1


def token_stage(d: int, num_stages: int) -> int:
    """Stage index (0-based, generation order) of a grid position with ``i + j == d``.

    Stage ``K-1`` is ``(i+j) % 2 == 1``; for ``0 < k < K-1`` the stage is the set with
    ``(i+j) % 2^(K-k) == 2^(K-k-1)``; stage 0 takes the rest, ``(i+j) % 2^(K-1) == 0``. With K = 1
    every token is in stage 0.
    """
    if num_stages == 1:
        return 0
    if d % 2 == 1:
        return num_stages - 1
    for k in range(1, num_stages - 1):
        period = 2 ** (num_stages - k)
        if d % period == period // 2:
            return k
    return 0


def stage_sizes(h: int, w: int, num_stages: int) -> list[int]:
    """Tokens in each stage of an ``h x w`` grid (plain Python: planning reads no tensor)."""
    stages = [token_stage(i + j, num_stages) for i in range(h) for j in range(w)]
    return [stages.count(k) for k in range(num_stages)]


def stage_of_tokens(h: int, w: int, num_stages: int) -> torch.Tensor:
    """(h*w,) stage index (:func:`token_stage`) of each row-major grid position."""
    return torch.tensor([token_stage(i + j, num_stages) for i in range(h) for j in range(w)])


@lru_cache(maxsize=64)
def _stages_on(h: int, w: int, num_stages: int, device: torch.device) -> torch.Tensor:
    """:func:`stage_of_tokens` on ``device``, made once per process: not a copy to the device per call."""
    return stage_of_tokens(h, w, num_stages).to(device)


def stage_step_counts(num_iter: int, config: GtRConfig, stage_sizes: list[int]) -> list[int]:
    """MAR steps of each stage at ``num_iter``: ``stage_steps[k] * num_iter`` rounded half up, at least
    one and at most the stage's token count (a step must generate something)."""
    return [min(n, scaled_count(f, num_iter, minimum=1)) for f, n in zip(config.stage_steps, stage_sizes)]


def staged_mask_lens(stage_sizes: list[int], steps: list[int]) -> list[int]:
    """Tokens left masked after each MAR step when stages are generated in order.

    Within a stage of ``n`` tokens and ``S`` steps, MAR's cosine schedule (``next_mask_len``) sets how
    many of the stage's tokens stay masked, and the stage is finished at its last step. The very last
    step predicts everything left regardless; its entry is what plain MAR's schedule gives (it sets
    the guidance scale), so one stage over all tokens reproduces plain MAR's schedule exactly.
    """
    out: list[int] = []
    for k, (n, S) in enumerate(zip(stage_sizes, steps)):
        later = sum(stage_sizes[k + 1:])
        left = n
        for s in range(S):
            left = next_mask_len(s, S, n, left)
            if s == S - 1 and k < len(stage_sizes) - 1:
                left = 0
            out.append(later + left)
    return out


def staged_orders(orders: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
    """Reorder each row of ``orders`` (B, L) so that stage 0 is generated first, then stage 1, ...,
    keeping the relative order within a stage.

    MAR keeps the *first* ``mask_len`` positions of an order masked, so it generates an order from its
    end: stage 0 goes last. With random ``orders`` this is a random order within each stage, as GtR
    wants; with one stage ``orders`` come back unchanged.
    """
    key = -stage[orders]  # (B, L): later stages first
    return orders.gather(1, key.argsort(dim=1, stable=True))


def head_steps_of(step: int, generation_steps: int, config: GtRConfig) -> int:
    """Diffusion steps of the tokens generated at MAR ``step`` (reconstruction steps: ``head_steps_recon``).

    Linear from ``head_steps_start`` (first generation step) to ``head_steps_end`` (last one), rounded
    half up.
    """
    if step >= generation_steps:
        return config.head_steps_recon
    if generation_steps == 1:
        return config.head_steps_start
    frac = step / (generation_steps - 1)
    value = config.head_steps_start + (config.head_steps_end - config.head_steps_start) * frac
    return scaled_count(value, 1, minimum=1)


def fts_steps_split(n_tokens: int, steps: int | None, config: GtRConfig) -> list[tuple[int, int | None]]:
    """``[(tokens, diffusion steps), ...]`` per image in a reconstruction step: FTS's selected tokens
    (the top ``fts_fraction``, see :func:`fts_select`) get ``fts_steps``, the rest ``steps``."""
    if not config.fts:
        return [(n_tokens, steps)]
    k = scaled_count(config.fts_fraction, n_tokens)
    return [(k, config.fts_steps), (n_tokens - k, steps)]


def fts_scores(z: torch.Tensor) -> torch.Tensor:
    """Frequency-weighted score of each condition ``z`` (n, D): ``sum_{m=1..D/2} |DFT(z)[m]| (1 + m/(D/2))``.

    The magnitude spectrum is over the channel dimension; the weight grows with frequency, so tokens
    whose conditions vary fast across channels (detail) score high. The DC term is left out.
    """
    D = z.shape[-1]
    half = D // 2
    amp = torch.fft.rfft(z.float(), dim=-1).abs()[:, 1:half + 1]  # (n, D/2): frequencies 1..D/2
    weight = 1 + torch.arange(1, half + 1, device=z.device, dtype=amp.dtype) / half
    return (amp * weight).sum(dim=-1)


def fts_select(scores: torch.Tensor, rows: int, fraction: float) -> torch.Tensor:
    """(n,) bool: the top ``fraction`` (rounded half up) of each image's tokens by score.

    ``scores`` are the tokens of ``rows`` images in row-major order, the same count per image.
    """
    per = scores.shape[0] // rows
    k = scaled_count(fraction, per)
    chosen = torch.zeros(rows, per, dtype=torch.bool, device=scores.device)
    if k > 0:
        top = scores.reshape(rows, per).topk(k, dim=1).indices
        chosen.scatter_(1, top, True)
    return chosen.reshape(-1)


class GtR(Technique):
    """GtR as a step technique: staged schedule and orders (``transformer``), stage-aware head step
    counts (``diffusion``) and FTS's split of reconstruction tokens into two head calls (``fts``).

    Its head step counts yield to another technique's (DiSA's annealing replaces them: both mean "fewer
    steps later", DiSA's has released code); FTS's detailed tokens keep ``fts_steps`` either way.
    """

    label = "GtR"
    writes = frozenset({"schedule", "head", "head_steps"})
    defers = frozenset({"head_steps"})

    def __init__(self, model, config: GtRConfig, accel=None) -> None:
        super().__init__(model)
        self.config = config
        self.generation_steps = 0

    def schedule(self, sched: Schedule) -> Schedule | None:
        gtr, seq_len = self.config, self.model.seq_len
        if gtr.transformer:
            sizes = stage_sizes(self.model.seq_h, self.model.seq_w, gtr.num_stages)
            steps = stage_step_counts(sched.num_iter, gtr, sizes)
            lens = tuple(staged_mask_lens(sizes, steps))
            self.generation_steps = sum(steps[:-1]) if gtr.has_reconstruction else len(lens)
            return Schedule(sched.num_iter, lens, lens)
        # Without staged orders, reconstruction is the steps that start with at most half the tokens
        # masked (GtR's reconstruction stage is the odd half for any K > 1).
        before = (seq_len,) + sched.mask_lens[:-1]
        self.generation_steps = sum(1 for m in before if not (gtr.has_reconstruction and m <= seq_len // 2))
        return None

    def arrange_orders(self, orders: torch.Tensor) -> torch.Tensor:
        model = self.model
        return staged_orders(orders, _stages_on(model.seq_h, model.seq_w, self.config.num_stages, orders.device))

    def reconstructing(self, step: int) -> bool:
        return self.config.has_reconstruction and step >= self.generation_steps

    def plan_head_calls(self, p: StepPlan) -> dict:
        gtr = self.config
        if not (gtr.fts and self.reconstructing(p.step)):
            return {}
        (k, k_steps), (rest, _) = fts_steps_split(p.n_pred, None, gtr)  # the rest's steps: head_steps
        calls = [HeadCall(k, k_steps, detail=True), HeadCall(rest)]
        return {"head": [call for call in calls if call.tokens]}

    def plan_head_steps(self, p: StepPlan) -> dict:
        if not self.config.diffusion:
            return {}
        return {"head_steps": head_steps_of(p.step, self.generation_steps, self.config)}

    def split_head(self, p: StepPlan, z: torch.Tensor, cfg: float, bsz: int) -> list[torch.Tensor]:
        """FTS: the most detailed tokens of each image (scored on their conditions) get the detail call."""
        n = z.shape[0] // 2 if p.guided else z.shape[0]
        scored = z[:n]
        if p.guided and self.config.fts_source == "guided":
            scored = z[n:] + cfg * (z[:n] - z[n:])
        per = n // bsz
        detailed = fts_select(fts_scores(scored), bsz, self.config.fts_fraction).reshape(bsz, per)
        first_row = torch.arange(bsz, device=z.device)[:, None] * per
        return [(positions(detailed if call.detail else ~detailed, call.tokens) + first_row).reshape(-1)
                for call in p.head]
