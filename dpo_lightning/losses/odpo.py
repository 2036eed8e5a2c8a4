"""ODPO: DPO with an offset that grows with how much better the chosen response is."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from .base import (
    FDivergence,
    LossOutput,
    PreferenceLoss,
    SequenceLogProbs,
    check_divergence,
    check_nonnegative,
    check_positive,
    implicit_rewards,
    log_ratio_margin,
)

OffsetFn = Callable[[Tensor], Tensor]


class ODPOLoss(PreferenceLoss):
    r"""DPO with an offset (Amini et al., 2024, arXiv 2402.10571), eq. 9::

        L = -log sigmoid(beta * d - Delta),    Delta = alpha * f(s_w - s_l)

    ``d`` is DPO's log-ratio margin; ``s_w``, ``s_l`` are scores of the chosen and rejected
    responses, read from the batch columns ``score_chosen`` / ``score_rejected`` (from the
    dataset, or written by ``dpo-lightning-score`` with a trained reward model).

    The offset takes one of three forms (``offset_fn``):

    * ``"log"`` (default, the paper's eq. 9): ``alpha * log(s_w - s_l)``. ``log`` is undefined for
      ``s_w - s_l <= 0``: the difference is clamped at ``min_score_diff`` first, so a tie or an
      inverted pair gets the most negative offset ``alpha * log(min_score_diff)`` (a bonus, never NaN).
    * ``"log_ratio"`` (the paper's other form, used in its code for positive scores such as
      sentiment probabilities): ``alpha * log(s_w / s_l)``, computed as
      ``log(max(s_w, m)) - log(max(s_l, m))`` with ``m = min_score_diff``: defined for any
      scores, never NaN; an inverted pair gets a negative offset.
    * ``"identity"``: ``alpha * (s_w - s_l)``; or any callable on the ``(B,)`` difference.

    With ``alpha = 0`` the loss is DPO.

    Args:
        beta: > 0, default 0.1.
        alpha: offset scale >= 0, default 1.0 (paper sweeps 0.0 to 1.0 or more).
        offset_fn: ``"log"``, ``"log_ratio"``, ``"identity"`` or a callable. Default ``"log"``.
        min_score_diff: floor applied before ``log`` (to ``s_w - s_l``, or to each score for
            ``"log_ratio"``), > 0. Default 1e-3.
        divergence / divergence_alpha: f-DPO's regulariser on ``d``, as in
            :class:`~dpo_lightning.losses.DPOLoss`. Default reverse KL.
    """

    score_columns = ("score_chosen", "score_rejected")

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 1.0,
        offset_fn: Literal["log", "log_ratio", "identity"] | OffsetFn = "log",
        min_score_diff: float = 1e-3,
        divergence: FDivergence = "reverse_kl",
        divergence_alpha: float = 0.5,
    ) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.alpha = check_nonnegative("alpha", alpha)
        self.min_score_diff = check_positive("min_score_diff", min_score_diff)
        if offset_fn not in ("log", "log_ratio", "identity") and not callable(offset_fn):
            raise ValueError(
                "model.init_args.loss.init_args.offset_fn must be 'log', 'log_ratio', 'identity' or a callable, "
                f"got {offset_fn!r}"
            )
        self.offset_fn = offset_fn
        self.divergence, self.divergence_alpha = check_divergence(divergence, divergence_alpha)

    def offset(self, score_chosen: Tensor, score_rejected: Tensor) -> Tensor:
        """``Delta``, ``(B,)``: ``alpha * f(s_w - s_l)``, or ``alpha * log(s_w / s_l)`` for ``"log_ratio"``."""
        if self.offset_fn == "log_ratio":
            floor = self.min_score_diff
            return self.alpha * (torch.log(score_chosen.clamp(min=floor)) - torch.log(score_rejected.clamp(min=floor)))
        diff = score_chosen - score_rejected
        if self.offset_fn == "log":
            return self.alpha * torch.log(diff.clamp(min=self.min_score_diff))
        if self.offset_fn == "identity":
            return self.alpha * diff
        return self.alpha * self.offset_fn(diff)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        for column in self.score_columns:
            if column not in batch:
                raise KeyError(f"ODPOLoss needs the batch column {column!r}; add scores to the dataset")
        margin = log_ratio_margin(policy, reference, self.divergence, self.divergence_alpha)
        delta = self.offset(batch["score_chosen"], batch["score_rejected"]).to(margin.dtype)
        losses = -torch.nn.functional.logsigmoid(self.beta * margin - delta)
        chosen, rejected = implicit_rewards(self.beta, policy, reference)
        return LossOutput(losses.mean(), chosen, rejected, {"offset": delta.detach()}, per_pair=losses)


