"""WPO: weight each preference pair by how likely the policy is to produce it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import LOSS_KEY, LossOutput, PreferenceLoss, SequenceLogProbs


class WPOWeighted(PreferenceLoss):
    r"""WPO (Zhou et al. 2024, arXiv 2406.11827): reweight a pairwise loss's pairs so that
    off-policy pairs count less. Pair ``i`` weighs the policy's length-normalised probability
    of both its responses, detached (no gradient flows through the weight)::

        w_i = exp(mean_t log pi(y_w,t|...)) * exp(mean_t log pi(y_l,t|...))
        L   = mean_i w_i * L_inner,i

    ``L_inner,i`` is the inner loss's ``LossOutput.per_pair``; an inner loss that gives none
    (it is not a mean over pairs: AOT sorts its pairs, KTO averages rows) is refused with an
    error at its first batch. The weights are logged as ``wpo_weight`` (their mean over pairs).
    As TRL (``use_weighting``) the weighted mean is not renormalised by the weights' sum.

    Difference from TRL 1.16's ``use_weighting``: TRL uses WPO's "aligned" weight, which
    subtracts ``log sum_v pi(v|...)^2`` from every token's log-prob before the mean: each
    token's probability is divided by ``sum_v pi(v)^2 = E_{v ~ pi}[pi(v)]``, the probability
    the policy gives on average to its own samples there, which needs the whole vocabulary
    distribution at every position. This class implements the plain form above, from the
    per-sequence sums and lengths alone (no per-token values needed). Since
    ``sum_v pi(v)^2 <= 1`` its weights are never larger than TRL's (often much smaller on long
    responses), so the loss is on a lower scale than TRL's for the same pairs.

    Wrapper order: the weights are computed from the log-probs this wrapper receives, so put it
    outermost (``WPOWeighted(MixtureLoss([LengthDesensitized(DPOLoss), ChosenNLLLoss]))``): inside
    :class:`~.length.LengthDesensitized` its weights would read the length-reweighted sums, which
    TRL's weights never do; around a mixture it weights every component, the NLL term too (whose
    ``per_pair`` is its batch value on every pair), as TRL applies ``use_weighting`` to each loss type.

    Args:
        loss: the pairwise loss to reweight.
    """

    def __init__(self, loss: PreferenceLoss) -> None:
        super().__init__()
        if not loss.pairwise:
            raise ValueError(f"{LOSS_KEY}.loss must be a pairwise loss; WPO weighs (chosen, rejected) pairs")
        self.inner = loss
        self.needs_reference = loss.needs_reference  # type: ignore[misc]
        self.score_columns = loss.score_columns  # type: ignore[misc]
        self.needs_token_logprobs = loss.needs_token_logprobs  # type: ignore[misc]
        self.needs_reference_tokens = getattr(loss, "needs_reference_tokens", False)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        out = self.inner(policy, reference, batch)
        if out.per_pair is None:
            raise ValueError(
                f"WPOWeighted ({LOSS_KEY}.loss): {type(self.inner).__name__} gives no per-pair losses "
                "(LossOutput.per_pair is None: it is not a mean over pairs, e.g. AOT sorts its pairs), "
                "so its pairs cannot be weighted"
            )
        with torch.no_grad():
            weights = torch.exp(policy.chosen_means + policy.rejected_means)
        per_pair = weights * out.per_pair
        metrics = {**out.metrics, "wpo_weight": weights}
        return LossOutput(
            per_pair.mean(), out.chosen_rewards, out.rejected_rewards, metrics,
            chosen_logps=out.chosen_logps, rejected_logps=out.rejected_logps, per_pair=per_pair,
        )


__all__ = ["WPOWeighted"]
