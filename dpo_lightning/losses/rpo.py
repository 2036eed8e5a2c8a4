"""RPO: add a weighted NLL term on the chosen response to any pairwise loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import LossOutput, PreferenceLoss, SequenceLogProbs, check_nonnegative


class WithChosenNLL(PreferenceLoss):
    r"""Wrap a pairwise loss and add ``weight * NLL(y_w)`` (RPO, Pang et al. 2024,
    arXiv 2404.19733; Liu et al. 2024, arXiv 2405.16436)::

        L = L_inner + weight * ( -mean log pi(y_w|x) )

    ``mean`` is over the chosen response's completion tokens. The wrapper needs whatever the
    inner loss needs (reference, scores). In YAML::

        loss:
          class_path: dpo_lightning.losses.WithChosenNLL
          init_args:
            weight: 1.0
            loss: {class_path: dpo_lightning.losses.DPOLoss, init_args: {beta: 0.1}}

    Args:
        loss: the pairwise loss to wrap.
        weight: NLL weight >= 0. Default 1.0 (the RPO paper's alpha).
    """

    def __init__(self, loss: PreferenceLoss, weight: float = 1.0) -> None:
        super().__init__()
        if not loss.pairwise:
            raise ValueError("model.init_args.loss.init_args.loss must be a pairwise loss; NLL on y_w needs pairs")
        self.inner = loss
        self.weight = check_nonnegative("weight", weight)
        self.needs_reference = loss.needs_reference  # type: ignore[misc]
        self.score_columns = loss.score_columns  # type: ignore[misc]
        self.needs_token_logprobs = loss.needs_token_logprobs  # type: ignore[misc]

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        out = self.inner(policy, reference, batch)
        nll = -policy.chosen_means
        metrics = {**out.metrics, "nll": nll.detach()}
        return LossOutput(out.loss + self.weight * nll.mean(), out.chosen_rewards, out.rejected_rewards, metrics)
