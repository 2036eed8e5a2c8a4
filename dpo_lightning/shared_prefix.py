"""Shared-prefix decoding: the ``k`` samples of a prompt read that prompt's KV cache once.

The sampling loop (:mod:`dpo_lightning.decoding`) draws ``k`` completions of each of ``B``
prompts. Expanding the prefilled cache to ``B * k`` rows (``batch_repeat_interleave``) copies
each prompt's keys and values ``k`` times, and every decode step then reads all ``k`` copies:
on a CPU a decode step is bound by that memory traffic (the weights and the cache are read for
one token a row), and on a GPU the copies are memory the batch could use.

Here each full-attention layer keeps

* the prompts' keys and values once: ``(B, H_kv, T, D)`` with their ``(B, T)`` padding mask, and
* each sample's own completion keys and values: ``(N, H_kv, capacity, D)`` buffers, ``N``
  the rows still sampling (``N <= B * k``), written in place each step,

and attention of a decode step's query (one position a row, ``(N, H, 1, D)``) is the exact
softmax over both parts, the idea of cascade attention (Hydragen, FlashInfer): the prompt's
scores are one batched product per prompt whose ``k * H / H_kv`` query rows share the prompt's
keys, the completion's one product per row; the two score blocks are concatenated under one
softmax (fewer operations than merging two softmaxes through their log-sum-exp, which matters
where a step is per-operation overhead), and the weights go back through the same two
products. Same values as attention over the repeated cache up to float rounding
(tests/test_shared_prefix.py).

The attention is registered with transformers' ``AttentionInterface`` as
:data:`ATTENTION_NAME`, with no mask function (the layer holds the padding; a decode query sees
every position before it), and is switched on only for the decode steps
(:func:`decoding_attention`). :func:`supports_shared_prefix` says which models it serves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer

from dpo_lightning.models import attention_widths, base_model

#: the name the attention is registered under in transformers' ``AttentionInterface``
ATTENTION_NAME = "dpo_lightning_shared_prefix"

#: ``decode``'s default shares the prompts' cache when repeating it for the samples would copy at
#: least this many bytes a layer, per device type (:func:`share_from_bytes`).
#:
#: * ``cpu``: measured on a 2-core CPU (benchmarks/README.md, "The shared-prefix cache"):
#:   0.98-1.02x at 0.2 MB (the sentiment policy, k = 2), 1.04x at 1.6 MB, 1.06x at 2.3 MB, 1.16x
#:   at 4.8 MB, 1.20-1.26x at 1.3-11 MB with k = 8. Below 1 MiB the copies save about what the
#:   shared attention's extra operations per layer cost.
#: * any other device (not measured; issue 22): a decode step there is bound by launching
#:   kernels, and the shared attention launches about 15 small kernels a layer where SDPA
#:   launches one, about 0.1 ms at ~7 us each. Reading a copy at ~3 TB/s costs that much only at
#:   about 300 MB. So sharing is for memory there: 256 MiB a layer is 6 GiB of copies for a
#:   24-layer model.
SHARE_FROM_BYTES = {"cpu": 2**20, "other": 2**28}

#: the model types whose attention was checked to give the repeated cache's tokens and logits
#: through :func:`shared_prefix_attention` (tests/test_shared_prefix.py runs each): an attention
#: that puts more than the causal padding mask into its mask (ALiBi, as in Falcon and BLOOM) or
#: its keyword arguments would be wrong here, so other types keep the repeated cache
VERIFIED_MODEL_TYPES = frozenset({
    "cohere", "gemma", "gpt2", "gpt_neox", "granite", "llama", "mistral", "mixtral", "olmo2", "opt", "phi", "phi3",
    "qwen2", "qwen2_moe", "qwen3", "starcoder2",
})

#: the cache the running decode step attends through (set by :func:`decoding_attention`)
ACTIVE_CACHE: ContextVar[DynamicCache | None] = ContextVar("dpo_lightning_shared_prefix_cache", default=None)


class SharedPrefixLayer(DynamicLayer):
    """One full-attention layer's cache: the prompts once, the completions per row.

    Attributes:
        prefix_keys / prefix_values: ``(P, H_kv, T, D)``: the prompts still sampling (``P <= B``).
        prefix_bias: ``(P, 1, 1, T)`` float: 0 on prompt tokens, the dtype's minimum on padding.
        row_prompt: ``(N,)`` long: the prompt (index into the prefix) of each row.
        row_sample: ``(N,)`` long: the sample number ``0 .. k-1`` of each row.
        key_buffer / value_buffer: ``(N, H_kv, capacity, D)`` / ``(N, H_kv, capacity, D_v)``;
            ``keys`` / ``values`` are the filled views (``s`` completion positions so far).
        prompt_major: whether row ``i * k + j`` is sample ``j`` of prompt ``i`` for every row
            (no row dropped or moved), which lets attention regroup rows by a view.
    """

    def __init__(self, prefix_keys: Tensor, prefix_values: Tensor, prompt_mask: Tensor, samples: int,
                 capacity: int) -> None:
        super().__init__()
        prompts, heads, _, _ = prefix_keys.shape
        device = prefix_keys.device
        self.samples = samples
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        bias = torch.zeros(prompt_mask.shape, dtype=prefix_keys.dtype, device=device)
        self.prefix_bias = bias.masked_fill_(~prompt_mask.bool(), torch.finfo(bias.dtype).min)[:, None, None, :]
        self.row_prompt = torch.arange(prompts, device=device).repeat_interleave(samples)
        self.row_sample = torch.arange(samples, device=device).repeat(prompts)
        self.prompt_major = True
        rows = prompts * samples
        self.key_buffer = prefix_keys.new_empty((rows, heads, capacity, prefix_keys.shape[-1]))
        self.value_buffer = prefix_values.new_empty((rows, heads, capacity, prefix_values.shape[-1]))
        self.capacity = capacity
        self.device = device
        self.is_initialized = True
        self._view(0)

    def _view(self, length: int) -> None:
        self.keys = self.key_buffer[:, :, :length]
        self.values = self.value_buffer[:, :, :length]

    def completion_length(self) -> int:
        """Completion positions written so far."""
        return self.keys.shape[-2]

    def get_seq_length(self) -> int:
        """Prompt positions (padding included, as the repeated cache counts them) plus completion positions."""
        return self.prefix_keys.shape[-2] + self.completion_length()

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write ``(N, H_kv, q, D)`` new completion keys and values; returns the ``(N, H_kv, s + q, D)``
        completion keys and values so far (the prompt part is read by :func:`shared_prefix_attention`).

        Raises:
            RuntimeError: outside :func:`decoding_attention`, where the model's own attention
                would attend to the completion part only.
        """
        if ACTIVE_CACHE.get() is None:
            raise RuntimeError("a shared-prefix cache is attended only inside dpo_lightning.shared_prefix.decoding_attention")
        start = self.completion_length()
        end = start + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self._view(end)
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        length = self.completion_length()
        self.capacity = max(needed, 2 * self.capacity)
        keys, values = self.keys, self.values
        self.key_buffer = keys.new_empty(keys.shape[:2] + (self.capacity, keys.shape[-1]))
        self.value_buffer = values.new_empty(values.shape[:2] + (self.capacity, values.shape[-1]))
        self.key_buffer[:, :, :length] = keys
        self.value_buffer[:, :, :length] = values
        self._view(length)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep rows ``indices`` (a ``(n,)`` index tensor, each row at most once) in that order; a
        prompt none of whose rows is kept leaves the prefix.

        Raises:
            ValueError: a row given twice (a sample has one completion; beam search's copies
                are not served here).
        """
        indices = indices.to(self.device)
        if torch.unique(indices).numel() != indices.numel():
            raise ValueError("a shared-prefix cache keeps each row at most once; got a row index twice")
        length = self.completion_length()
        self.key_buffer = self.key_buffer.index_select(0, indices)
        self.value_buffer = self.value_buffer.index_select(0, indices)
        self._view(length)
        self.row_prompt, self.row_sample = self.row_prompt[indices], self.row_sample[indices]
        kept = torch.unique(self.row_prompt)  # sorted
        if kept.numel() < self.prefix_keys.shape[0]:
            self.prefix_keys = self.prefix_keys.index_select(0, kept)
            self.prefix_values = self.prefix_values.index_select(0, kept)
            self.prefix_bias = self.prefix_bias.index_select(0, kept)
            self.row_prompt = torch.searchsorted(kept, self.row_prompt)
        prompts = self.prefix_keys.shape[0]
        self.prompt_major = self.row_prompt.numel() == prompts * self.samples and bool(
            torch.equal(self.row_prompt, torch.arange(prompts, device=self.device).repeat_interleave(self.samples))
            and torch.equal(self.row_sample, torch.arange(self.samples, device=self.device).repeat(prompts))
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a shared-prefix cache is already expanded to its samples")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a shared-prefix cache cannot be cropped")

    def reset(self) -> None:
        raise NotImplementedError("a shared-prefix cache cannot be reset; start from a new cache")


def supports_shared_prefix(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a transformers decoder-only LM, or a peft model around one) can decode
    through :func:`shared_prefix_attention`: its type is one of :data:`VERIFIED_MODEL_TYPES`, it
    switches attention through transformers' ``AttentionInterface``, and every layer is plain
    full attention (no sliding window, no logit soft-capping, no attention sinks, no
    linear-attention layers)."""
    model = base_model(model)
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in VERIFIED_MODEL_TYPES:
        return False
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    if can_switch is None or not can_switch():
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    if any(getattr(config, name, None) is not None for name in ("attn_logit_softcapping", "attention_chunk_size")):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    if "sinks" in {name.rsplit(".", 1)[-1] for name, _ in model.named_parameters()}:
        return False
    try:
        layers = DynamicCache(config=config).layers
    except Exception:
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def repeated_prompt_bytes(model: torch.nn.Module, prompts: int, length: int, samples: int) -> int:
    """Bytes a layer's cache copies to repeat ``prompts`` prompts of ``length`` positions (padding
    included) for ``samples`` samples each: the ``samples - 1`` extra copies of their keys and
    values, at the model's dtype (``config.num_key_value_heads`` heads of ``config.head_dim``)."""
    model = base_model(model)
    _, kv_heads, head_dim = attention_widths(model.config)
    itemsize = next(model.parameters()).element_size()
    return (samples - 1) * prompts * length * kv_heads * head_dim * 2 * itemsize


