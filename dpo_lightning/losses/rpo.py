"""NLL on the chosen response: :class:`ChosenNLLLoss` (TRL's ``sft`` loss type, a mixture
component) and :class:`WithChosenNLL` (RPO: any pairwise loss plus a weighted NLL term)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor

from .base import LOSS_KEY, LossOutput, PreferenceLoss, SequenceLogProbs, check_nonnegative
from .mixture import MixtureLoss


class ChosenNLLLoss(PreferenceLoss):
    r"""Negative log-likelihood of the chosen responses; reference-free. TRL's ``sft`` loss type,
    the SFT term of MPO (arXiv 2411.10442), meant as a :class:`~.mixture.MixtureLoss` component.

    ``average="tokens"`` (default, as TRL's ``sft``): one mean over every chosen completion
    token of the batch, so long responses weigh more than short ones::

        L = -sum_i log pi(y_w,i|x_i) / sum_i |y_w,i|

    (TRL: ``-chosen_per_token_logps[chosen_mask].mean()``). This is not the mean of the
    per-sequence means. ``per_pair`` is that batch value repeated for every pair (as TRL does,
    so that pair weighting such as WPO scales it pair by pair).

    ``average="sequences"``: the mean over pairs of each chosen response's per-token mean (the
    RPO paper's NLL, what :class:`WithChosenNLL` adds); ``per_pair`` is each pair's
    ``-mean log pi(y_w|x)``.

    The rewards logged are the per-token mean log-probs of each side.

    Args:
        average: ``"tokens"`` (default) or ``"sequences"``.
    """

    needs_reference = False

    def __init__(self, average: Literal["tokens", "sequences"] = "tokens") -> None:
        super().__init__()
        if average not in ("tokens", "sequences"):
            raise ValueError(f"{LOSS_KEY}.average must be 'tokens' or 'sequences', got {average!r}")
        self.average = average

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        chosen_means = policy.chosen_means
        if self.average == "tokens":
            tokens = policy.counts[: chosen_means.shape[0]].sum().clamp(min=1).to(policy.sums.dtype)
            loss = -policy.chosen.sum() / tokens
            per_pair = loss.expand(chosen_means.shape[0])
            # a mean over tokens: under DDP weighed by this process's share of the global tokens
            return LossOutput(loss, chosen_means.detach(), policy.rejected_means.detach(), per_pair=per_pair,
                              token_part=loss, tokens=tokens.detach())
        per_pair = -chosen_means
        loss = per_pair.mean()
        return LossOutput(loss, chosen_means.detach(), policy.rejected_means.detach(), per_pair=per_pair)


class WithChosenNLL(MixtureLoss):
    r"""Wrap a pairwise loss and add ``weight * NLL(y_w)`` (RPO, Pang et al. 2024,
    arXiv 2404.19733; Liu et al. 2024, arXiv 2405.16436)::

        L = L_inner + weight * ( -mean log pi(y_w|x) )

    ``mean`` is over the chosen response's completion tokens, then over pairs (each pair
    counts once, as in the RPO paper; :class:`ChosenNLLLoss` ``average="sequences"``).

    A two-component :class:`~.mixture.MixtureLoss` (weights ``[1, weight]``) that logs as RPO
    always did: the inner loss's metrics and ``nll`` (the per-pair NLL), nothing else. The
    wrapper needs whatever the inner loss needs (reference, scores). In YAML::

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
        if not loss.pairwise:
            raise ValueError("model.init_args.loss.init_args.loss must be a pairwise loss; NLL on y_w needs pairs")
        weight = check_nonnegative("weight", weight)
        super().__init__([loss, ChosenNLLLoss(average="sequences")], [1.0, weight], names=["inner", "nll"])
        self.weight = weight

    @property
    def inner(self) -> PreferenceLoss:
        """The wrapped loss."""
        return self.losses[0]

    def combine_metrics(self, outputs: Sequence[LossOutput]) -> dict[str, Tensor]:
        """The inner loss's metrics and ``nll``, ``(B,)`` per pair (overriding an inner ``nll``)."""
        return {**outputs[0].metrics, "nll": outputs[1].per_pair.detach()}


__all__ = ["ChosenNLLLoss", "WithChosenNLL"]
