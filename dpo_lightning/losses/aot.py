"""AOT: alignment via optimal transport (distributional preference alignment), paired and unpaired."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import (
    LossOutput,
    PreferenceLoss,
    SequenceLogProbs,
    check_positive,
    check_range,
    implicit_rewards,
    smoothed_sigmoid_loss,
)


class _SortedLogistic(PreferenceLoss):
    """Shared arguments and the smoothed logistic of the two AOT losses."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 0.5)

    def sorted_deltas(self, policy: SequenceLogProbs, reference: SequenceLogProbs) -> Tensor:
        """``(B,)`` differences of the two sorted quantile vectors."""
        raise NotImplementedError

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        if reference is None:
            raise ValueError(f"{type(self).__name__} needs reference log-probs")
        z = self.beta * self.sorted_deltas(policy, reference)
        losses = smoothed_sigmoid_loss(z, self.label_smoothing)
        chosen, rejected = implicit_rewards(self.beta, policy, reference)
        # The k-th term pairs the k-th smallest values of two separately sorted vectors: it is not
        # the loss of pair k, so there is no per-pair loss to weight.
        return LossOutput(losses.mean(), chosen, rejected, per_pair=None)


class AOTLoss(_SortedLogistic):
    r"""Paired AOT (Melnyk et al., 2024, arXiv 2406.05882); TRL's ``loss_type="aot"``.

    AOT asks for first-order stochastic dominance of one distribution over another, measured on
    the batch: in one dimension the optimal-transport plan between two empirical distributions
    of equal size matches their order statistics, so the violation of dominance is a loss on
    the *sorted* samples. Paired AOT, as TRL computes it (and this class), asks the
    distribution of the policy's per-pair log-likelihood margins to dominate that of the
    reference's margins. With ``m = log pi(y_w|x) - log pi(y_l|x)`` and
    ``m_ref = log pi_ref(y_w|x) - log pi_ref(y_l|x)`` (summed over completion tokens), sorted
    ascending *separately* over the batch (``m_(k)``, ``m_ref_(k)``)::

        L = 1/B * sum_k h(beta * (m_(k) - m_ref_(k)))
        h(z) = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)

    ``h`` is the paper's smooth (logistic) relaxation of the dominance violation, smoothed as
    cDPO. With ``B = 1`` the sort is the identity and ``L`` is DPO with label smoothing ``eps``.
    The gradient reaches each pair through the sort (a permutation).

    ``per_pair`` is ``None``: the k-th term compares the k-th smallest policy margin with the
    k-th smallest reference margin, which in general come from different pairs, so sorting
    breaks the alignment between terms and pairs and the loss cannot be split into per-pair
    losses (a wrapper that weights pairs, such as WPO, cannot use it; TRL refuses WPO
    weighting with AOT for the same reason). It takes no f-divergence (TRL accepts none for
    it). Each term depends on which pairs share the batch.

    Args:
        beta: > 0, default 0.1.
        label_smoothing: ``eps`` in [0, 0.5). Default 0.

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums; the implicit rewards logged are
    ``beta * (log pi - log pi_ref)`` per pair, ``(B,)`` each, detached.
    """

    def sorted_deltas(self, policy: SequenceLogProbs, reference: SequenceLogProbs) -> Tensor:
        margins, _ = torch.sort(policy.chosen - policy.rejected)
        ref_margins, _ = torch.sort(reference.chosen - reference.rejected)
        return margins - ref_margins


class AOTUnpairedLoss(_SortedLogistic):
    r"""Unpaired AOT (Melnyk et al., 2024, arXiv 2406.05882); TRL's ``loss_type="aot_unpaired"``.

    The distribution of chosen log-ratios ``u_w = log pi(y_w|x) - log pi_ref(y_w|x)`` should
    dominate that of rejected log-ratios ``u_l`` (summed over completion tokens); the pairing
    of the data is not used. Sorting each ascending *separately* over the batch::

        L = 1/B * sum_k h(beta * (u_w_(k) - u_l_(k)))
        h(z) = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)

    With ``B = 1`` this is DPO with label smoothing ``eps``. ``per_pair`` is ``None``: the k-th
    term compares the k-th smallest chosen log-ratio with the k-th smallest rejected one, which
    in general belong to different pairs, so sorting breaks the pair alignment. No f-divergence.
    The chosen and rejected sides must hold the same number of rows (a paired batch).

    Args:
        beta: > 0, default 0.1.
        label_smoothing: ``eps`` in [0, 0.5). Default 0.

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums; the implicit rewards logged are
    ``beta * (log pi - log pi_ref)``, ``(B,)`` each, detached.
    """

    def sorted_deltas(self, policy: SequenceLogProbs, reference: SequenceLogProbs) -> Tensor:
        chosen, _ = torch.sort(policy.chosen - reference.chosen)
        rejected, _ = torch.sort(policy.rejected - reference.rejected)
        return chosen - rejected
