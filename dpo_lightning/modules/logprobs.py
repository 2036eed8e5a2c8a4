"""Per-sequence log-probabilities of completion tokens."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..losses.base import SequenceLogProbs


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[target]`` per position, in float32 (or float64 if given).

    Args:
        logits: ``(N, T, V)``.
        targets: ``(N, T)`` long.
    Returns:
        ``(N, T)`` log-probs.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> SequenceLogProbs:
    """Sum log-probs of completion tokens; prompt and padding contribute nothing.

    Position ``t`` of ``logits`` predicts token ``t + 1`` of ``input_ids``.

    Args:
        logits: ``(N, T, V)`` model outputs.
        input_ids: ``(N, T)``.
        completion_mask: ``(N, T)``, 1 on completion tokens.
    Returns:
        :class:`SequenceLogProbs` with ``(N,)`` sums and counts.
    """
    mask = completion_mask[:, 1:].bool()
    per_token = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    sums = per_token.masked_fill(~mask, 0.0).sum(-1)
    return SequenceLogProbs(sums=sums, counts=mask.sum(-1))


def model_logprobs(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> SequenceLogProbs:
    """One forward pass of a causal LM over the whole batch (chosen and rejected together)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return sequence_logprobs(out.logits, batch["input_ids"], batch["completion_mask"])
