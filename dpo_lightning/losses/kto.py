"""KTO: prospect-theoretic optimisation on unpaired desirable / undesirable completions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..contract import BatchLayout
from .base import LossOutput, PreferenceLoss, SequenceLogProbs, check_positive


def estimate_kl(policy_kl: Tensor, reference_kl: Tensor) -> Tensor:
    """``z_ref``: detached mean of ``log pi - log pi_ref`` over mismatched pairs, averaged
    across DDP ranks, clamped at 0. Inputs ``(B,)``; returns a scalar."""
    values = (policy_kl - reference_kl).detach()
    count = torch.tensor(float(values.numel()), dtype=values.dtype, device=values.device)
    total = torch.stack([values.sum(), count])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).clamp(min=0)


class KTOLoss(PreferenceLoss):
    r"""KTO (Ethayarajh et al., 2024, arXiv 2402.01306), eq. 8, on unpaired rows.

    With ``h = log pi(y|x) - log pi_ref(y|x)`` (summed over completion tokens) and the
    reference point ``z_ref`` = detached, rank-averaged, clamped-at-0 estimate of
    ``KL(pi || pi_ref)`` from mismatched prompt/completion pairs in the batch::

        desirable   y:  w_d * (1 - sigmoid(beta * (h - z_ref)))
        undesirable y:  w_u * (1 - sigmoid(beta * (z_ref - h)))
        L = mean over the batch's rows

    Batch layout (from :class:`~dpo_lightning.data.UnpairedDataModule`): rows ``[0, B)`` of the
    log-probs are the labelled completions, rows ``[B, 2B)`` the mismatched pairs; the batch holds
    ``label`` ``(B,)`` bool. A batch that is all desirable or all undesirable is fine.

    Args:
        beta: > 0, default 0.1.
        desirable_weight: ``w_d`` > 0, default 1.0.
        undesirable_weight: ``w_u`` > 0, default 1.0. The paper advises
            ``w_d * n_d / (w_u * n_u)`` in [1, 4/3].
    """

    batch_layout = BatchLayout.UNPAIRED_WITH_KL

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.desirable_weight = check_positive("desirable_weight", desirable_weight)
        self.undesirable_weight = check_positive("undesirable_weight", undesirable_weight)

    def communicates(self) -> bool:
        """``z_ref`` is all-reduced over the processes."""
        return True

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        if reference is None:
            raise ValueError("KTOLoss needs reference log-probs")
        if "label" not in batch:
            raise KeyError("KTOLoss needs the batch column 'label'; use UnpairedDataModule")
        h = policy.chosen - reference.chosen  # first half: labelled completions
        z_ref = estimate_kl(policy.rejected, reference.rejected)  # second half: mismatched pairs
        label = batch["label"].bool()
        desirable = self.desirable_weight * (1 - torch.sigmoid(self.beta * (h - z_ref)))
        undesirable = self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z_ref - h)))
        losses = torch.where(label, desirable, undesirable)
        rewards = (self.beta * h).detach()
        return LossOutput(
            losses.mean(),
            rewards[label],
            rewards[~label],
            {"kl": z_ref.detach()},
            chosen_logps=policy.chosen[label].detach(),
            rejected_logps=policy.chosen[~label].detach(),
        )
