"""EXO: efficient exact optimisation of the reverse KL to a smoothed preference distribution."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .base import (
    LOSS_KEY,
    FDivergence,
    LossOutput,
    PreferenceLoss,
    SequenceLogProbs,
    check_divergence,
    check_positive,
    implicit_rewards,
    log_ratio_margin,
)


class EXOLoss(PreferenceLoss):
    r"""EXO-pref (Ji et al., 2024, arXiv 2402.00856), eq. 16 with K = 2; TRL's ``loss_type="exo_pair"``.

    EXO minimises the reverse KL ``KL(p_theta || p_rh)`` between two distributions over the pair
    ``{y_w, y_l}``: the policy's ``p_theta = softmax(beta * log pi/pi_ref)`` and the labels'
    ``p_rh = (1 - eps, eps)``. With ``d`` DPO's log-ratio margin and ``z = beta * d``::

        p_theta(y_w) = sigmoid(z),    p_theta(y_l) = sigmoid(-z)
        L = sigmoid(z) * [log sigmoid(z) - log(1 - eps)] + sigmoid(-z) * [log sigmoid(-z) - log eps]

    The minimum is at ``z = log((1 - eps) / eps)`` (6.9 for ``eps = 1e-3``) where ``L = 0``;
    ``dL/dz = sigmoid(z) sigmoid(-z) (z - log((1 - eps) / eps))``. ``eps = 0`` would make
    ``log eps = -inf`` (EXO then has no finite minimiser) and is refused, as TRL refuses it.

    The paper writes the policy's temperature ``beta_pi`` and the label distribution as
    ``softmax(beta_r r)`` of a reward model; with pairwise labels TRL (and this class) use
    ``beta_pi = beta`` and the hard, smoothed ``(1 - eps, eps)``.

    f-DPO (arXiv 2309.16240): ``divergence`` replaces ``d`` by ``f'(u_w) - f'(u_l)`` as in
    :class:`~dpo_lightning.losses.DPOLoss` (TRL's ``f_divergence_type``).

    Args:
        beta: > 0, default 0.1.
        label_smoothing: ``eps`` in (0, 0.5). Default 1e-3 (the paper's and TRL's recommendation).
        divergence / divergence_alpha: as in :class:`~dpo_lightning.losses.DPOLoss`.

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums; ``per_pair`` and the implicit rewards
    ``beta * (log pi - log pi_ref)`` (detached) are ``(B,)``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 1e-3,
        divergence: FDivergence = "reverse_kl",
        divergence_alpha: float = 0.5,
    ) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        if not (0 < label_smoothing < 0.5 and math.isfinite(label_smoothing)):
            raise ValueError(
                f"{LOSS_KEY}.label_smoothing must be in (0, 0.5) for EXOLoss (it takes log eps; the paper "
                f"recommends 1e-3), got {label_smoothing}"
            )
        self.label_smoothing = float(label_smoothing)
        self.divergence, self.divergence_alpha = check_divergence(divergence, divergence_alpha)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        z = self.beta * log_ratio_margin(policy, reference, self.divergence, self.divergence_alpha)
        eps = self.label_smoothing
        losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )
        chosen, rejected = implicit_rewards(self.beta, policy, reference)
        return LossOutput(losses.mean(), chosen, rejected, per_pair=losses)
