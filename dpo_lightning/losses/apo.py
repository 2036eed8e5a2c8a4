"""APO: anchored preference optimisation (APO-zero, APO-down; APO-zero on unpaired rows)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..contract import BatchLayout
from .base import LossOutput, PreferenceLoss, SequenceLogProbs, check_positive, labelled_rows, policy_rewards


class _Anchored(PreferenceLoss):
    """Shared argument of the APO losses and the rewards ``r = beta * log(pi / pi_ref)`` they act on."""

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)

    def rewards(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None) -> tuple[Tensor, Tensor]:
        """``(r_w, r_l)``, each ``(B,)``, carrying the graph."""
        if reference is None:
            raise ValueError(f"{type(self).__name__} needs reference log-probs")
        return policy_rewards(self.beta, policy, reference)


class APOZeroLoss(_Anchored):
    r"""APO-zero (D'Oosterlinck et al., 2024, arXiv 2408.06266), eq. 7; TRL's ``loss_type="apo_zero"``.

    With ``r_w = beta * [log pi(y_w|x) - log pi_ref(y_w|x)]`` and ``r_l`` likewise (summed over
    completion tokens), the paper's loss is ``-sigmoid(r_w) + sigmoid(r_l)``. TRL, and this
    class, add the constant 1 (so the loss lies in ``(0, 2)``; gradients are the paper's)::

        L = [1 - sigmoid(r_w)] + sigmoid(r_l)

    Anchored to the reference: raises the chosen likelihood and lowers the rejected one, each
    in absolute terms. Use it when the chosen responses are better than the model's own outputs.
    No f-divergence (the loss acts on each reward, not on their difference).

    Args:
        beta: > 0, default 0.1.

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums; ``per_pair`` and the implicit rewards
    ``r_w``, ``r_l`` (detached) are ``(B,)``.
    """

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        r_w, r_l = self.rewards(policy, reference)
        losses = (1 - torch.sigmoid(r_w)) + torch.sigmoid(r_l)
        return LossOutput(losses.mean(), r_w.detach(), r_l.detach(), per_pair=losses)


class APODownLoss(_Anchored):
    r"""APO-down (D'Oosterlinck et al., 2024, arXiv 2408.06266), eq. 8; TRL's ``loss_type="apo_down"``.

    With ``r_w``, ``r_l`` as in :class:`APOZeroLoss`, the paper's loss is
    ``sigmoid(r_w) - sigmoid(r_w - r_l)``. TRL, and this class, add the constant 1 (loss in
    ``(0, 2)``; gradients are the paper's)::

        L = sigmoid(r_w) + [1 - sigmoid(r_w - r_l)]

    Lowers the chosen likelihood and the rejected one more. Use it when the chosen responses are
    worse than the model's own outputs (the pair still says which of the two is better).

    Args:
        beta: > 0, default 0.1.

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums; ``per_pair`` and the implicit rewards
    ``r_w``, ``r_l`` (detached) are ``(B,)``.
    """

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        r_w, r_l = self.rewards(policy, reference)
        losses = torch.sigmoid(r_w) + (1 - torch.sigmoid(r_w - r_l))
        return LossOutput(losses.mean(), r_w.detach(), r_l.detach(), per_pair=losses)


class APOZeroUnpairedLoss(PreferenceLoss):
    r"""APO-zero on unpaired rows (D'Oosterlinck et al., 2024, arXiv 2408.06266, eq. 7 split by
    label); TRL's ``KTOTrainer`` with ``loss_type="apo_zero_unpaired"``.

    With ``r = beta * [log pi(y|x) - log pi_ref(y|x)]`` (summed over completion tokens)::

        desirable   y:  w_d * (1 - sigmoid(r))
        undesirable y:  w_u * sigmoid(r)
        L = mean over the batch's rows

    Each term is :class:`APOZeroLoss`'s chosen or rejected half (with TRL's + 1 on the desirable
    side): raise desirable likelihoods and lower undesirable ones, each against the reference.
    Unlike KTO there is no KL reference point, so the batch has no mismatched KL rows (TRL sets
    ``calculate_KL = False`` for this loss type): batch layout ``UNPAIRED``, from
    :class:`~dpo_lightning.data.UnpairedDataModule`, which also unpairs paired data. A batch that
    is all desirable or all undesirable is fine.

    Args:
        beta: > 0, default 0.1.
        desirable_weight: ``w_d`` > 0, default 1.0.
        undesirable_weight: ``w_u`` > 0, default 1.0.

    Shapes: ``policy``/``reference`` hold ``(B,)`` sums, one per labelled row; the batch holds
    ``label`` ``(B,)`` bool. Returns the rewards ``r`` (detached) of the desirable rows as
    ``chosen_rewards`` ``(n_d,)`` and of the undesirable ones as ``rejected_rewards`` ``(n_u,)``,
    with the matching policy log-probs.
    """

    batch_layout = BatchLayout.UNPAIRED

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.desirable_weight = check_positive("desirable_weight", desirable_weight)
        self.undesirable_weight = check_positive("undesirable_weight", undesirable_weight)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        label = labelled_rows("APOZeroUnpairedLoss", policy, reference, batch)
        rewards = self.beta * (policy.sums - reference.sums)
        desirable = self.desirable_weight * (1 - torch.sigmoid(rewards))
        undesirable = self.undesirable_weight * torch.sigmoid(rewards)
        losses = torch.where(label, desirable, undesirable)
        detached = rewards.detach()
        return LossOutput(
            losses.mean(),
            detached[label],
            detached[~label],
            chosen_logps=policy.sums[label].detach(),
            rejected_logps=policy.sums[~label].detach(),
        )


__all__ = ["APODownLoss", "APOZeroLoss", "APOZeroUnpairedLoss"]
