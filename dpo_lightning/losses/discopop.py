"""DiscoPOP: the log-ratio modulated loss found by LLM-driven objective discovery."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .base import (
    FDivergence,
    LossOutput,
    PreferenceLoss,
    SequenceLogProbs,
    check_divergence,
    check_positive,
    implicit_rewards,
    log_ratio_margin,
)

#: Largest exponent of the exponential term (as base.divergence_scores: exp(80) is finite in float32).
_MAX_EXPONENT = 80.0


class DiscoPOPLoss(PreferenceLoss):
    r"""DiscoPOP / LRML (Lu et al., 2024, arXiv 2406.08414); TRL's ``loss_type="discopop"``.

    The log-ratio modulated loss blends DPO's logistic loss with an exponential loss, weighted
    by a sigmoid of the scaled margin. With ``rho = beta * d`` (``d`` DPO's log-ratio margin)::

        L = (1 - sigmoid(rho / tau)) * (-log sigmoid(rho)) + sigmoid(rho / tau) * exp(-rho)

    (TRL's comment cites the paper's eq. 5.) For ``rho << 0`` the logistic term dominates, for
    ``rho >> 0`` the exponential one. The product ``sigmoid(rho / tau) * exp(-rho)`` is
    computed as ``exp(log sigmoid(rho / tau) - rho)`` so that a very negative ``rho`` gives
    ``0``, not ``0 * inf = NaN``; the exponent is clamped at 80 (only reachable with ``tau > 1``,
    where the term genuinely grows without bound). Elsewhere the value is TRL's.

    f-DPO (arXiv 2309.16240): ``divergence`` replaces ``d`` by ``f'(u_w) - f'(u_l)`` as in
    :class:`~dpo_lightning.losses.DPOLoss` (TRL's ``f_divergence_type``).

    Args:
        beta: > 0, default 0.1.
        tau: temperature of the modulation, > 0. Default 0.05 (the paper's and TRL's).
        divergence / divergence_alpha: as in :class:`~dpo_lightning.losses.DPOLoss`.

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums; ``per_pair`` and the implicit rewards
    ``beta * (log pi - log pi_ref)`` (detached) are ``(B,)``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        tau: float = 0.05,
        divergence: FDivergence = "reverse_kl",
        divergence_alpha: float = 0.5,
    ) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.tau = check_positive("tau", tau)
        self.divergence, self.divergence_alpha = check_divergence(divergence, divergence_alpha)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        rho = self.beta * log_ratio_margin(policy, reference, self.divergence, self.divergence_alpha)
        modulation = torch.sigmoid(rho / self.tau)
        logistic = -F.logsigmoid(rho)
        exponential = torch.exp((F.logsigmoid(rho / self.tau) - rho).clamp(max=_MAX_EXPONENT))
        losses = logistic * (1 - modulation) + exponential
        chosen, rejected = implicit_rewards(self.beta, policy, reference)
        return LossOutput(losses.mean(), chosen, rejected, per_pair=losses)
