"""Gaussian diffusion for MAR's per-token head: noise schedules, respacing, loss and ancestral sampling.

MAR trains its head with a 1000-step cosine schedule (epsilon prediction, learned-range variance,
loss = MSE + variational bound) and samples with the schedule respaced to fewer steps (100). This is
the same mathematics as the improved-DDPM/DiT diffusion MAR builds on, kept to the parts MAR uses and
with the sampling loop written once: the network is a callable ``model_fn(x, t_index) -> (eps,
var_values)``, so guidance and caching live in that callable, not in copies of the loop.

Numerics follow upstream exactly because the equivalence vectors depend on them: schedule arrays are
float64 and each per-step coefficient is rounded to float32 before use.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
COSINE_S = 0.008  # offset of the cosine schedule (Nichol & Dhariwal 2021)
MAX_BETA = 0.999

# model_fn(x, t_index) -> (eps, var_values); t_index indexes the (respaced) schedule, 0 = last step.
ModelFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# noise_fn(shape, t_index) -> standard normal tensor on the right device (lets callers own the RNG stream;
# the index lets them hand out noise drawn in advance for each step, as speculative decoding does).
NoiseFn = Callable[[tuple[int, ...], int], torch.Tensor]


def cosine_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Betas of the cosine alpha-bar schedule, clipped at ``MAX_BETA``."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), MAX_BETA)
                     for i in range(num_timesteps)], dtype=np.float64)


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Betas of the DDPM linear schedule (1e-4 .. 0.02 at 1000 steps, scaled for other lengths).

    Not used by the released MAR models. Its last timestep keeps ``alphabar ~ 4e-5`` instead of the
    cosine schedule's ~2e-9, so the first sampling step weighs the head's eps error by ~0.2 instead of
    ~316: a short training run (our demo model) samples stably with it.
    """
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


NOISE_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {"cosine": cosine_betas, "linear": linear_betas}


