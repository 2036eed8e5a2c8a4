"""The DPO family with a reference model: sigmoid DPO / conservative DPO, robust DPO, hinge,
length-normalised DPO."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .base import (
    FDivergence,
    LossOutput,
    PreferenceLoss,
    SequenceLogProbs,
    check_divergence,
    check_positive,
    check_range,
    divergence_scores,
    implicit_rewards,
    log_ratio_margin,
    smoothed_sigmoid_loss,
)


class DPOLoss(PreferenceLoss):
    r"""Direct Preference Optimization (Rafailov et al., 2023, arXiv 2305.18290), eq. 7.

    With ``d = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]``
    (log-probs summed over completion tokens)::

        L = -(1 - eps) * log sigmoid(beta * d) - eps * log sigmoid(-beta * d)

    ``eps = 0`` is DPO; ``eps > 0`` is conservative DPO (cDPO, Mitchell 2023): labels are
    assumed flipped with probability ``eps``.

    f-DPO (Wang et al., 2023, arXiv 2309.16240): ``divergence`` replaces the reverse KL that
    DPO regularises with by another f-divergence; ``d`` becomes ``f'(u_w) - f'(u_l)``
    (:func:`~dpo_lightning.losses.base.divergence_scores`). The default ``reverse_kl`` is DPO.

    Args:
        beta: KL-penalty strength, > 0. Default 0.1; typical 0.01 to 0.5.
        label_smoothing: cDPO's ``eps`` in [0, 0.5). Default 0.
        divergence: ``reverse_kl`` (default), ``forward_kl``, ``js_divergence`` or ``alpha_divergence``.
        divergence_alpha: alpha of ``alpha_divergence``, finite and > 0 (above 1 too; see
            :func:`~dpo_lightning.losses.base.check_divergence`). Default 0.5.

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums; the rewards returned are ``(B,)``
    implicit rewards ``beta * (log pi - log pi_ref)``, detached.
    """

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        divergence: FDivergence = "reverse_kl",
        divergence_alpha: float = 0.5,
    ) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 0.5)
        self.divergence, self.divergence_alpha = check_divergence(divergence, divergence_alpha)

    def pair_losses(self, logits: Tensor) -> Tensor:
        """``(B,)`` losses from ``logits = beta * d``, ``(B,)``."""
        return smoothed_sigmoid_loss(logits, self.label_smoothing)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        margin = log_ratio_margin(policy, reference, self.divergence, self.divergence_alpha)
        losses = self.pair_losses(self.beta * margin)
        chosen, rejected = implicit_rewards(self.beta, policy, reference)
        return LossOutput(losses.mean(), chosen, rejected, per_pair=losses)


class RobustDPOLoss(DPOLoss):
    r"""Noise-robust DPO (Chowdhury et al., 2024, arXiv 2403.00409), the unbiased loss.

    With ``l(z) = -log sigmoid(z)`` and ``d`` as in :class:`DPOLoss`::

        L = [(1 - eps) * l(beta * d) - eps * l(-beta * d)] / (1 - 2 * eps)

    which is an unbiased estimate of the clean DPO loss when each label is flipped with
    probability ``eps``.

    Args:
        beta: > 0, default 0.1.
        label_smoothing: the flip rate ``eps`` in [0, 0.5). Default 0.1 (0 gives DPO).
        divergence / divergence_alpha: as in :class:`DPOLoss`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.1,
        divergence: FDivergence = "reverse_kl",
        divergence_alpha: float = 0.5,
    ) -> None:
        super().__init__(beta, label_smoothing, divergence, divergence_alpha)

    def pair_losses(self, logits: Tensor) -> Tensor:
        eps = self.label_smoothing
        return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


class HingeLoss(PreferenceLoss):
    r"""Hinge loss on the log-ratio margin (SLiC, Zhao et al. 2023, arXiv 2305.10425; RSO,
    Liu et al. 2023, arXiv 2309.06657)::

        L = max(0, 1 - beta * d)

    Args:
        beta: > 0, default 0.1 (``1/beta`` is the margin in log-ratio units).
        divergence / divergence_alpha: f-DPO's regulariser, as in :class:`DPOLoss`.
    """

    def __init__(self, beta: float = 0.1, divergence: FDivergence = "reverse_kl", divergence_alpha: float = 0.5) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.divergence, self.divergence_alpha = check_divergence(divergence, divergence_alpha)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        margin = log_ratio_margin(policy, reference, self.divergence, self.divergence_alpha)
        losses = F.relu(1 - self.beta * margin)
        chosen, rejected = implicit_rewards(self.beta, policy, reference)
        return LossOutput(losses.mean(), chosen, rejected, per_pair=losses)


class NormalizedDPOLoss(PreferenceLoss):
    r"""DPO (arXiv 2305.18290, eq. 7) on per-token MEAN log-ratios; TRL's ``loss_type="sigmoid_norm"``.

    With ``|y|`` the number of completion tokens of ``y`` and
    ``d' = [log pi(y_w|x) - log pi_ref(y_w|x)] / |y_w| - [log pi(y_l|x) - log pi_ref(y_l|x)] / |y_l|``::

        L = -log sigmoid(beta * d')

    This is the length-normalised DPO of Tülu 3 (Lambert et al., 2024, arXiv 2411.15124); the DPO
    paper itself uses sums. With an f-divergence (f-DPO, arXiv 2309.16240) each side's summed
    log-ratio ``log u`` is replaced by ``f'(u)`` *before* the division by its length, exactly as
    TRL computes ``chosen_avg_score = chosen_scores / |y_w|`` (so for ``reverse_kl`` ``d'`` is
    the difference of per-token mean log-ratios). Lengths are the policy's completion-token
    counts, clamped at 1.

    Args:
        beta: > 0, default 0.1 (TRL's). On per-token means the logit ``beta * d'`` is about
            ``1 / length`` of DPO's at the same beta.
        divergence / divergence_alpha: as in :class:`DPOLoss`.

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums and counts; ``per_pair`` is ``(B,)``.
    The rewards logged are ``beta * (log pi - log pi_ref)`` on summed log-probs (as TRL logs
    them), ``(B,)`` each, detached.
    """

    def __init__(self, beta: float = 0.1, divergence: FDivergence = "reverse_kl", divergence_alpha: float = 0.5) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.divergence, self.divergence_alpha = check_divergence(divergence, divergence_alpha)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        if reference is None:
            raise ValueError("NormalizedDPOLoss needs reference log-probs")
        h_w = divergence_scores(policy.chosen - reference.chosen, self.divergence, self.divergence_alpha)
        h_l = divergence_scores(policy.rejected - reference.rejected, self.divergence, self.divergence_alpha)
        b = h_w.shape[0]
        h_w = h_w / policy.counts[:b].clamp(min=1).to(h_w.dtype)
        h_l = h_l / policy.counts[b:].clamp(min=1).to(h_l.dtype)
        losses = -F.logsigmoid(self.beta * (h_w - h_l))
        chosen, rejected = implicit_rewards(self.beta, policy, reference)
        return LossOutput(losses.mean(), chosen, rejected, per_pair=losses)
