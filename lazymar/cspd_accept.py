"""The acceptance test and residual sampler of continuous speculative decoding, on their own.

Pure functions of the two heads' Gaussians at the verified tokens (no model): :func:`verify` decides,
for ``n`` drafted tokens at once, which drafts are kept and what replaces the others, as released
(``MarkXCloud/CSpD``), with the release's defects as switches that :class:`lazymar.cspd.CSpDConfig`
documents and sets. Each head's token is described by a :class:`HeadGaussian`: its last denoising
step's mean and standard deviation, and the summed log-standard-deviations of its earlier steps.

Random draws, in the release's order, from ``generator`` where given, else from the device's global
generator: one uniform per token; then, if a draft was rejected, per residual round a normal (n, C)
followed by a uniform (n) (with ``residual_exit="fixed"``: every round's, whether or not a draft was
rejected, so that no decision is read on the host).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

UNACCEPTED = ("zero", "target")  # what a token gets when no residual proposal was accepted in time
RESIDUAL_STOP = ("all", "rejected")  # which tokens the residual rounds wait for
RESIDUAL_EXIT = ("early", "fixed")  # stop the rounds by a host read (release) or run them all, masked


@dataclass
class HeadGaussian:
    """One head's view of ``n`` tokens (all (n, C)).

    Attributes:
        mean: last-step mean (the head's own sample on its trajectory: the last step adds no noise).
        std: last-step standard deviation, ``exp(0.5 * log_variance) * temperature``.
        logstd_sum: per channel, the sum over the earlier steps (t index >= 1) of ``0.5 * log_variance``
            (no temperature).
    """

    mean: torch.Tensor
    std: torch.Tensor
    logstd_sum: torch.Tensor


@dataclass
class Verdict:
    """The outcome of verifying ``n`` drafted tokens.

    Attributes:
        out: (n, C) the committed tokens.
        log_prob: (n,) the log of the acceptance test's ratio (accepted where ``log_prob > log u``).
        accepted: (n,) bool, the draft was kept.
        residual_rounds: (0-dim long tensor, on the device) residual rounds the release runs (0 when every
            draft was kept), whether or not more ran masked (``residual_exit="fixed"``).
        unaccepted: (n,) bool, rejected tokens for which no residual proposal was accepted.
    """

    out: torch.Tensor
    log_prob: torch.Tensor
    accepted: torch.Tensor
    residual_rounds: torch.Tensor
    unaccepted: torch.Tensor

    @property
    def prob(self) -> torch.Tensor:
        """The test's ratio (n,) (0 or inf where it is outside float32's range)."""
        return torch.exp(self.log_prob)


def log_trajectory_ratio(q: HeadGaussian, p: HeadGaussian) -> torch.Tensor:
    """``log F = sum_c (L_p - L_q)`` (n,): the log of the product over the earlier steps and channels of
    ``sigma_p / sigma_q``. The release multiplies the target's last-step density by ``F``."""
    return (p.logstd_sum - q.logstd_sum).sum(-1)


def trajectory_ratio(q: HeadGaussian, p: HeadGaussian) -> torch.Tensor:
    """``F`` (n,) itself (may under- or overflow float32; the test and the residual use :func:`log_trajectory_ratio`)."""
    return torch.exp(log_trajectory_ratio(q, p))


def log_density_ratio(y: torch.Tensor, q: HeadGaussian, p: HeadGaussian, inner_temperature: float) -> torch.Tensor:
    """``log F + log N(y; mu_p, (Ti sigma_p)^2) - log N(y; mu_q, (Ti sigma_q)^2)`` (n,) for ``y`` (n, C),
    ``Ti = inner_temperature``: the log of the released test's ratio at ``y``,
    ``exp(-1/2 sum_c ((y - mu_p) / (sigma_p Ti))^2) / exp(-1/2 sum_c ((y - mu_q) / (sigma_q Ti))^2)
    * F * prod_c sigma_q / prod_c sigma_p``.

    Summed per channel in log space: the release's products of 16 standard deviations are below float32's
    range at low temperature (~1e-3 each at temperature 0.15: ``0 / 0``, every draft rejected), and the
    per-channel ``log(sigma_q / sigma_p)`` keeps the ratio's precision where the logs themselves are ~-5.
    """
    z_p = (y - p.mean) / (p.std * inner_temperature)
    z_q = (y - q.mean) / (q.std * inner_temperature)
    return (0.5 * (z_q ** 2 - z_p ** 2) + torch.log(q.std / p.std)).sum(-1) + log_trajectory_ratio(q, p)


def acceptance_prob(x: torch.Tensor, q: HeadGaussian, p: HeadGaussian, inner_temperature: float) -> torch.Tensor:
    """The released test's ratio (n,) for drafted tokens ``x`` (n, C), ``exp`` of :func:`log_density_ratio`
    (0 or inf where that is outside float32's range; :func:`verify` decides on the log)."""
    return torch.exp(log_density_ratio(x, q, p, inner_temperature))


