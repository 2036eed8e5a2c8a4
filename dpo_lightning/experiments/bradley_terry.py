"""Preference pairs labelled by sampling a Bradley-Terry model of a known reward, and the
Bradley-Terry maximum-likelihood fit of such pairs.

With ``y1, y2 ~ pi_ref`` and ``P(y1 preferred) = sigmoid((r(y1) - r(y2)) / tau)`` (a labeller
of temperature ``tau``), the population DPO loss at ``beta`` is minimised exactly when
``beta (h(y1) - h(y2)) = (r(y1) - r(y2)) / tau`` for every pair, ``h = log pi - log pi_ref``:
at ``pi_ref exp(r / (beta tau)) / Z``, the KL-regularised optimum ``pi*`` at ``beta tau``
(DPO paper, arXiv 2305.18290, §4-5, whose Bradley-Terry reward is ``r / tau``). So DPO at
``beta`` reaches ``pi*_beta`` of the reward ``r`` only when the labels are ``sigmoid(r1 - r2)``
(``tau = 1``); a sharper labeller moves the optimum to a smaller effective beta.

On finitely many pairs the DPO loss of a policy that can set every ``h`` freely is the
Bradley-Terry negative log-likelihood of the scores ``beta h``: its minimiser is
:func:`fit_scores`, the "empirical optimum" that a trained policy can reach at best.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_pairs(ref_logprobs: Tensor, rewards: Tensor, temperature: float, n: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` pairs of distinct completion indices ``(chosen, rejected)``, each ``(n,)`` int64.

    Both completions are drawn independently from ``pi_ref`` (``(K,)`` log-probs over the set);
    draws of the same completion twice carry no preference and are redrawn (the population
    optimum does not depend on which pairs are compared, only on the labels). The first is
    chosen with probability ``sigmoid((r1 - r2) / temperature)``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probs = ref_logprobs.double().exp()
    first, second = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    while first.numel() < n:
        a = torch.multinomial(probs, 2 * n, replacement=True, generator=generator)
        b = torch.multinomial(probs, 2 * n, replacement=True, generator=generator)
        keep = a != b
        first, second = torch.cat([first, a[keep]])[:n], torch.cat([second, b[keep]])[:n]
    p_first = torch.sigmoid((rewards.double()[first] - rewards.double()[second]) / temperature)
    first_wins = torch.rand(n, generator=generator, dtype=torch.float64) < p_first
    return torch.where(first_wins, first, second), torch.where(first_wins, second, first)


def negative_log_likelihood(scores: Tensor, chosen: Tensor, rejected: Tensor) -> Tensor:
    """Mean Bradley-Terry NLL ``-log sigmoid(s[chosen] - s[rejected])`` of ``(K,)`` scores over
    ``(n,)`` pairs: the DPO loss of a policy whose implicit rewards ``beta h`` are ``scores``."""
    return -torch.nn.functional.logsigmoid(scores[chosen] - scores[rejected]).mean()


def fit_scores(chosen: Tensor, rejected: Tensor, k: int, iterations: int = 50) -> Tensor:
    """``(k,)`` float64 Bradley-Terry maximum-likelihood scores of ``(n,)`` pairs, with
    ``scores[0] = 0`` (scores are defined up to a constant), by Newton's method.

    Finite only when every completion has both won and lost against the rest (a strongly
    connected comparison graph); raises otherwise.
    """
    wins = torch.bincount(chosen, minlength=k)
    losses = torch.bincount(rejected, minlength=k)
    if bool((wins == 0).any()) or bool((losses == 0).any()):
        raise ValueError("every completion must win and lose at least once for a finite Bradley-Terry fit")
    free = torch.zeros(k - 1, dtype=torch.float64)
    for _ in range(iterations):
        free.requires_grad_(True)
        scores = torch.cat([torch.zeros(1, dtype=torch.float64), free])
        loss = negative_log_likelihood(scores, chosen, rejected)
        grad = torch.autograd.grad(loss, free, create_graph=True)[0]
        hessian = torch.stack([torch.autograd.grad(g, free, retain_graph=True)[0] for g in grad])
        step = torch.linalg.solve(hessian.detach(), grad.detach())
        free = (free.detach() - step)
        if float(step.abs().max()) < 1e-12:
            break
    return torch.cat([torch.zeros(1, dtype=torch.float64), free.detach()])
