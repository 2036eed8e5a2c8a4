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


class ChunkedTargetLogProbs(torch.autograd.Function):
    """``log softmax(h W^T)[y]`` for ``M`` positions without holding ``(M, V)`` logits.

    Forward and backward both walk over chunks of ``chunk_size`` positions; backward
    recomputes each chunk's logits (``d/dlogits = g * (onehot(y) - softmax)``), so peak extra
    memory is one ``(chunk_size, V)`` float32 block instead of ``(M, V)``.

    Args:
        hidden: ``(M, H)`` final hidden states at the positions that predict a target.
        weight: ``(V, H)`` LM-head weight (no bias).
        targets: ``(M,)`` long.
        chunk_size: positions per chunk.
    Returns:
        ``(M,)`` float32 (float64 if ``hidden`` is float64) log-probs.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:  # type: ignore[override]
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            logits = (hidden[start : start + chunk_size] @ weight.T).to(dtype)
            out[start : start + chunk_size] = token_logprobs(logits, targets[start : start + chunk_size])
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32 if weight.dtype != torch.float64 else weight.dtype) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[start : start + ctx.chunk_size]
            y = targets[start : start + ctx.chunk_size]
            g = grad_out[start : start + ctx.chunk_size]
            logits = (h @ weight.T).to(grad_out.dtype)
            dlogits = -torch.softmax(logits, dim=-1) * g[:, None]
            dlogits[torch.arange(len(y), device=y.device), y] += g
            dlogits = dlogits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + ctx.chunk_size] = dlogits @ weight
            if grad_weight is not None:
                grad_weight += (dlogits.T @ h).to(grad_weight.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def supports_chunked_logprobs(model: torch.nn.Module) -> bool:
    """True when ``logits == lm_head(decoder(x))`` with a plain bias-free linear head.

    Models that scale or soft-cap logits (Gemma 2's ``final_logit_softcapping``, Cohere's
    ``logit_scale``) or have a biased or adapted head use the full-logits path.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return (
        isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear and head.bias is None
        and decoder is not None and decoder is not model
    )


def chunked_model_logprobs(model: torch.nn.Module, batch: Mapping[str, Tensor], chunk_size: int = 1024) -> SequenceLogProbs:
    """Like :func:`model_logprobs`, but the LM head runs only at completion positions, chunked.

    The decoder runs once over the batch; of its ``(N, T, H)`` hidden states only the ``M``
    positions that predict a completion token go through the head, ``chunk_size`` at a time,
    with recomputation in backward (:class:`ChunkedTargetLogProbs`). Prompt and padding
    positions never produce logits.
    """
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    mask = batch["completion_mask"][:, 1:].bool()
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    picked = hidden[:, :-1][mask]
    targets = batch["input_ids"][:, 1:][mask]
    weight = model.get_output_embeddings().weight
    token = ChunkedTargetLogProbs.apply(picked, weight, targets, chunk_size)
    sums = torch.zeros(mask.shape[0], dtype=token.dtype, device=token.device).index_add(0, rows, token)
    return SequenceLogProbs(sums=sums, counts=mask.sum(-1))