def residual_alpha(y: torch.Tensor, q: HeadGaussian, p: HeadGaussian, inner_temperature: float = 1.0) -> torch.Tensor:
    """Acceptance probability (n,) of residual proposals ``y ~ N(mu_p, (Ti sigma_p)^2)``:
    ``max(0, N_p(y) - N_q(y) / F) / N_p(y) = max(0, 1 - 1 / r(y))`` with ``r`` the test's ratio at ``y``
    (:func:`log_density_ratio`, from its log: the release's densities are ``inf / inf`` at low
    temperature), so accepted proposals follow ``max(0, F p - q)`` (the release: ``Ti = 1`` whatever the
    test used)."""
    return torch.clamp(-torch.expm1(-log_density_ratio(y, q, p, inner_temperature)), min=0)


def verify(x: torch.Tensor, q: HeadGaussian, p: HeadGaussian, *, inner_temperature: float,
           max_rounds: int = 100, residual_inner_temperature: bool = False, residual_stop: str = "all",
           unaccepted: str = "zero", residual_exit: str = "early",
           generator: torch.Generator | None = None) -> Verdict:
    """Verify drafted tokens ``x`` (n, C) drawn by the draft (``q``) against the target (``p``).

    Every token is decided on its own (no prefix truncation). A draft is kept where
    :func:`acceptance_prob` ``> u`` (compared as logs). If any was rejected, residual rounds propose
    ``y ~ N(mu_p, sigma_p^2)`` for all ``n`` tokens (scaled by ``Ti`` with ``residual_inner_temperature``),
    accept where ``u < alpha`` (:func:`residual_alpha`) and write the accepted proposals (a later
    accepted proposal overwrites an earlier one), until every token waited for has had one accepted
    or ``max_rounds`` ran. A rejected draft takes its residual sample.

    Where the release stops is a device value; reading it (``residual_exit="early"``, the release) makes
    the host wait for the device once per round. ``"fixed"`` runs all ``max_rounds`` rounds instead, each
    round's updates masked from the release's stopping round on: the same verdict from the same draws and
    no host read, but every round's draws are made, so the generator moves on by ``max_rounds`` rounds.
    Either way a token's residual is the last proposal accepted before the stop; which round that is
    depends on acceptances only, so the proposal follows ``max(0, F p - q)``.

    Args:
        inner_temperature: ``Ti`` of the test.
        max_rounds: residual rounds at most (release: 100).
        residual_inner_temperature: use ``Ti`` in the residual too (release: False).
        residual_stop: ``"all"`` waits for every verified token, kept drafts included, whose proposals
            are thrown away (release); ``"rejected"`` waits only for the rejected ones.
        unaccepted: a rejected token with no accepted residual proposal becomes ``"zero"`` (release) or
            the target's own sample ``mu_p`` (``"target"``).
        residual_exit: ``"early"`` (release: stop after the round that satisfied ``residual_stop``, one host
            read per round) or ``"fixed"`` (all rounds, masked; no host read).
        generator: source of the draws (None: the device's global generator, as released).
    """
    if residual_stop not in RESIDUAL_STOP:
        raise ValueError(f"residual_stop must be one of {RESIDUAL_STOP}, got {residual_stop!r}")
    if unaccepted not in UNACCEPTED:
        raise ValueError(f"unaccepted must be one of {UNACCEPTED}, got {unaccepted!r}")
    if residual_exit not in RESIDUAL_EXIT:
        raise ValueError(f"residual_exit must be one of {RESIDUAL_EXIT}, got {residual_exit!r}")
    n = x.shape[0]
    log_prob = log_density_ratio(x, q, p, inner_temperature)
    accepted = log_prob > torch.log(_rand((n,), generator, x.device))
    ti = inner_temperature if residual_inner_temperature else 1.0
    waits = torch.ones_like(accepted) if residual_stop == "all" else ~accepted
    residual = torch.zeros_like(x)
    done = torch.zeros_like(accepted)  # a residual proposal was accepted
    # The release runs no round when every draft was kept, and stops after the round in which every token
    # it waits for has had a proposal accepted: from there on nothing changes.
    stopped = accepted.all()
    rounds = torch.zeros((), dtype=torch.long, device=x.device)
    for _ in range(max_rounds):
        if residual_exit == "early" and bool(stopped):
            break
        y = p.mean + p.std * ti * _randn(tuple(x.shape), generator, x.device)
        ok = (_rand((n,), generator, x.device) < residual_alpha(y, q, p, ti)) & ~stopped
        residual = torch.where(ok[:, None], y, residual)
        done = done | ok
        rounds = rounds + (~stopped).long()
        stopped = stopped | (done | ~waits).all()
    never = ~accepted & ~done
    if unaccepted == "target":
        residual = torch.where(never[:, None], p.mean, residual)
    out = torch.where(accepted[:, None], x, residual)
    return Verdict(out=out, log_prob=log_prob, accepted=accepted, residual_rounds=rounds, unaccepted=never)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is not None:
        return torch.rand(shape, generator=generator, device=generator.device).to(device)
    return torch.rand(shape, device=device)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is not None:
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    return torch.randn(shape, device=device)
