"""Bradley-Terry loss for training a scalar reward model on preference pairs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import BatchLayout, DataRequirements
from .base import LossOutput, check_nonnegative


class BradleyTerryLoss(nn.Module):
    r"""Pairwise reward-model loss (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022,
    arXiv 2203.02155, eq. 1; margin as in Llama 2, arXiv 2307.09288, eq. 2)::

        L = -log sigmoid(r(x, y_w) - r(x, y_l) - m) + eta * mean((r(x, y_w) + r(x, y_l))^2)

    ``m`` is the per-pair ``margin`` column when ``use_margin`` is set (0 otherwise); ``eta``
    is the reward-centering coefficient (Eisenstein et al. 2023, arXiv 2312.09244), which keeps
    rewards near zero mean. Unlike :class:`PreferenceLoss` it scores rewards, not log-probs.

    Args:
        use_margin: read ``margin`` ``(B,)`` from the batch. Default False.
        center_rewards_coefficient: ``eta`` >= 0. Default 0 (typical 0.01).

    ``forward(rewards (2B,), batch)``: rows ``[0, B)`` chosen, ``[B, 2B)`` rejected.
    """

    needs_reference: ClassVar[bool] = False

    def __init__(self, use_margin: bool = False, center_rewards_coefficient: float = 0.0) -> None:
        super().__init__()
        self.use_margin = use_margin
        self.center_rewards_coefficient = check_nonnegative("center_rewards_coefficient", center_rewards_coefficient)

    @property
    def score_columns(self) -> tuple[str, ...]:
        return ("margin",) if self.use_margin else ()

    @property
    def data_requirements(self) -> DataRequirements:
        """Pairs, with the ``margin`` column when ``use_margin`` is set."""
        return DataRequirements(BatchLayout.PAIRS, self.score_columns)

    def forward(self, rewards: Tensor, batch: Mapping[str, Any]) -> LossOutput:
        b = rewards.shape[0] // 2
        chosen, rejected = rewards[:b], rewards[b:]
        margin = batch["margin"].to(rewards.dtype) if self.use_margin else 0.0
        loss = -F.logsigmoid(chosen - rejected - margin).mean()
        if self.center_rewards_coefficient:
            loss = loss + self.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        return LossOutput(loss, chosen.detach(), rejected.detach())
