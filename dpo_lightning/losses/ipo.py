"""IPO: identity preference optimisation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import (
    FDivergence,
    LossOutput,
    PreferenceLoss,
    SequenceLogProbs,
    check_divergence,
    check_positive,
    divergence_scores,
    implicit_rewards,
)


class IPOLoss(PreferenceLoss):
    r"""IPO (Azar et al., 2023, arXiv 2310.12036), eq. 17, on per-token MEAN log-ratios.

    With ``d' = [mean log pi(y_w) - mean log pi_ref(y_w)] - [mean log pi(y_l) - mean log pi_ref(y_l)]``
    where ``mean`` averages over completion tokens (as in TRL's IPO and the authors'
    follow-ups; the paper's sequence-level form is ``length_normalize=False``)::

        L = (d' - 1 / (2 * beta)) ** 2

    With an f-divergence (f-DPO, arXiv 2309.16240) each side's summed log-ratio ``log u`` is
    replaced by ``f'(u)`` before the division by its length, as TRL does.

    Args:
        beta: the regularisation ``tau`` > 0. Default 0.1 (target margin ``1/(2 beta) = 5``).
        length_normalize: use per-token means (default ``True``) or sums.
        divergence / divergence_alpha: as in :class:`~dpo_lightning.losses.DPOLoss`.

    Logged: the rewards ``beta * (log pi - log pi_ref)`` on log-probs SUMMED over completion
    tokens, ``(B,)`` each, detached, whatever ``length_normalize`` and the divergence (as TRL 1.16
    logs them for every loss type, so rewards, margins and reward accuracy compare with TRL's and
    with the other losses'); and ``ipo_margin``, ``(B,)``, the margin ``d'`` the loss pulls
    towards its target ``1 / (2 beta)`` (per-token means when ``length_normalize``).
    """

    def __init__(
        self,
        beta: float = 0.1,
        length_normalize: bool = True,
        divergence: FDivergence = "reverse_kl",
        divergence_alpha: float = 0.5,
    ) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.length_normalize = length_normalize
        self.divergence, self.divergence_alpha = check_divergence(divergence, divergence_alpha)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        if reference is None:
            raise ValueError("IPOLoss needs reference log-probs")
        if self.length_normalize and self.divergence == "reverse_kl":
            h_w = policy.chosen_means - reference.chosen_means
            h_l = policy.rejected_means - reference.rejected_means
        else:
            h_w = divergence_scores(policy.chosen - reference.chosen, self.divergence, self.divergence_alpha)
            h_l = divergence_scores(policy.rejected - reference.rejected, self.divergence, self.divergence_alpha)
            if self.length_normalize:
                b = h_w.shape[0]
                h_w = h_w / policy.counts[:b].clamp(min=1).to(h_w.dtype)
                h_l = h_l / policy.counts[b:].clamp(min=1).to(h_l.dtype)
        margin = h_w - h_l
        losses = (margin - 1 / (2 * self.beta)) ** 2
        chosen, rejected = implicit_rewards(self.beta, policy, reference)
        return LossOutput(losses.mean(), chosen, rejected, {"ipo_margin": margin.detach()}, per_pair=losses)
