"""CPO: contrastive preference optimisation, reference-free, with an NLL term on the chosen
response; its sigmoid (``CPOLoss``), hinge (``CPOHingeLoss``) and IPO (``CPOIPOLoss``) forms."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from .base import (
    LossOutput,
    PreferenceLoss,
    SequenceLogProbs,
    check_nonnegative,
    check_positive,
    check_range,
    smoothed_sigmoid_loss,
)


class CPOLoss(PreferenceLoss):
    r"""CPO (Xu et al., 2024, arXiv 2401.08417); TRL's ``CPOTrainer`` with ``loss_type="sigmoid"``.

    No reference model. The paper's objective is ``L = L_prefer + L_NLL`` with::

        L_prefer = -log sigmoid(beta * log pi(y_w|x) - beta * log pi(y_l|x))
        L_NLL    = -log pi(y_w|x)

    (log-probs summed over completion tokens). As TRL's CPO ``sigmoid`` loss, the preference
    term is label-smoothed as cDPO and the NLL is weighted by ``alpha`` (TRL's ``cpo_alpha``)::

        L = 1/B sum_i [-(1 - eps) log sigmoid(beta m_i) - eps log sigmoid(-beta m_i)] + alpha * NLL
        m_i = log pi(y_w,i|x_i) - log pi(y_l,i|x_i)
        NLL = -(sum_i log pi(y_w,i|x_i)) / (sum_i |y_w,i|)

    **Where TRL differs from the paper:** its NLL is ``nn.CrossEntropyLoss()`` over the chosen
    half of the batch, i.e. the mean over *all chosen completion tokens of the batch* (a token
    mean, so long responses weigh more), not the paper's per-sequence sum ``-log pi(y_w|x)``;
    this class matches TRL. ``per_pair`` splits that token mean over pairs:
    ``per_pair_i = pref_i + alpha * (-log pi(y_w,i|x_i)) * B / sum_j |y_w,j|``, whose mean is the
    loss, so a pair-weighting wrapper weights each pair's chosen tokens.

    Subclasses change the preference term (:meth:`preference`) and whether ``m`` is on per-token
    means (:attr:`length_normalized`): :class:`CPOHingeLoss`, :class:`CPOIPOLoss`. TRL's AlphaPO
    ``alpha`` on these forms is not offered (see :class:`~.simpo.AlphaPOLoss` for the SimPO form).

    Args:
        beta: > 0, default 0.1 (TRL's).
        label_smoothing: ``eps`` in [0, 0.5). Default 0 (the paper's loss).
        alpha: NLL weight >= 0. Default 1.0 (the paper's, TRL's ``cpo_alpha``).

    Shapes: ``policy`` holds ``(2B,)`` sums and counts (``reference`` is ``None``); ``per_pair``
    and the rewards logged, ``beta * log pi(y|x)`` (detached; per-token means when
    :attr:`length_normalized`), are ``(B,)``; the metric ``nll`` is the batch's token-mean NLL (a
    scalar) and ``preference_loss`` the preference term of each pair, ``(B,)``.
    """

    needs_reference = False
    #: ``m`` on per-token mean log-probs (TRL's ``average_log_prob`` for ``ipo`` and ``simpo``)
    length_normalized: ClassVar[bool] = False

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, alpha: float = 1.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 0.5)
        self.alpha = check_nonnegative("alpha", alpha)

    def preference(self, margin: Tensor) -> Tensor:
        """The preference term of each pair, ``(B,)``, from ``m = log pi(y_w) - log pi(y_l)`` ``(B,)``."""
        return smoothed_sigmoid_loss(self.beta * margin, self.label_smoothing)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        chosen, rejected = policy.chosen, policy.rejected
        b = chosen.shape[0]
        if self.length_normalized:
            scored_w, scored_l = policy.chosen_means, policy.rejected_means
        else:
            scored_w, scored_l = chosen, rejected
        preference = self.preference(scored_w - scored_l)
        tokens = policy.counts[:b].sum().clamp(min=1).to(chosen.dtype)
        nll_share = -chosen * (b / tokens)  # mean over pairs = token-mean NLL of the batch
        per_pair = preference + self.alpha * nll_share
        metrics = {"nll": nll_share.mean().detach(), "preference_loss": preference.detach()}
        return LossOutput(
            per_pair.mean(), (self.beta * scored_w).detach(), (self.beta * scored_l).detach(), metrics, per_pair=per_pair,
            token_part=self.alpha * nll_share.mean(), tokens=tokens.detach(),  # the NLL: a mean over chosen tokens
        )


class CPOHingeLoss(CPOLoss):
    r"""CPO with the hinge preference term (SLiC, Zhao et al. 2023, arXiv 2305.10425, on CPO's
    reference-free margin, arXiv 2401.08417); TRL's ``CPOTrainer`` with ``loss_type="hinge"``::

        L = 1/B sum_i max(0, 1 - beta m_i) + alpha * NLL,   m_i = log pi(y_w,i|x_i) - log pi(y_l,i|x_i)

    log-probs summed over completion tokens, ``NLL`` the token mean of :class:`CPOLoss`. No label
    smoothing (TRL ignores it for ``hinge``).

    Args:
        beta: > 0, default 0.1 (``1/beta`` is the margin in log-prob units).
        alpha: NLL weight >= 0. Default 1.0 (TRL's ``cpo_alpha``).
    """

    def __init__(self, beta: float = 0.1, alpha: float = 1.0) -> None:
        super().__init__(beta, 0.0, alpha)

    def preference(self, margin: Tensor) -> Tensor:
        return F.relu(1 - self.beta * margin)


class CPOIPOLoss(CPOLoss):
    r"""CPO with IPO's squared preference term (Azar et al. 2023, arXiv 2310.12036, eq. 17, on
    CPO's reference-free margin, arXiv 2401.08417); TRL's ``CPOTrainer`` with ``loss_type="ipo"``::

        L = 1/B sum_i (m'_i - 1/(2 beta))^2 + alpha * NLL,   m'_i = mean log pi(y_w,i|x_i) - mean log pi(y_l,i|x_i)

    ``mean`` over completion tokens (TRL's ``average_log_prob=True`` for ``ipo``), ``NLL`` the token
    mean of :class:`CPOLoss`. The rewards logged are ``beta * mean log pi``, as TRL. No label
    smoothing (TRL ignores it for ``ipo``).

    Args:
        beta: the regularisation ``tau`` > 0. Default 0.1 (target margin ``1/(2 beta) = 5``).
        alpha: NLL weight >= 0. Default 1.0 (TRL's ``cpo_alpha``).
    """

    length_normalized = True

    def __init__(self, beta: float = 0.1, alpha: float = 1.0) -> None:
        super().__init__(beta, 0.0, alpha)

    def preference(self, margin: Tensor) -> Tensor:
        return (margin - 1 / (2 * self.beta)) ** 2


__all__ = ["CPOHingeLoss", "CPOIPOLoss", "CPOLoss"]
