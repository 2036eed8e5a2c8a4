"""ORPO: odds-ratio preference optimisation, with the SFT term built in. No reference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LossOutput, PreferenceLoss, SequenceLogProbs, check_positive


def log_odds(mean_logps: Tensor) -> Tensor:
    """``log(P / (1 - P))`` for ``P = exp(mean_logps)``, stable for ``mean_logps`` near 0; ``(B,)``."""
    # log(1 - exp(x)) for x < 0, computed as in Maechler (2012): log(-expm1(x)) near 0.
    x = mean_logps.clamp(max=-1e-6)
    log1mexp = torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return x - log1mexp


class ORPOLoss(PreferenceLoss):
    r"""ORPO (Hong et al., 2024, arXiv 2403.07691), eq. 6-7::

        L = NLL(y_w) + lam * ( -log sigmoid( log odds(y_w) - log odds(y_l) ) )
        odds(y) = P(y|x) / (1 - P(y|x)),   P(y|x) = exp(mean log pi(y|x))

    ``NLL(y_w)`` is the per-token mean negative log-likelihood of the chosen response.

    Args:
        lam: weight of the odds-ratio term, > 0. Default 0.1 (paper: 0.1 to 0.5).

    Rewards logged: ``lam * mean log pi(y|x)`` for chosen and rejected, ``(B,)``.
    """

    needs_reference = False

    def __init__(self, lam: float = 0.1) -> None:
        super().__init__()
        self.lam = check_positive("lam", lam)

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        chosen_mean, rejected_mean = policy.chosen_means, policy.rejected_means
        odds_ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
        or_loss = -F.logsigmoid(odds_ratio)
        nll = -chosen_mean
        per_pair = nll + self.lam * or_loss
        metrics = {"nll": nll.detach(), "log_odds_ratio": odds_ratio.detach()}
        return LossOutput(
            per_pair.mean(), (self.lam * chosen_mean).detach(), (self.lam * rejected_mean).detach(), metrics, per_pair=per_pair
        )
