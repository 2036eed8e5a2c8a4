"""DPOP (DPO-Positive, Smaug): DPO with a penalty for lowering the chosen response's likelihood."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F

from .base import (
    LossOutput,
    PreferenceLoss,
    SequenceLogProbs,
    check_nonnegative,
    check_positive,
    implicit_rewards,
    log_ratio_margin,
)


class DPOPLoss(PreferenceLoss):
    r"""DPO-Positive (Pal et al., 2024, "Smaug", arXiv 2402.13228). Not in TRL 1.16's ``DPOTrainer``.

    With ``d`` DPO's log-ratio margin (log-probs summed over completion tokens)::

        L = -log sigmoid(beta * (d - lam * max(0, log pi_ref(y_w|x) - log pi(y_w|x))))

    The penalty is zero while the policy keeps the chosen response at least as likely as the
    reference does, and grows (with slope ``beta * lam``) once it falls below: DPO can raise
    the margin while lowering both likelihoods, DPOP cannot do so for free. ``lam = 0`` is DPO
    exactly. The penalty acts on one log-ratio, not on a difference, so no f-divergence.

    Args:
        beta: > 0, default 0.1.
        lam: penalty weight ``lambda`` >= 0. Default 50 (the paper's value).

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums; ``per_pair``, the implicit rewards
    ``beta * (log pi - log pi_ref)`` (detached) and the ``dpop_penalty`` metric
    ``max(0, log pi_ref(y_w) - log pi(y_w))`` are ``(B,)``.
    """

    def __init__(self, beta: float = 0.1, lam: float = 50.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.lam = check_nonnegative("lam", lam)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        if reference is None:
            raise ValueError("DPOPLoss needs reference log-probs")
        margin = log_ratio_margin(policy, reference)
        penalty = F.relu(reference.chosen - policy.chosen)
        losses = -F.logsigmoid(self.beta * (margin - self.lam * penalty))
        chosen, rejected = implicit_rewards(self.beta, policy, reference)
        return LossOutput(losses.mean(), chosen, rejected, {"dpop_penalty": penalty.detach()}, per_pair=losses)
