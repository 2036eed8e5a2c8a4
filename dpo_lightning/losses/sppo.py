"""SPPO (hard labels): self-play preference optimisation as a square loss on each log-ratio."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import LossOutput, PreferenceLoss, SequenceLogProbs, check_positive, implicit_rewards


class SPPOHardLoss(PreferenceLoss):
    r"""SPPO (Wu et al., 2024, arXiv 2405.00675) with hard win probabilities; TRL's ``loss_type="sppo_hard"``.

    The paper's update (Algorithm 1) regresses each response's log-ratio against the reference
    (the previous iterate ``pi_t``) onto its centred win probability::

        L(y) = ( log pi(y|x) - log pi_ref(y|x) - eta * (P(y > pi_t | x) - 1/2) )^2

    with ``P`` estimated by a preference model (PairRM) over K sampled responses. This is the
    *hard* version TRL implements: ``P = 1`` for the chosen and ``0`` for the rejected response,
    and ``eta = 1 / beta``. Per pair, with log-probs summed over completion tokens::

        L = (log pi(y_w|x) - log pi_ref(y_w|x) - 1/(2 beta))^2
          + (log pi(y_l|x) - log pi_ref(y_l|x) + 1/(2 beta))^2

    Like IPO it has targets, not a margin: the chosen log-ratio is pulled to ``+1/(2 beta)`` and
    the rejected one to ``-1/(2 beta)``. It acts on each log-ratio separately, so it takes no
    f-divergence. Iterating (re-sampling, re-labelling, resetting the reference to the trained
    policy) is up to the user; one fit is one SPPO iteration.

    Args:
        beta: ``1 / eta`` > 0, default 0.1 (targets ``+-5`` nats).

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums; ``per_pair`` and the implicit rewards
    ``beta * (log pi - log pi_ref)`` (detached) are ``(B,)``.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        if reference is None:
            raise ValueError("SPPOHardLoss needs reference log-probs")
        target = 0.5 / self.beta
        losses = (policy.chosen - reference.chosen - target) ** 2 + (policy.rejected - reference.rejected + target) ** 2
        chosen, rejected = implicit_rewards(self.beta, policy, reference)
        return LossOutput(losses.mean(), chosen, rejected, per_pair=losses)
