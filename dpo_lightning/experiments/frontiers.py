"""Reference frontiers of reward against KL from samples of the reference policy, per prompt:
best-of-n with its exact KL, and the KL-regularised optimum pi* by self-normalised importance
weights; a method's regret and KL efficiency against pi*.

``scores`` is ``(P, M)``: the rewards of ``M`` samples of the reference (SFT) policy for each of
``P`` prompts. Both frontiers treat the samples' empirical distribution as the reference's
(a plug-in estimate): exact for it, and as good as ``M`` samples are for the reference. All
values are float64 means over the prompts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def best_of_n(scores: Tensor, n: int) -> tuple[float, float]:
    """``(reward, KL)`` of best-of-``n`` sampling from the reference, averaged over prompts.

    The best of ``n`` draws has reward level ``v`` with probability ``F(v)^n - F(v-)^n`` (``F``
    the reward's distribution function), and within a level it is distributed as the reference
    is (the draws are independent and the pick depends only on the rewards), so
    ``KL(best-of-n || ref)`` is the KL between the two distributions of reward levels. With
    ``M`` distinct rewards it approaches ``log n - (n - 1) / n``, a bound; ties (discrete
    rewards) make it smaller.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rewards, kls = [], []
    for row in scores.double():
        levels, counts = torch.unique(row, sorted=True, return_counts=True)
        p = counts.double() / row.numel()
        cdf = p.cumsum(0).clamp(max=1.0)
        q = cdf**n - torch.cat([torch.zeros(1, dtype=torch.float64), cdf[:-1]]) ** n
        rewards.append(float((q * levels).sum()))
        kls.append(float(torch.where(q > 0, q * (q / p).log(), torch.zeros_like(q)).sum()))
    return sum(rewards) / len(rewards), sum(kls) / len(kls)


def optimum(scores: Tensor, beta: float) -> dict[str, float]:
    """pi*_beta = ref exp(r / beta) / Z per prompt, by self-normalised importance weights
    ``w = exp(r / beta)`` over the samples: ``reward = sum w r / sum w`` and
    ``KL = reward / beta - log mean(w)``, averaged over prompts (one beta for all prompts
    maximises the prompt-averaged objective). ``ess_min`` / ``ess_mean``: the effective sample
    size ``(sum w)^2 / sum w^2`` of the worst and the average prompt, out of ``M``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    s = scores.double()
    logw = s / beta
    logw = logw - logw.max(dim=1, keepdim=True).values  # shifted for range; cancels below
    w = logw.exp()
    reward = (w * s).sum(1) / w.sum(1)
    log_mean_w = torch.logsumexp(s / beta, dim=1) - math.log(s.shape[1])
    kl = reward / beta - log_mean_w
    ess = w.sum(1) ** 2 / (w**2).sum(1)
    return {"beta": beta, "reward": float(reward.mean()), "kl": float(kl.mean()),
            "ess_min": float(ess.min()), "ess_mean": float(ess.mean())}


def _solve_beta(scores: Tensor, key: str, target: float) -> float:
    """The beta at which pi*'s ``key`` (``reward`` or ``kl``, both falling as beta grows) equals
    ``target``, by bisection on log beta over [1e-4, 1e4]."""
    lo, hi = math.log(1e-4), math.log(1e4)
    for _ in range(200):
        mid = (lo + hi) / 2
        if optimum(scores, math.exp(mid))[key] > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def regret(scores: Tensor, kl: float, reward: float) -> float:
    """pi*'s reward at the method's KL minus the method's reward (>= 0 up to noise)."""
    return optimum(scores, _solve_beta(scores, "kl", kl))["reward"] - reward


def kl_efficiency(scores: Tensor, kl: float, reward: float) -> float:
    """pi*'s KL at the method's reward over the method's KL (<= 1 up to noise); ``nan`` when the
    reward is at or above the best sample of some prompt's reach (no finite beta attains it)."""
    best = float(scores.double().max(dim=1).values.mean())
    if reward >= best or kl <= 0:
        return float("nan")
    return optimum(scores, _solve_beta(scores, "reward", reward))["kl"] / kl
