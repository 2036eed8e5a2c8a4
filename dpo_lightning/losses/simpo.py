"""SimPO: reference-free, length-normalised preference optimisation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F

from .base import LossOutput, PreferenceLoss, SequenceLogProbs, check_nonnegative, check_positive


class SimPOLoss(PreferenceLoss):
    r"""SimPO (Meng et al., 2024, arXiv 2405.14734), eq. 6. No reference model::

        L = -log sigmoid(beta * mean log pi(y_w|x) - beta * mean log pi(y_l|x) - gamma)

    ``mean`` averages over completion tokens. The rewards logged are ``beta * mean log pi``.

    Args:
        beta: reward scale > 0. Default 2.0 (paper: 2.0 to 2.5).
        gamma: target reward margin >= 0. Default 1.0 (paper: 0.5 to 1.5).
    """

    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 1.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.gamma = check_nonnegative("gamma", gamma)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        chosen = self.beta * policy.chosen_means
        rejected = self.beta * policy.rejected_means
        losses = -F.logsigmoid(chosen - rejected - self.gamma)
        return LossOutput(losses.mean(), chosen.detach(), rejected.detach(), per_pair=losses)
