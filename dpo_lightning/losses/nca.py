"""NCA: noise-contrastive alignment, pairwise form."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F

from .base import LossOutput, PreferenceLoss, SequenceLogProbs, check_positive, policy_rewards


class NCALoss(PreferenceLoss):
    r"""NCA (Chen et al., 2024, arXiv 2402.05369) for pairwise preferences; TRL's ``loss_type="nca_pair"``.

    With the implicit rewards ``r_w = beta * [log pi(y_w|x) - log pi_ref(y_w|x)]`` and ``r_l``
    likewise (log-probs summed over completion tokens)::

        L = -log sigmoid(r_w) - 1/2 * [log sigmoid(-r_w) + log sigmoid(-r_l)]

    This is the paper's NCA objective for K = 2 responses with a hard preference label (all
    the data-side weight on ``y_w``): the first term raises the chosen response's absolute
    reward, the second, averaged over both responses, keeps rewards from growing without bound.
    Unlike DPO it acts on each reward separately, not only on their difference, so the chosen
    response's likelihood is pushed up in absolute terms; for the same reason it takes no
    f-divergence (f-DPO's ``log Z(x)`` cancels only in a difference).

    Args:
        beta: > 0, default 0.1.

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums; ``per_pair`` and the implicit rewards
    ``r_w``, ``r_l`` (detached) are ``(B,)``.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        if reference is None:
            raise ValueError("NCALoss needs reference log-probs")
        r_w, r_l = policy_rewards(self.beta, policy, reference)
        losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
        return LossOutput(losses.mean(), r_w.detach(), r_l.detach(), per_pair=losses)
