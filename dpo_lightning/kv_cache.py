"""A KV cache for the sampling loop that writes each step in place instead of concatenating.

transformers' ``DynamicLayer`` grows by ``torch.cat([keys, new], dim=-2)``: every decode step
copies the whole cache of every layer, ``O(length^2)`` copying over a completion (18-31% of a
decode step at the benchmark's ``small`` setting, ``benchmarks/README.md``). Its ``StaticLayer``
preallocates, but attends over the whole preallocated length every step and cannot be repeated
or selected along the batch, which the loop needs (prefill once, expand to ``k`` samples, drop
finished rows).

:class:`PreallocatedLayer` is a ``DynamicLayer`` whose keys and values live in a buffer of
``capacity`` positions: ``update`` copies the new positions into it and returns views of the
filled part, so attention sees exactly the tensors ``DynamicLayer`` would build (same values,
same length; only the memory layout differs). Repeating and selecting along the batch work as
in ``DynamicLayer``. A write past the capacity doubles the buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's cache: ``keys`` / ``values`` are ``(B, H, n, D)`` views of ``(B, H, capacity, D)``
    buffers (``n`` positions filled)."""

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.capacity = capacity
        self.key_buffer: Tensor | None = None
        self.value_buffer: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, _ = key_states.shape
        self.key_buffer = key_states.new_empty((batch, heads, self.capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((batch, heads, self.capacity, value_states.shape[-1]))
        self._view(0)
        self.is_initialized = True

    def _view(self, length: int) -> None:
        assert self.key_buffer is not None and self.value_buffer is not None
        self.keys = self.key_buffer[:, :, :length]
        self.values = self.value_buffer[:, :, :length]

    def _grow(self, needed: int) -> None:
        assert self.key_buffer is not None and self.value_buffer is not None
        length = self.get_seq_length()
        self.capacity = max(needed, 2 * self.capacity)
        key_buffer = self.key_buffer.new_empty(self.key_buffer.shape[:2] + (self.capacity, self.key_buffer.shape[-1]))
        value_buffer = self.value_buffer.new_empty(
            self.value_buffer.shape[:2] + (self.capacity, self.value_buffer.shape[-1])
        )
        key_buffer[:, :, :length] = self.keys
        value_buffer[:, :, :length] = self.values
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self._view(length)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write ``(B, H, q, D)`` new keys and values after the filled positions; returns the
        ``(B, H, n + q, D)`` keys and values so far (views of the buffers)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        assert self.key_buffer is not None and self.value_buffer is not None
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self._view(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized or self.keys is None else self.keys.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # keys / values stay views of the buffers, shorter

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        super().reset()

    def _along_batch(self, index: Tensor) -> None:
        if self.key_buffer is None:
            return
        length = self.get_seq_length()
        self.key_buffer = self.key_buffer.index_select(0, index.to(self.key_buffer.device))
        self.value_buffer = self.value_buffer.index_select(0, index.to(self.value_buffer.device))  # type: ignore[union-attr]
        self._view(length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times in a row (row ``i`` becomes rows ``i * repeats ... i * repeats + repeats - 1``)."""
        if self.key_buffer is not None:
            self._along_batch(torch.arange(self.key_buffer.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep rows ``indices`` (a ``(n,)`` index tensor) in that order."""
        self._along_batch(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._along_batch(beam_idx)

    def offload(self) -> None:
        """Move the buffers to the CPU (``DynamicCache(offloading=True)``)."""
        if self.key_buffer is not None:
            length = self.get_seq_length()
            self.key_buffer = self.key_buffer.to("cpu", non_blocking=True)
            self.value_buffer = self.value_buffer.to("cpu", non_blocking=True)  # type: ignore[union-attr]
            self._view(length)

    def prefetch(self) -> None:
        """Move the buffers back to the layer's device."""
        if self.key_buffer is not None and self.key_buffer.device != self.device:
            length = self.get_seq_length()
            self.key_buffer = self.key_buffer.to(self.device, non_blocking=True)
            self.value_buffer = self.value_buffer.to(self.device, non_blocking=True)  # type: ignore[union-attr]
            self._view(length)

def preallocate(cache: DynamicCache, capacity: int) -> DynamicCache:
    """``cache`` (empty) with each of its full-attention ``DynamicLayer`` s replaced by a
    :class:`PreallocatedLayer` of ``capacity`` positions; sliding-window and other layer kinds
    are kept as transformers made them."""
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


__all__ = ["PreallocatedLayer", "preallocate"]
