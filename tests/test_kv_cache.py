"""The sampling loop's preallocated KV cache (dpo_lightning.kv_cache): it holds exactly what
transformers' concatenating DynamicLayer holds through updates, growth past its capacity,
repeats and selections along the batch and crops; the loop samples the same tokens from the same
logits with it as with DynamicCache (left padding, k > 1, rows dropped); sliding-window layers
are left to transformers and still sample the same tokens."""

from __future__ import annotations

import torch
from conftest import tiny_decoder
from transformers import MistralConfig, MistralForCausalLM
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from dpo_lightning.decoding import decode, new_cache
from dpo_lightning.kv_cache import PreallocatedLayer, preallocate

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]


def states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 4, generator=g)


def assert_same(layer: PreallocatedLayer, reference: DynamicLayer) -> None:
    assert layer.get_seq_length() == reference.get_seq_length()
    assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)


def test_updates_growth_repeats_selections_and_crops_hold_what_dynamic_layer_holds() -> None:
    layer, reference = PreallocatedLayer(capacity=6), DynamicLayer()
    for step, length in enumerate([4, 1, 1]):  # the prefill, then two decode steps: 6 positions, the capacity
        k, v = states(3, length, step)
        got, want = layer.update(k, v), reference.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert layer.capacity == 6 and layer.keys.data_ptr() == layer.key_buffer.data_ptr()  # written in place
    layer.batch_repeat_interleave(2)
    reference.batch_repeat_interleave(2)
    assert_same(layer, reference)
    keep = torch.tensor([0, 3, 4])
    layer.batch_select_indices(keep)
    reference.batch_select_indices(keep)
    assert_same(layer, reference)
    for step in range(3):  # past the capacity: the buffer grows
        k, v = states(3, 1, 10 + step)
        layer.update(k, v)
        reference.update(k, v)
    assert layer.capacity == 12
    assert_same(layer, reference)
    layer.crop(-2)
    reference.crop(-2)
    assert_same(layer, reference)
    k, v = states(3, 1, 20)
    layer.update(k, v)
    reference.update(k, v)
    assert_same(layer, reference)
    assert layer.get_seq_length() == 8
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.key_buffer is None


def sample_both_ways(model: torch.nn.Module, k: int = 3, n: int = 10, stops=range(2, 40)):
    """Decode with and without preallocation, recording each forward's last logits."""
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = {}
    for preallocated in (True, False):
        seen: list[torch.Tensor] = []
        hook = model.register_forward_hook(lambda module, args, o: seen.append(o.logits[:, -1].clone()))
        try:
            decoded = decode(model, ids, mask, k, max_new_tokens=n, stop_ids=list(stops),
                             generator=torch.Generator().manual_seed(4), preallocated=preallocated,
                             shared_prefix=False)
        finally:
            hook.remove()
        out[preallocated] = (decoded, seen)
    return out


def test_the_loop_samples_the_same_tokens_from_the_same_logits_as_with_dynamic_cache() -> None:
    out = sample_both_ways(tiny_decoder())
    (fast, fast_logits), (slow, slow_logits) = out[True], out[False]
    assert fast.tokens == slow.tokens and fast.has_eos == slow.has_eos
    lengths = [len(t) for t in fast.tokens]
    assert min(lengths) < max(lengths)  # rows were dropped: selections along the batch were exercised
    assert len(fast_logits) == len(slow_logits) == fast.steps
    for a, b in zip(fast_logits, slow_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_sliding_window_layers_are_left_to_transformers_and_sample_the_same_tokens() -> None:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           sliding_window=4, initializer_range=0.2, pad_token_id=0)
    model = MistralForCausalLM(config).eval()
    cache = preallocate(new_cache(model), 16)
    assert all(type(layer) is DynamicSlidingWindowLayer for layer in cache.layers)
    full = preallocate(DynamicCache(config=tiny_decoder().config), 16)
    assert all(type(layer) is PreallocatedLayer for layer in full.layers)
    out = sample_both_ways(model, n=8)  # prompts + 8 tokens run past the window of 4
    assert out[True][0].tokens == out[False][0].tokens