def schedule_betas(name: str, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Betas of the named schedule (``"cosine"``, MAR's, or ``"linear"``)."""
    if name not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise_schedule {name!r}; choose one of {sorted(NOISE_SCHEDULES)}")
    return NOISE_SCHEDULES[name](num_timesteps)


def space_timesteps(num_timesteps: int, section_counts: int | str) -> list[int]:
    """Timesteps kept when respacing ``num_timesteps`` to ``section_counts`` (e.g. ``"100"`` or ``"50,50"``).

    Each section of the original range is sampled at evenly rounded fractional strides, which is how the
    released models were sampled; the result is sorted ascending.
    """
    if isinstance(section_counts, int):
        counts = [section_counts]
    else:
        try:
            counts = [int(c) for c in str(section_counts).split(",")]
        except ValueError:
            raise ValueError(f"num_sampling_steps must be an int or a string like '100', got {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    steps: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} sampling steps from a section of {size} timesteps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulated as upstream does: ``round(j * stride)`` differs at some counts (21, 23, 31, ...
        # of 1000) by one timestep, which the annealed step counts of DiSA and GtR hit.
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


@dataclass
class GaussianDiffusion:
    """A (possibly respaced) diffusion process over a 1000-step schedule (cosine, as MAR's).

    Args:
        num_sampling_steps: respacing, e.g. 100 or ``"100"``; ``None`` keeps all training steps.
        num_train_timesteps: length of the underlying schedule.
        noise_schedule: ``"cosine"`` (MAR) or ``"linear"`` (see :func:`linear_betas`).
        max_timestep: clamp every kept timestep to at most this one; kept timesteps that clamp to the
            same value merge into one step. ``None`` keeps them as spaced. DiSA's release clamps at 950
            so that its first step does not divide the head's eps error by ``sqrt(alpha_bar_999)``.

    ``timestep_map[i]`` is the original timestep that respaced index ``i`` stands for; the network is
    always conditioned on original timesteps.
    """

    num_sampling_steps: int | str | None = None
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    noise_schedule: str = "cosine"
    max_timestep: int | None = None
    timestep_map: list[int] = field(init=False)

    def __post_init__(self) -> None:
        base_alphas_cumprod = np.cumprod(1.0 - schedule_betas(self.noise_schedule, self.num_train_timesteps))
        if self.num_sampling_steps is None or self.num_sampling_steps == "":
            kept = list(range(self.num_train_timesteps))
        else:
            kept = space_timesteps(self.num_train_timesteps, self.num_sampling_steps)
        if self.max_timestep is not None:
            if not 0 <= self.max_timestep:
                raise ValueError(f"max_timestep must be >= 0, got {self.max_timestep}")
            kept = sorted({min(t, self.max_timestep) for t in kept})
        betas, last = [], 1.0
        for i in kept:
            betas.append(1 - base_alphas_cumprod[i] / last)
            last = base_alphas_cumprod[i]
        self.timestep_map = kept
        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        self.num_timesteps = len(betas)
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod = ac
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        self.posterior_log_variance_clipped = (
            np.log(np.append(posterior_variance[1], posterior_variance[1:])) if len(betas) > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)
        self.log_betas = np.log(betas)

    # ----------------------------------------------------------------------------------- per step
    def _coef(self, arr: np.ndarray, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor | float:
        """``arr[t]`` rounded to float32 as upstream: per row (``t`` a (n,) tensor, broadcast to ``like``'s
        rank), or one Python float when ``t`` is an int (sampling: every row is at the same step).

        The scalar form keeps the sampling loop free of host-to-device copies (CUDA-graph capturable)
        and gives the same bits: a float32-representable scalar multiplies exactly like a float32 tensor.
        """
        if isinstance(t, int):
            return float(np.float32(arr[t]))
        out = torch.from_numpy(arr).to(t.device)[t].float()
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (self._coef(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._coef(self.posterior_mean_coef1, t, x_t) * x_start
                + self._coef(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._coef(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_log_variance(self, x: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor,
                            var_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(x_{t-1} | x_t) from predicted eps and learned-range variance.

        ``var_values`` in [-1, 1] interpolates the log-variance between the posterior's (min) and
        beta_t (max).
        """
        min_log = self._coef(self.posterior_log_variance_clipped, t, x)
        max_log = self._coef(self.log_betas, t, x)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (self._coef(self.sqrt_recip_alphas_cumprod, t, x) * x
                       - self._coef(self.sqrt_recipm1_alphas_cumprod, t, x) * eps)
        mean, _ = self.q_posterior(pred_xstart, x, t)
        return mean, log_variance

    # ----------------------------------------------------------------------------------- sampling
    def p_sample_loop(self, model_fn: ModelFn, noise: torch.Tensor, *, noise_fn: NoiseFn,
                      temperature: float = 1.0, trace: "TrajectoryTrace | None" = None) -> torch.Tensor:
        """Ancestral sampling from ``noise`` over all (respaced) steps, t = T-1 .. 0.

        Args:
            model_fn: ``(x, t_index) -> (eps, var_values)`` for the current ``x``; guidance, caching and
                timestep mapping are its business.
            noise: the starting x_T, shape (n, C).
            noise_fn: draws the per-step noise; it is called every step, also at t = 0 where the noise
                is multiplied by 0, because upstream does so and the random stream must line up.
            temperature: scales the injected noise.
            trace: when given, records each step's mean and log-variance (see :class:`TrajectoryTrace`);
                it draws nothing and changes nothing.
        """
        x = noise
        for i in reversed(range(self.num_timesteps)):
            eps, var_values = model_fn(x, i)
            # Under autocast the head returns bf16/fp16, and a Python-float coefficient keeps that dtype:
            # the log-variance, and what a trace sums of it over 100 steps, would follow it. They are
            # diffusion state, so they take the state's dtype (float32, as the tokens).
            eps, var_values = eps.to(x.dtype), var_values.to(x.dtype)
            mean, log_variance = self.p_mean_log_variance(x, i, eps, var_values)
            if trace is not None:
                trace.record(i, mean, log_variance)
            step_noise = noise_fn(tuple(x.shape), i)
            nonzero = float(i != 0)
            x = mean + nonzero * torch.exp(0.5 * log_variance) * step_noise * temperature
        return x

    # ----------------------------------------------------------------------------------- training
    def training_losses(self, model: Callable[..., torch.Tensor], x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
        """Per-sample loss ``MSE(eps) + VB`` (the variance is learned through the VB term only).

        ``t`` indexes this process's schedule; the model sees ``timestep_map[t]``.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_t = torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t]
        out = model(x_t, model_t, **model_kwargs)
        C = x_start.shape[1]
        eps, var_values = out[:, :C], out[:, C:]
        # The VB term trains the variance only: the mean prediction is detached for it.
        mean, log_variance = self.p_mean_log_variance(x_t, t, eps.detach(), var_values)
        true_mean, true_log_variance = self.q_posterior(x_start, x_t, t)
        kl = _mean_flat(_normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        nll = -_mean_flat(_discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = _mean_flat((noise - eps) ** 2)
        return mse + vb


@dataclass
class TrajectoryTrace:
    """Per-token statistics of one ancestral trajectory, filled in by :meth:`GaussianDiffusion.p_sample_loop`.

    Continuous speculative decoding compares the draft's and the target's densities of a token through
    them (:mod:`lazymar.cspd`): the last step's Gaussian, and the earlier steps' standard deviations.

    Attributes:
        last_mean: (n, C) mean of the last step (t index 0); it is the sample, as that step adds no noise.
        last_log_variance: (n, C) log-variance of the last step (temperature not included).
        logstd_sum: (n, C) sum over the steps t index >= 1 of ``0.5 * log_variance``, accumulated in loop
            order: the log of the product of those steps' standard deviations (temperature not included).

    All three are in the diffusion state's dtype (float32 under autocast too): ``logstd_sum`` is ~-174 per
    channel at 100 steps, where bf16 resolves only whole units.
    """

    last_mean: torch.Tensor | None = None
    last_log_variance: torch.Tensor | None = None
    logstd_sum: torch.Tensor | None = None

    def record(self, i: int, mean: torch.Tensor, log_variance: torch.Tensor) -> None:
        if i == 0:
            self.last_mean, self.last_log_variance = mean, log_variance
            return
        half = 0.5 * log_variance
        self.logstd_sum = half if self.logstd_sum is None else self.logstd_sum + half


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


def _normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
               logvar2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                         log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of ``x`` under a Gaussian discretised to 8-bit bins on [-1, 1] (the t = 0 term)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
