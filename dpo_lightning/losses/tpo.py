"""TPO: triple preference optimisation, a pair and a gold completion, reference-free."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from ..contract import BatchLayout
from .base import (
    LossOutput,
    PreferenceLoss,
    SequenceLogProbs,
    check_nonnegative,
    check_positive,
    check_range,
    smoothed_sigmoid_loss,
)


class TPOLoss(PreferenceLoss):
    r"""TPO (Saeidi et al., 2024, arXiv 2405.16681); TRL's experimental ``TPOTrainer`` with
    ``loss_type="sigmoid"``. No reference model: each row holds a prompt ``x``, a preferred
    ``y_w``, a dispreferred ``y_l`` and a gold ``y_ref`` (the best known completion, trained on
    as in SFT)::

        L = 1/B sum_i [-(1 - eps) log sigmoid(beta m_i) - eps log sigmoid(-beta m_i)] + alpha * NLL(y_ref)
        m_i = log pi(y_w,i|x_i) - log pi(y_l,i|x_i)          (summed over completion tokens)
        NLL(y_ref) = -(sum_i log pi(y_ref,i|x_i)) / (sum_i |y_ref,i|)

    the NLL a token mean over the batch's gold completion tokens, as TRL's
    ``F.cross_entropy(ref_logits[ref_mask], ref_labels[ref_mask])``. ``per_pair`` splits it over
    the triples: ``pref_i + alpha * (-log pi(y_ref,i|x_i)) * B / sum_j |y_ref,j|`` (mean: the loss).

    Batch layout ``TRIPLES`` (:class:`~dpo_lightning.data.TripleDataModule`): ``(3B,)`` log-probs,
    chosen then rejected then gold. The rewards logged are ``beta * log pi`` of the chosen and
    rejected responses (TRL's), with reward accuracy and margins; ``nll`` and
    ``preference_loss`` as metrics.

    Args:
        beta: > 0, default 0.01 (TRL's).
        label_smoothing: ``eps`` in [0, 0.5). Default 0.
        alpha: weight of the gold NLL >= 0, default 1.0 (TRL's ``tpo_alpha``).
    """

    needs_reference = False
    batch_layout = BatchLayout.TRIPLES
    #: ``m`` on per-token mean log-probs (TPO-L)
    length_normalized: ClassVar[bool] = False

    def __init__(self, beta: float = 0.01, label_smoothing: float = 0.0, alpha: float = 1.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 0.5)
        self.alpha = check_nonnegative("alpha", alpha)

    def preference(self, margin: Tensor) -> Tensor:
        """``(B,)`` preference term from ``m`` ``(B,)``: cDPO-smoothed ``-log sigmoid(beta m)``."""
        return smoothed_sigmoid_loss(self.beta * margin, self.label_smoothing)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        n = policy.sums.shape[0]
        if n % 3:
            raise ValueError(
                f"{type(self).__name__} expects the 'triples' layout, 3B log-probs (chosen, rejected, gold), got {n}; "
                "use data.class_path: dpo_lightning.data.TripleDataModule"
            )
        b = n // 3
        scored = policy.means if self.length_normalized else policy.sums
        chosen, rejected = scored[:b], scored[b : 2 * b]
        preference = self.preference(chosen - rejected)
        gold = policy.sums[2 * b :]
        tokens = policy.counts[2 * b :].sum().clamp(min=1).to(gold.dtype)
        nll_share = -gold * (b / tokens)  # mean over triples = token-mean NLL of the gold completions
        per_pair = preference + self.alpha * nll_share
        metrics = {"nll": nll_share.mean().detach(), "preference_loss": preference.detach()}
        return LossOutput(
            per_pair.mean(), (self.beta * chosen).detach(), (self.beta * rejected).detach(), metrics,
            chosen_logps=policy.sums[:b].detach(), rejected_logps=policy.sums[b : 2 * b].detach(), per_pair=per_pair,
            token_part=self.alpha * nll_share.mean(), tokens=tokens.detach(),  # the NLL: a mean over gold tokens
        )


class TPOLLoss(TPOLoss):
    r"""TPO-L (arXiv 2405.16681, the length-normalised variant); TRL's ``TPOTrainer`` with
    ``loss_type="tpo-l"``: :class:`TPOLoss` on per-token mean log-probs with a target margin::

        L = 1/B sum_i [-(1 - eps) log sigmoid(z_i) - eps log sigmoid(-z_i)] + alpha * NLL(y_ref)
        z_i = beta * (mean log pi(y_w,i|x_i) - mean log pi(y_l,i|x_i)) - gamma

    (TRL: ``delta_score - tpo_l_gamma / beta`` inside ``beta * (...)``). The rewards logged are
    ``beta * mean log pi``.

    Args:
        beta: > 0, default 0.01 (TRL's).
        gamma: target margin >= 0, default 0.5 (TRL's ``tpo_l_gamma``).
        label_smoothing, alpha: as in :class:`TPOLoss`.
    """

    length_normalized = True

    def __init__(self, beta: float = 0.01, gamma: float = 0.5, label_smoothing: float = 0.0, alpha: float = 1.0) -> None:
        super().__init__(beta, label_smoothing, alpha)
        self.gamma = check_nonnegative("gamma", gamma)

    def preference(self, margin: Tensor) -> Tensor:
        return smoothed_sigmoid_loss(self.beta * margin - self.gamma, self.label_smoothing)


__all__ = ["TPOLLoss", "TPOLoss"]
