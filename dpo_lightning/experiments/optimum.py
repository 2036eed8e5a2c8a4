"""The KL-regularised optimum on a finite set of completions, exactly, in float64.

For one prompt and a finite completion set ``S`` with reference log-probs ``log pi_ref(y|x)``
(normalised over ``S``) and rewards ``r(y)``, the maximiser of ``E_pi[r] - beta KL(pi || pi_ref)``
over distributions on ``S`` is

    pi*_beta(y|x) = pi_ref(y|x) exp(r(y) / beta) / Z_beta

(DPO paper, arXiv 2305.18290, eq. 4). Every function here takes and returns float64 tensors;
``K`` is the size of ``S``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def normalised(logits: Tensor) -> Tensor:
    """``(K,)`` log-probs of ``logits`` renormalised over the set (``log_softmax`` in float64)."""
    return torch.log_softmax(logits.double(), dim=-1)


def optimal_logprobs(ref_logprobs: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """``(K,)`` log pi*_beta over the set: ``log pi_ref + r / beta``, renormalised."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return normalised(ref_logprobs.double() + rewards.double() / beta)


def expected_reward(logprobs: Tensor, rewards: Tensor) -> float:
    """``E_pi[r]`` for ``(K,)`` log-probs normalised over the set and ``(K,)`` rewards."""
    return float((logprobs.double().exp() * rewards.double()).sum())


def kl_divergence(logprobs: Tensor, ref_logprobs: Tensor) -> float:
    """``KL(pi || pi_ref) = sum_y pi(y) (log pi(y) - log pi_ref(y))`` over the set, ``(K,)`` each."""
    p = logprobs.double()
    return float((p.exp() * (p - ref_logprobs.double())).sum())


def kl_regularised_value(logprobs: Tensor, ref_logprobs: Tensor, rewards: Tensor, beta: float) -> float:
    """The objective pi* maximises: ``E_pi[r] - beta KL(pi || pi_ref)``."""
    return expected_reward(logprobs, rewards) - beta * kl_divergence(logprobs, ref_logprobs)