def share_from_bytes(device: torch.device) -> int:
    """:data:`SHARE_FROM_BYTES` for ``device``'s type."""
    return SHARE_FROM_BYTES["cpu" if device.type == "cpu" else "other"]


def share_prefix(cache: DynamicCache, prompt_mask: Tensor, samples: int, capacity: int) -> DynamicCache:
    """``cache`` (prefilled with ``B`` prompts) with each layer replaced by a :class:`SharedPrefixLayer`
    of ``B * samples`` rows (row ``i * samples + j``: sample ``j`` of prompt ``i``) whose completion
    buffers hold ``capacity`` positions. ``prompt_mask``: ``(B, T)``, 0 on padding."""
    cache.layers = [SharedPrefixLayer(layer.keys, layer.values, prompt_mask, samples, capacity) for layer in cache.layers]
    return cache


def shared_prefix_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            **kwargs) -> tuple[Tensor, None]:
    """Attention of a decode step through the active :class:`SharedPrefixLayer` of ``module.layer_idx``.

    Args:
        query: ``(N, H, q, D)`` (``q`` query positions a row; the loop decodes one).
        key / value: ``(N, H_kv, s, D)`` / ``(N, H_kv, s, D_v)``: the completion part, as the
            layer's ``update`` returned it (the query's own positions last).
        attention_mask: ignored (none is built for this attention): the prompt padding is in the
            layer, and a query position sees every completion position up to its own.
        scaling: the softmax scale (``D ** -0.5`` when ``None``).
    Returns:
        ``((N, q, H, D_v), None)``, the layout transformers' attention functions return.
    """
    cache = ACTIVE_CACHE.get()
    if cache is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention runs only inside dpo_lightning.shared_prefix.decoding_attention")
    if dropout:
        raise ValueError(f"{ATTENTION_NAME} attention has no dropout; decode with the model in eval mode")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{ATTENTION_NAME} attention does not support `{name}`; decode with shared_prefix=False "
                             "(or sample with sampling.engine: generate)")
    layer = cache.layers[module.layer_idx]
    rows, heads, queries, dim = query.shape
    kv_heads, completion = key.shape[1], key.shape[2]
    prompts, samples = layer.prefix_keys.shape[0], layer.samples
    width = heads // kv_heads * queries  # query rows a row puts against each kv head
    prompt_major = layer.prompt_major  # no row dropped or moved: rows already sit prompt by prompt

    def to_prompts(t: Tensor) -> Tensor:  # (N, H_kv, width, X) -> (P, H_kv, k * width, X)
        if prompt_major:
            grouped = t.view(prompts, samples, kv_heads, width, t.shape[-1])
        else:
            grouped = t.new_zeros((prompts, samples, kv_heads, width, t.shape[-1]))
            grouped[layer.row_prompt, layer.row_sample] = t
        return grouped.transpose(1, 2).reshape(prompts, kv_heads, samples * width, t.shape[-1])

    def to_rows(t: Tensor) -> Tensor:  # (P, H_kv, k * width, X) -> (N, H_kv, width, X)
        t = t.view(prompts, kv_heads, samples, width, t.shape[-1]).transpose(1, 2)
        return t.reshape(rows, kv_heads, width, t.shape[-1]) if prompt_major else t[layer.row_prompt, layer.row_sample]

    q = query.reshape(rows, kv_heads, width, dim) * (dim**-0.5 if scaling is None else scaling)
    prompt_scores = torch.matmul(to_prompts(q), layer.prefix_keys.transpose(-1, -2)) + layer.prefix_bias  # (P, H_kv, k*w, T)
    own_scores = torch.matmul(q, key.transpose(-1, -2))  # (N, H_kv, w, s)
    if queries > 1:  # query position i sees the completion up to its own position
        causal = torch.ones(queries, completion, dtype=torch.bool, device=query.device).tril(completion - queries)
        own_scores = own_scores.view(rows, kv_heads, -1, queries, completion).masked_fill(~causal, float("-inf"))
        own_scores = own_scores.view(rows, kv_heads, width, completion)
    scores = torch.cat([to_rows(prompt_scores), own_scores], dim=-1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    prefix = layer.prefix_keys.shape[-2]
    out = to_rows(torch.matmul(to_prompts(weights[..., :prefix]), layer.prefix_values))
    out = out + torch.matmul(weights[..., prefix:], value)  # (N, H_kv, w, D_v)
    return out.reshape(rows, heads, queries, -1).transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)


@contextmanager
def decoding_attention(model: torch.nn.Module, cache: DynamicCache) -> Iterator[None]:
    """Within the block, ``model`` attends through :func:`shared_prefix_attention` and ``cache``
    (a :func:`share_prefix` cache); its attention implementation is restored on the way out.

    Raises:
        RuntimeError: ``model`` (or a model sharing its config) is already decoding this way:
            the switch is the model's, and two overlapping decodes would restore it under each
            other.
    """
    model = base_model(model)
    before = model.config._attn_implementation
    if before == ATTENTION_NAME:
        raise RuntimeError(f"{type(model).__name__} is already decoding with a shared prefix; one decode at a time per model")
    token = ACTIVE_CACHE.set(cache)
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        try:
            yield
        finally:
            model.set_attn_implementation(before)
    finally:
        ACTIVE_CACHE.reset(token)


__all__ = [
    "ACTIVE_CACHE", "ATTENTION_NAME", "SHARE_FROM_BYTES", "SharedPrefixLayer", "decoding_attention",
    "VERIFIED_MODEL_TYPES", "repeated_prompt_bytes", "share_from_bytes", "share_prefix",
    "shared_prefix_attention", "supports_shared_prefix",
]
