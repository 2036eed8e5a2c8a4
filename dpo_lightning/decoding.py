"""The sampling loop: ``k`` completions of each of ``B`` left-padded prompts from a causal LM,
with each prompt's prefill run once and finished rows dropped from the batch.

1. prefill the ``B`` prompts once (``use_cache``, position ids from the attention mask as
   ``generate`` makes them for left padding, logits of the last position only) into a cache
   (for the repeated layout of step 2, its full-attention layers preallocated for the prompt
   and ``max_new_tokens``: :mod:`dpo_lightning.kv_cache`, each step written in place, not
   concatenated);
2. expand the last logits to ``B * k`` rows and the KV cache to the ``k`` samples: each
   prompt's keys and values are kept once and its ``k`` samples attend to them together
   (:mod:`dpo_lightning.shared_prefix`; ``shared_prefix``), or, for a model that attention
   cannot serve or a batch whose prompts' cache is too small for sharing to pay, the cache and
   the mask are repeated ``k`` times (``Cache.batch_repeat_interleave``);
3. decode: every step, each still-active row draws its next token from the distribution
   ``generate`` samples from (float32 logits -> ``TemperatureLogitsWarper`` ->
   ``TopKLogitsWarper`` -> ``TopPLogitsWarper``, in ``generate``'s order -> softmax), and a row
   that drew a stop id or reached ``max_new_tokens`` leaves the batch
   (``Cache.batch_select_indices``): a step costs what its active rows cost;
4. randomness: every step draws one float64 uniform for each of the ``B * k`` ORIGINAL rows from a
   ``torch.Generator`` seeded with the seed (on the prompts' device), and an active row takes the
   token where its uniform falls in the cumulative probabilities (inverse CDF). A row's tokens so
   depend on the seed and its own history only: dropping finished rows or keeping them gives the
   same tokens, and the caller's global random stream is never touched.

The stream differs from ``generate``'s (``torch.multinomial`` on the global RNG); the
distribution is the same (tests/test_decoding.py compares the frequencies with the model's exact
probabilities). :func:`can_decode` says whether a model can be served (a decoder-only model whose
forward takes an attention mask, position ids and a cache); the caller falls back to
``generate`` for the others.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dpo_lightning import shared_prefix as sharing
from dpo_lightning.kv_cache import preallocate
from dpo_lightning.models import base_model

#: the names a model's forward may give its KV cache argument (transformers 5: ``cache``)
CACHE_ARGS = ("cache", "past_key_values")


class NonFiniteLogitsError(RuntimeError):
    """The model's next-token logits were NaN or infinite for some rows: no token can be drawn.

    Attributes:
        rows: the original rows (``i * k + j``) whose distribution was not finite.
        step: the decode step (0: the prompts' own last logits).
    """

    def __init__(self, rows: list[int], step: int) -> None:
        self.rows, self.step = rows, step
        super().__init__(
            f"the policy's next-token logits are NaN or infinite (rows {rows[:8]}{' ...' if len(rows) > 8 else ''} "
            f"of the sampling batch, decode step {step}): nothing can be sampled from them. The weights have "
            "likely diverged: lower the learning rate, keep gradient clipping on, or train in bf16-mixed "
            "rather than 16-mixed; resume from the last checkpoint whose weights are finite"
        )


@dataclass
class Decoded:
    """What :func:`decode` sampled for ``N = B * k`` rows (row ``i * k + j``: sample ``j`` of prompt ``i``).

    Attributes:
        tokens: ``N`` lists: each row's tokens up to and including its first stop id, or
            ``max_new_tokens`` tokens without one.
        has_eos: ``N``: whether the row stopped at a stop id.
        steps: decode steps run (the longest row's length).
        row_steps: rows of the decode forwards summed over the steps after the first (the
            work done; ``N * (steps - 1)`` without dropping finished rows).
    """

    tokens: list[list[int]]
    has_eos: list[bool]
    steps: int
    row_steps: int


def forward_args(model: torch.nn.Module) -> set[str]:
    """The parameter names of the (base) model's ``forward``."""
    return set(inspect.signature(base_model(model).forward).parameters)


def cache_arg(model: torch.nn.Module) -> str | None:
    """The name under which ``model``'s forward takes its KV cache, or ``None``."""
    names = forward_args(model)
    return next((name for name in CACHE_ARGS if name in names), None)


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty ``DynamicCache`` laid out for ``model``'s layers (full, sliding-window, ...), as
    ``generate`` makes one."""
    return DynamicCache(config=base_model(model).config)


def can_decode(model: torch.nn.Module) -> bool:
    """Whether :func:`decode` can serve ``model``: a decoder-only LM whose forward takes
    ``attention_mask``, ``position_ids`` and a cache (``cache`` or ``past_key_values``), and
    whose cache layers can be repeated and selected along the batch
    (``batch_repeat_interleave`` / ``batch_select_indices``: not linear-attention layers)."""
    config = getattr(base_model(model), "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    names = forward_args(model)
    if not ({"attention_mask", "position_ids"} <= names and cache_arg(model) is not None):
        return False
    try:
        layers = new_cache(model).layers
    except Exception:  # a config transformers cannot lay a cache out for: leave it to generate
        return False
    return all(hasattr(layer, "batch_repeat_interleave") and hasattr(layer, "batch_select_indices") for layer in layers)


def warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """The logits warpers ``generate`` applies for these settings, in its order (temperature,
    top-k, top-p; each only when it changes the distribution)."""
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        out.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return out


def next_token_probs(logits: Tensor, warp: LogitsProcessorList) -> Tensor:
    """``(N, V)`` float32 probabilities of the next token from ``(N, V)`` last-position logits,
    as ``generate`` computes them (float32 logits, the warpers, softmax)."""
    scores = logits.float()
    if len(warp):
        scores = warp(None, scores)  # the three warpers never read the input ids
    return torch.softmax(scores, dim=-1)


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """``(N,)`` tokens: for each row the first token whose cumulative probability exceeds
    ``u * total`` (``probs`` ``(N, V)``, ``uniforms`` ``(N,)`` in [0, 1)), in float64. A token of
    probability 0 is never taken (its cumulative value equals its predecessor's)."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_samples: int,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    drop_finished: bool = True,
    preallocated: bool = True,
    shared_prefix: bool | None = None,
) -> Decoded:
    """Sample ``num_samples`` completions of each prompt (see the module docstring).

    The caller puts the model in eval mode. Args:
        model: a decoder-only causal LM (or a peft model around one) that :func:`can_decode`.
        input_ids: ``(B, T)`` left-padded prompts. attention_mask: ``(B, T)``, 0 on padding.
        num_samples: ``k``; row ``i * k + j`` is sample ``j`` of prompt ``i``.
        max_new_tokens: most tokens per row. stop_ids: tokens that end a row (kept in it).
        generator: the random stream, on ``input_ids``' device; ``B * k`` float64 uniforms
            are drawn from it every step.
        temperature / top_p / top_k: ``generate``'s warpers (1.0 / 1.0 / 0: off).
        drop_finished: ``False`` keeps finished rows in the batch (feeding them their last
            token) instead of selecting them out of the cache: the same tokens, more work (a
            check of the row dropping).
        preallocated: the repeated cache's full-attention layers write each step in place
            (:mod:`dpo_lightning.kv_cache`) instead of concatenating.
        shared_prefix: keep each prompt's keys and values once and let its ``k`` samples attend
            to them together (:mod:`dpo_lightning.shared_prefix`) instead of repeating the cache
            ``k`` times; ``None`` (auto): when ``k > 1``,
            :func:`~dpo_lightning.shared_prefix.supports_shared_prefix` and repeating would copy
            at least :func:`~dpo_lightning.shared_prefix.share_from_bytes` a layer (1 MiB on a
            CPU, 256 MiB elsewhere)
            (:func:`~dpo_lightning.shared_prefix.repeated_prompt_bytes`; below that the copies
            save about what the shared attention's extra operations cost). The same tokens up
            to float rounding of the attention.
    Raises:
        TypeError: the model's forward returned no transformers ``Cache``.
    """
    device = input_ids.device
    batch, k = input_ids.shape[0], num_samples
    rows = batch * k
    name = cache_arg(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_args(model) else {}
    warp = warpers(temperature, top_k, top_p)
    stops = torch.tensor(sorted({int(s) for s in stop_ids}), dtype=input_ids.dtype, device=device)

    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # as generate: left padding shifts the positions
    if shared_prefix is None:
        shared_prefix = (k > 1 and sharing.supports_shared_prefix(model)
                         and sharing.repeated_prompt_bytes(model, batch, input_ids.shape[1], k) >= sharing.share_from_bytes(device))
    elif shared_prefix and not sharing.supports_shared_prefix(model):
        raise ValueError(f"{type(base_model(model)).__name__} cannot decode with a shared prefix (not one of "
                         "shared_prefix.VERIFIED_MODEL_TYPES, or sliding-window, soft-capped or sink attention); "
                         "pass shared_prefix=None or False")
    cache = new_cache(model)
    if preallocated and not shared_prefix:
        preallocate(cache, input_ids.shape[1] + max_new_tokens)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache}, **extra)
    returned = getattr(out, name, None)
    cache = returned if returned is not None else cache
    if not isinstance(cache, Cache) or cache.get_seq_length() != input_ids.shape[1]:
        raise TypeError(
            f"{type(base_model(model)).__name__}'s forward kept no transformers Cache of the prompts; sample it with "
            "sampling.engine: generate"
        )
    probs = next_token_probs(out.logits[:, -1], warp).repeat_interleave(k, 0)  # (B*k, V): the prompt's, k times
    del out
    next_position = mask.sum(-1, keepdim=True).repeat_interleave(k, 0)  # (B*k, 1): one past each prompt's last token
    if shared_prefix:  # the cache holds the prompts' padding: no 2D mask from here on
        sharing.share_prefix(cache, mask, k, max_new_tokens)
        mask = None
    else:
        if k > 1:
            cache.batch_repeat_interleave(k)
        mask = mask.repeat_interleave(k, 0)

    active = torch.arange(rows, device=device)  # original row of each batch row
    live = torch.ones(rows, dtype=torch.bool, device=device)  # batch rows still sampling (no dropping)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    has_eos = [False] * rows
    steps = row_steps = 0
    with sharing.decoding_attention(model, cache) if shared_prefix else nullcontext():
        for step in range(max_new_tokens):
            uniforms = torch.rand(rows, generator=generator, device=device, dtype=torch.float64)
            picked = inverse_cdf(probs, uniforms[active])  # (n,)
            stopped = torch.isin(picked, stops)
            steps += 1
            drawn = picked.tolist()  # the step's one host read
            if max(drawn) >= probs.shape[-1]:  # a NaN total: searchsorted fell past the vocabulary
                raise NonFiniteLogitsError(
                    [row for row, token in zip(active.tolist(), drawn) if token >= probs.shape[-1]], step
                )
            for row, token, stop, alive in zip(active.tolist(), drawn, stopped.tolist(), live.tolist()):
                if alive:
                    tokens[row].append(token)
                    has_eos[row] = stop
            finished = stopped | ~live
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            if drop_finished:
                if bool(finished.any()):
                    keep = (~finished).nonzero().squeeze(-1)
                    cache.batch_select_indices(keep)
                    active, picked, next_position = active[keep], picked[keep], next_position[keep]
                    mask = mask[keep] if mask is not None else None
                    live = live[keep]
            else:
                live = live & ~stopped
            row_steps += picked.shape[0]
            if mask is None:  # shared prefix
                out = model(input_ids=picked.unsqueeze(-1), position_ids=next_position, use_cache=True, **{name: cache})
            else:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
                out = model(input_ids=picked.unsqueeze(-1), attention_mask=mask, position_ids=next_position,
                            use_cache=True, **{name: cache})
            returned = getattr(out, name, None)
            cache = returned if returned is not None else cache
            probs = next_token_probs(out.logits[:, -1], warp)
            next_position = next_position + 1
    return Decoded(tokens, has_eos, steps, row_steps)


__all__ = [
    "CACHE_ARGS", "Decoded", "NonFiniteLogitsError", "base_model", "can_decode", "decode", "inverse_cdf", "new_cache",
    "next_token_probs", "warpers",
]
