"""SimPO and AlphaPO: reference-free, length-normalised preference optimisation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import (
    LOSS_KEY,
    LossOutput,
    PreferenceLoss,
    SequenceLogProbs,
    check_nonnegative,
    check_positive,
    check_range,
    smoothed_sigmoid_loss,
)

#: Largest exponent AlphaPO passes to ``exp`` (exp(80) is finite in float32).
_MAX_EXPONENT = 80.0


class SimPOLoss(PreferenceLoss):
    r"""SimPO (Meng et al., 2024, arXiv 2405.14734), eq. 6. No reference model::

        L = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)
        z = beta * mean log pi(y_w|x) - beta * mean log pi(y_l|x) - gamma

    ``mean`` averages over completion tokens. ``eps = 0`` (default) is the paper's loss; ``eps >
    0`` smooths the labels as cDPO, as TRL's ``CPOTrainer`` with ``loss_type="simpo"`` and
    ``label_smoothing``. The rewards logged are ``beta * mean log pi``, ``(B,)`` each, detached
    (TRL's). TRL's SimPO also adds ``cpo_alpha`` (default 1) times the chosen responses' NLL: that
    is ``recipes/simpo_trl.yaml``, a :class:`~.mixture.MixtureLoss` of this loss and
    :class:`~.rpo.ChosenNLLLoss`.

    Args:
        beta: reward scale > 0. Default 2.0 (paper: 2.0 to 2.5).
        gamma: target reward margin >= 0. Default 1.0 (paper: 0.5 to 1.5; TRL's ``simpo_gamma``
            0.5).
        label_smoothing: ``eps`` in [0, 0.5). Default 0.

    Shapes: ``policy`` holds ``(2B,)`` sums and counts (``reference`` is ``None``); ``per_pair``
    is ``(B,)``.
    """

    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.gamma = check_nonnegative("gamma", gamma)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 0.5)

    def rewards(self, policy: SequenceLogProbs) -> tuple[Tensor, Tensor]:
        """``(r_w, r_l)``, each ``(B,)``, carrying the graph: ``beta * mean log pi(y|x)``."""
        return self.beta * policy.chosen_means, self.beta * policy.rejected_means

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        chosen, rejected = self.rewards(policy)
        logits = chosen - rejected - self.gamma
        losses = smoothed_sigmoid_loss(logits, self.label_smoothing)
        return LossOutput(losses.mean(), chosen.detach(), rejected.detach(), per_pair=losses)


class AlphaPOLoss(SimPOLoss):
    r"""AlphaPO (Gupta et al., 2025, arXiv 2501.03884): SimPO with the reward's shape set by
    ``alpha``; TRL's ``CPOTrainer`` with ``loss_type="simpo"`` and ``alpha``. No reference model.

    With ``p(y) = exp(mean log pi(y|x)) = pi(y|x)^(1/|y|)`` (the length-normalised likelihood)::

        r(y) = beta * (1 - p(y)^(-alpha)) / alpha
        L    = -(1 - eps) log sigmoid(r(y_w) - r(y_l) - gamma) - eps log sigmoid(-(...))

    ``alpha -> 0`` gives SimPO's ``r = beta * mean log pi`` (``alpha = 0`` is
    :class:`SimPOLoss` exactly); ``alpha > 0`` flattens the reward of very unlikely responses (the
    paper's range is about 0.1 to 0.25), ``alpha < 0`` steepens it. The exponent
    ``-alpha * mean log pi`` is clamped at 80 so that a very unlikely response gives a large
    finite reward, never ``inf`` (TRL does not clamp). The rewards logged are ``r``, as TRL.

    Args:
        beta, gamma, label_smoothing: as in :class:`SimPOLoss`.
        alpha: the reward shape, finite. Default 0.25.
    """

    def __init__(self, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0, alpha: float = 0.25) -> None:
        super().__init__(beta, gamma, label_smoothing)
        if not math.isfinite(alpha):
            raise ValueError(f"{LOSS_KEY}.alpha must be finite, got {alpha}; 0 is SimPO")
        self.alpha = float(alpha)

    def rewards(self, policy: SequenceLogProbs) -> tuple[Tensor, Tensor]:
        """``(r_w, r_l)``, each ``(B,)``, carrying the graph: ``beta * (1 - p^(-alpha)) / alpha``."""
        if self.alpha == 0.0:
            return super().rewards(policy)
        return self.shaped(policy.chosen_means), self.shaped(policy.rejected_means)

    def shaped(self, means: Tensor) -> Tensor:
        """``beta * (1 - exp(-alpha * means)) / alpha`` for ``(B,)`` mean log-probs."""
        return self.beta * (1 - torch.exp((-self.alpha * means).clamp(max=_MAX_EXPONENT))) / self.alpha


__all__ = ["AlphaPOLoss", "SimPOLoss"]
