"""CPO: contrastive preference optimisation, reference-free, with an NLL term on the chosen response."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F

from .base import LossOutput, PreferenceLoss, SequenceLogProbs, check_nonnegative, check_positive, check_range


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

    Args:
        beta: > 0, default 0.1 (TRL's).
        label_smoothing: ``eps`` in [0, 0.5). Default 0 (the paper's loss).
        alpha: NLL weight >= 0. Default 1.0 (the paper's, TRL's ``cpo_alpha``).

    Shapes: ``policy`` holds ``(2B,)`` sums and counts (``reference`` is ``None``); ``per_pair``
    and the rewards logged, ``beta * log pi(y|x)`` (detached), are ``(B,)``; the metric ``nll``
    is the batch's token-mean NLL (a scalar).
    """

    needs_reference = False

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, alpha: float = 1.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 0.5)
        self.alpha = check_nonnegative("alpha", alpha)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        chosen, rejected = policy.chosen, policy.rejected
        b = chosen.shape[0]
        logits = self.beta * (chosen - rejected)
        eps = self.label_smoothing
        preference = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        tokens = policy.counts[:b].sum().clamp(min=1).to(chosen.dtype)
        nll_share = -chosen * (b / tokens)  # mean over pairs = token-mean NLL of the batch
        per_pair = preference + self.alpha * nll_share
        metrics = {"nll": nll_share.mean().detach(), "preference_loss": preference.detach()}
        return LossOutput(
            per_pair.mean(), (self.beta * chosen).detach(), (self.beta * rejected).detach(), metrics, per_pair=per_pair
        )
