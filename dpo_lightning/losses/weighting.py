"""WPO: weight each preference pair by how likely the policy is to produce it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from .base import LOSS_KEY, ComposedLoss, LossOutput, PreferenceLoss, SequenceLogProbs


class WPOWeighted(ComposedLoss):
    r"""WPO (Zhou et al. 2024, arXiv 2406.11827): reweight a pairwise loss's pairs so that
    off-policy pairs count less. Pair ``i`` weighs the policy's length-normalised probability
    of both its responses, detached (no gradient flows through the weight)::

        L = mean_i w_i * L_inner,i

    ``aligned=True`` (default), WPO's aligned weight (eq. 2) as TRL 1.16's ``use_weighting``
    computes it, clamped at 1 as TRL does::

        w_i = min(1, exp(mean_t [log pi(y_w,t|...) - log sum_v pi(v|...)^2])
                   * exp(mean_t [log pi(y_l,t|...) - log sum_v pi(v|...)^2]))

    each token's probability divided by ``sum_v pi(v|...)^2``, the probability the policy gives
    on average to its own samples at that position; it needs the whole vocabulary
    distribution at every completion position (``needs_square_mass``: one more reduction over
    the vocabulary, without gradient, in the same chunks as the log-probs).

    ``aligned=False``: the plain weight, from the per-sequence sums and lengths alone (no
    vocabulary pass; never larger than the aligned one, since ``sum_v pi(v)^2 <= 1``, so the loss
    is on a lower scale than TRL's, often much lower on long responses)::

        w_i = exp(mean_t log pi(y_w,t|...)) * exp(mean_t log pi(y_l,t|...))

    ``L_inner,i`` is the inner loss's ``LossOutput.per_pair``; an inner loss that gives none
    (it is not a mean over pairs: AOT sorts its pairs, KTO averages rows) is refused with an
    error at its first batch. The weights are logged as ``wpo_weight`` (their mean over pairs).
    As TRL (``use_weighting``) the weighted mean is not renormalised by the weights' sum.

    Wrapper order: the weights are computed from the log-probs this wrapper receives, so put it
    outermost (``WPOWeighted(MixtureLoss([LengthDesensitized(DPOLoss), ChosenNLLLoss]))``): inside
    :class:`~.length.LengthDesensitized` its weights would read the length-reweighted sums, which
    TRL's weights never do; around a mixture it weights every component, the NLL term too (whose
    ``per_pair`` is its batch value on every pair), as TRL applies ``use_weighting`` to each loss
    type. With ``aligned=True`` it must be the outermost loss of the recipe (a mixture does not
    pass ``needs_square_mass`` on); elsewhere it fails at its first batch saying so.

    Args:
        loss: the pairwise loss to reweight.
        aligned: WPO's aligned weight clamped at 1 (TRL's, default) or the plain one.

    Shapes: ``policy`` holds ``(2B,)`` sums and counts (and ``square_mass`` when aligned);
    ``per_pair`` and ``wpo_weight`` are ``(B,)``.
    """

    def __init__(self, loss: PreferenceLoss, aligned: bool = True) -> None:
        super().__init__()
        if not loss.pairwise:
            raise ValueError(f"{LOSS_KEY}.loss must be a pairwise loss; WPO weighs (chosen, rejected) pairs")
        self.inner = loss
        self.aligned = bool(aligned)
        self.set_needs(replace(loss.needs, square_mass=self.aligned))  # the inner loss's, and the square mass if aligned

    def weights(self, policy: SequenceLogProbs) -> torch.Tensor:
        """``(B,)`` detached pair weights (see the class docstring)."""
        with torch.no_grad():
            if not self.aligned:
                return torch.exp(policy.chosen_means + policy.rejected_means)
            if policy.square_mass is None:
                raise ValueError(
                    f"WPOWeighted(aligned=True) ({LOSS_KEY}.aligned) needs the policy's SequenceLogProbs.square_mass; "
                    "make WPOWeighted the outermost loss of the recipe (a MixtureLoss around it does not ask for it), "
                    "or set aligned: false"
                )
            counts = policy.counts.clamp(min=1).to(policy.sums.dtype)
            means = (policy.sums - policy.square_mass.to(policy.sums.dtype)) / counts
            b = means.shape[0] // 2
            return torch.exp(means[:b] + means[b:]).clamp(max=1.0)

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
        weights = self.weights(policy)
        per_pair = weights * out.per_pair
        metrics = {**out.metrics, "wpo_weight": weights}
        return LossOutput(
            per_pair.mean(), out.chosen_rewards, out.rejected_rewards, metrics,
            chosen_logps=out.chosen_logps, rejected_logps=out.rejected_logps, per_pair=per_pair,
        )


__all__ = ["WPOWeighted"]
