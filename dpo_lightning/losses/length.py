"""LD-DPO: length-desensitised log-probs for any pairwise loss."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .base import LOSS_KEY, ComposedLoss, LossOutput, PreferenceLoss, SequenceLogProbs


def require_tokens(logps: SequenceLogProbs, side: str) -> None:
    """Raise a clear error when ``logps`` carries neither per-token values nor, for the
    reference, the sums beyond the shared length (what a precomputed reference holds)."""
    if logps.tokens is not None and logps.token_mask is not None:
        return
    if side == "reference" and logps.beyond_shared is not None:
        return
    raise ValueError(
        f"LengthDesensitized needs per-token {side} log-probs (SequenceLogProbs.tokens), got none"
        + (" (nor SequenceLogProbs.beyond_shared, which model.init_args.reference.precompute gives)" if side == "reference" else "")
    )


def shared_length_masks(token_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(head, tail)`` masks ``(2B, T - 1)`` of a paired batch's completion tokens: ``head`` the
    first ``l_p = min(|y_w|, |y_l|)`` of each response, ``tail`` the ones beyond, whatever the
    padding side."""
    mask = token_mask.bool()
    n = mask.shape[0]
    if n % 2:
        raise ValueError(f"expected an even number of sequences (2B), got {n}")
    position = mask.long().cumsum(-1)  # 1 at the first completion token, whatever the padding side
    lengths = mask.sum(-1)
    shared = torch.minimum(lengths[: n // 2], lengths[n // 2 :]).repeat(2)
    tail = mask & (position > shared[:, None])
    return mask & ~tail, tail


def beyond_shared_sums(logps: SequenceLogProbs) -> Tensor:
    """``(2B,)`` sums of each response's log-probs beyond its pair's shared length, from
    per-token values (what a precomputed reference caches for LD-DPO)."""
    require_tokens(logps, "policy")
    _, tail = shared_length_masks(logps.token_mask)
    return (logps.tokens * tail).sum(-1)


def length_desensitized(logps: SequenceLogProbs, ld_alpha: float, side: str = "policy") -> SequenceLogProbs:
    r"""LD-DPO's log-probs (Liu et al. 2024, arXiv 2409.06411), from per-token values.

    For pair ``i`` let ``l_p = min(|y_w|, |y_l|)``. Of each response, the first ``l_p``
    completion tokens count fully and the ones beyond (the "verbose" part of the longer one)
    weigh ``ld_alpha``::

        log pi_LD(y|x) = sum_{t <= l_p} log pi(y_t|...) + ld_alpha * sum_{t > l_p} log pi(y_t|...)
                       = log pi(y|x) - (1 - ld_alpha) * beyond_shared

    Args:
        logps: a paired batch's log-probs with ``tokens`` / ``token_mask`` ``(2B, T - 1)``, or
            (a precomputed reference) with ``beyond_shared`` ``(2B,)``, used by the second form.
        ld_alpha: weight of the tokens beyond the shared length, in [0, 1].
        side: ``"policy"`` or ``"reference"``, named in the error when tokens are missing.

    Returns:
        The same :class:`SequenceLogProbs` with ``sums`` ``(2B,)`` replaced; ``counts``,
        ``tokens`` and ``token_mask`` unchanged (so per-token means divide by the full length,
        as TRL does).
    """
    require_tokens(logps, side)
    if logps.tokens is None:
        sums = logps.sums - (1 - ld_alpha) * logps.beyond_shared
        return SequenceLogProbs(sums, logps.counts, beyond_shared=logps.beyond_shared)
    head, tail = shared_length_masks(logps.token_mask)
    sums = (logps.tokens * head).sum(-1) + ld_alpha * (logps.tokens * tail).sum(-1)
    return SequenceLogProbs(sums, logps.counts, logps.tokens, logps.token_mask)


class LengthDesensitized(ComposedLoss):
    r"""LD-DPO (Liu et al. 2024, arXiv 2409.06411): desensitise a pairwise loss to response length.

    The policy's and the reference's per-response log-probs are replaced by
    :func:`length_desensitized`'s: in each pair the tokens beyond the shorter response's length
    weigh ``ld_alpha``; then the inner loss runs on them. As TRL 1.16's ``ld_alpha`` (which also
    reweights both the policy's and the reference's log-probs). ``ld_alpha = 1`` is the inner
    loss exactly (the log-probs are passed through untouched); ``ld_alpha = 0`` truncates both
    responses to the shared length.

    Reference-free inner losses (SimPO, ORPO) are accepted: the reweighting is defined on the
    policy's log-probs alone. Per-token means (SimPO, IPO) keep dividing by the full length.

    Needs per-token log-probs (``needs_token_logprobs``), of the reference too
    (``needs_reference_tokens``); a precomputed reference (``reference: {precompute: true}``)
    caches, besides each response's sum, its sum beyond the pair's shared length
    (``SequenceLogProbs.beyond_shared``), which gives the same values for every ``ld_alpha``.

    The logged ``logps/chosen`` / ``logps/rejected`` stay the policy's plain log-probs; the
    rewards are the inner loss's, computed on the reweighted values.

    **Wrapper order changes the numbers.** Every loss inside this wrapper sees the reweighted
    sums: ``LengthDesensitized(MixtureLoss([DPOLoss, ChosenNLLLoss]))`` also reweights the NLL's
    chosen tokens beyond the shared length. TRL's ``ld_alpha`` reweights the preference loss's
    log-probs only, and its ``sft`` term reads the raw per-token log-probs; the order that
    matches TRL (``loss_type=["sigmoid", "sft"]`` with ``ld_alpha``, and ``use_weighting`` on top)
    puts this wrapper around each preference component, inside the mixture, and WPO outside::

        WPOWeighted(MixtureLoss([LengthDesensitized(DPOLoss), ChosenNLLLoss]))

    Args:
        loss: the pairwise loss to wrap.
        ld_alpha: weight of the tokens beyond the shared length, in [0, 1]. Default 1.0 (no
            change); the paper tunes it per model, lower is more length-desensitised.
    """

    def __init__(self, loss: PreferenceLoss, ld_alpha: float = 1.0) -> None:
        super().__init__()
        if not loss.pairwise:
            raise ValueError(
                f"{LOSS_KEY}.loss must be a pairwise loss; LD-DPO weighs each response against its pair's shorter one"
            )
        if not (0.0 <= ld_alpha <= 1.0 and math.isfinite(ld_alpha)):
            raise ValueError(f"{LOSS_KEY}.ld_alpha must be in [0, 1], got {ld_alpha}")
        self.inner = loss
        self.ld_alpha = float(ld_alpha)
        # the inner loss's needs, with per-token values of the policy and of the reference when there
        # is one (a precomputed reference then caches the sums beyond the shared length); no square mass
        self.set_needs(replace(loss.needs, token_logprobs=True, reference_tokens=loss.needs_reference, square_mass=False))

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        uses_reference = self.inner.needs_reference and reference is not None
        if self.ld_alpha == 1.0:  # no change; tokens still checked so that errors do not depend on alpha
            require_tokens(policy, "policy")
            if uses_reference:
                require_tokens(reference, "reference")
            return self.inner(policy, reference, batch)
        ld_policy = length_desensitized(policy, self.ld_alpha, "policy")
        ld_reference = length_desensitized(reference, self.ld_alpha, "reference") if uses_reference else reference
        return self.inner(ld_policy, ld_reference, batch)


__all__ = ["LengthDesensitized", "beyond_shared_sums", "length_desensitized", "require_tokens", "shared_length_masks"]
