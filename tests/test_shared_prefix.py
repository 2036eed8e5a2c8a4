"""Shared-prefix decoding (dpo_lightning.shared_prefix): the attention equals a float64 softmax
over the repeated cache (grouped heads, left padding, several query positions, dropped rows and
dropped prompts), the sampling loop draws the same tokens from the same logits as with the
repeated cache, the prompts' keys are held once, the models it cannot serve are refused or left
to the repeated cache, and the model's attention is switched back after decoding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import TINY_DECODER, tiny_decoder
from transformers import (
    AutoModelForCausalLM, FalconConfig, FalconForCausalLM, Gemma2Config, Gemma2ForCausalLM, MistralConfig,
    MistralForCausalLM, Qwen2Config,
)

from dpo_lightning.decoding import decode
from dpo_lightning.shared_prefix import (
    ACTIVE_CACHE, ATTENTION_NAME, SHARE_FROM_BYTES, VERIFIED_MODEL_TYPES, SharedPrefixLayer, decoding_attention,
    repeated_prompt_bytes, share_from_bytes, share_prefix, shared_prefix_attention, supports_shared_prefix,
)

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]


def reference_attention(query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float) -> torch.Tensor:
    """Float64 softmax attention of each row over its own ``(H_kv, L, D)`` keys (prompt tokens then
    completion; query position ``i`` of ``q`` sees all but the last ``q - 1 - i`` positions);
    returns ``(N, q, H, D)``."""
    rows, heads, queries, _ = query.shape
    out = []
    for r in range(rows):
        groups = heads // keys[r].shape[0]
        k = keys[r].double().repeat_interleave(groups, 0)  # (H, L, D)
        v = values[r].double().repeat_interleave(groups, 0)
        scores = query[r].double() @ k.transpose(-1, -2) * scale  # (H, q, L)
        length = k.shape[1]
        visible = torch.ones(queries, length, dtype=torch.bool).tril(length - queries)
        scores = scores.masked_fill(~visible, float("-inf"))
        out.append((scores.softmax(-1) @ v).transpose(0, 1))  # (q, H, D)
    return torch.stack(out)


#: rows kept after three steps (of 3 prompts x 3 samples): none dropped; prompt 1 and one sample of
#: prompt 0 dropped, the rest reordered; all kept but moved (a permutation, as reorder_cache gives)
KEEPS = {"all": [0, 1, 2, 3, 4, 5, 6, 7, 8], "dropped": [7, 0, 1, 6, 8], "moved": [3, 4, 5, 0, 1, 2, 8, 7, 6]}


@pytest.mark.parametrize("keep", sorted(KEEPS))
@pytest.mark.parametrize("queries", [1, 2])
def test_attention_is_the_softmax_over_each_rows_prompt_and_completion(queries: int, keep: str) -> None:
    torch.manual_seed(0)
    prompts, samples, kv_heads, groups, prompt_len, dim = 3, 3, 2, 2, 5, 8
    lengths = [5, 2, 4]  # left padding of 0, 3 and 1 positions
    mask = torch.tensor([[0] * (prompt_len - n) + [1] * n for n in lengths])
    prefix_k, prefix_v = torch.randn(2, prompts, kv_heads, prompt_len, dim).unbind(0)
    layer = SharedPrefixLayer(prefix_k, prefix_v, mask, samples, capacity=2)
    assert layer.prefix_keys.shape[0] == prompts  # the prompts once, not k times
    rows = prompts * samples
    token = ACTIVE_CACHE.set(SimpleNamespace(layers=[layer]))  # type: ignore[arg-type]
    try:
        own_k, own_v = [torch.empty(rows, kv_heads, 0, dim)] * 2
        for _ in range(3):  # three writes of 1 position: the buffers of 2 positions grow
            k, v = torch.randn(2, rows, kv_heads, 1, dim).unbind(0)
            got_k, got_v = layer.update(k, v)
            own_k, own_v = torch.cat([own_k, k], 2), torch.cat([own_v, v], 2)
            torch.testing.assert_close(got_k, own_k, rtol=0, atol=0)
        assert layer.get_seq_length() == prompt_len + 3

        kept = torch.tensor(KEEPS[keep])
        layer.batch_select_indices(kept)
        own_k, own_v = own_k[kept], own_v[kept]
        assert layer.prefix_keys.shape[0] == (2 if keep == "dropped" else 3)  # a prompt with no row left goes
        assert layer.prompt_major == (keep == "all")
        prompt_of = [r // samples for r in kept.tolist()]

        k, v = torch.randn(2, len(kept), kv_heads, queries, dim).unbind(0)
        own_k, own_v = layer.update(k, v)
        query = torch.randn(len(kept), kv_heads * groups, queries, dim)
        scale = 0.3
        out, weights = shared_prefix_attention(SimpleNamespace(layer_idx=0), query, own_k, own_v, None, scaling=scale)
        with pytest.raises(ValueError, match="dropout"):
            shared_prefix_attention(SimpleNamespace(layer_idx=0), query, own_k, own_v, None, dropout=0.1)
        with pytest.raises(ValueError, match="at most once"):
            layer.batch_select_indices(torch.tensor([0, 0]))
    finally:
        ACTIVE_CACHE.reset(token)
    assert weights is None and out.shape == (len(kept), queries, kv_heads * groups, dim)
    keys = [torch.cat([prefix_k[p][:, mask[p].bool()], own_k[r]], 1) for r, p in enumerate(prompt_of)]
    values = [torch.cat([prefix_v[p][:, mask[p].bool()], own_v[r]], 1) for r, p in enumerate(prompt_of)]
    expected = reference_attention(query, keys, values, scale)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_outside_the_loop_the_attention_and_the_cache_refuse_to_run() -> None:
    x = torch.zeros(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="decoding_attention"):
        shared_prefix_attention(SimpleNamespace(layer_idx=0), x, x, x, None)
    layer = SharedPrefixLayer(x, x, torch.ones(1, 1), 2, capacity=4)
    with pytest.raises(RuntimeError, match="decoding_attention"):  # sdpa would attend to the completion only
        layer.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))


# -- the sampling loop -------------------------------------------------------------------------------------
def tiny_llama() -> torch.nn.Module:
    return tiny_decoder()


def tiny_qwen2() -> torch.nn.Module:
    """Grouped heads (4 query heads on 1 key/value head) and biased q/k/v projections."""
    return tiny_decoder(Qwen2Config, seed=1, num_key_value_heads=1)


def sample(model: torch.nn.Module, shared: bool | None, k: int = 3, n: int = 10, stops=range(2, 40), prompts=PROMPTS):
    """Decode ``prompts`` (left-padded), recording each forward's last logits and the cache layers."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    seen: list[torch.Tensor] = []
    caches: list = []

    def record(module, args, kwargs, out):
        seen.append(out.logits[:, -1].clone())
        caches.append(kwargs.get("cache"))

    hook = model.register_forward_hook(record, with_kwargs=True)
    try:
        decoded = decode(model, ids, mask, k, max_new_tokens=n, stop_ids=list(stops),
                         generator=torch.Generator().manual_seed(4), shared_prefix=shared)
    finally:
        hook.remove()
    return decoded, seen, caches


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_the_loop_samples_the_same_tokens_from_the_same_logits_as_with_the_repeated_cache(make) -> None:
    model = make()
    assert supports_shared_prefix(model)
    shared, shared_logits, caches = sample(model, True)
    repeated, repeated_logits, _ = sample(model, False)
    assert shared.tokens == repeated.tokens and shared.has_eos == repeated.has_eos
    assert shared.row_steps == repeated.row_steps
    lengths = [len(t) for t in shared.tokens]
    assert min(lengths) < max(lengths)  # rows were dropped along the way
    assert len(shared_logits) == len(repeated_logits) == shared.steps
    for a, b in zip(shared_logits, repeated_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    layer = caches[-1].layers[0]
    assert isinstance(layer, SharedPrefixLayer) and layer.prefix_keys.shape[0] <= len(PROMPTS)
    assert model.config._attn_implementation == "sdpa"  # switched back after the loop


#: a tiny config of each verified model type: (config class, its arguments beyond conftest's
#: TINY_DECODER, or a whole set for those in WHOLE)
TINY = {
    "cohere": ("CohereConfig", {}), "gemma": ("GemmaConfig", {"head_dim": 8}), "granite": ("GraniteConfig", {}),
    "llama": ("LlamaConfig", {}), "mistral": ("MistralConfig", {"sliding_window": None}),
    "mixtral": ("MixtralConfig", {"sliding_window": None}), "olmo2": ("Olmo2Config", {}), "phi": ("PhiConfig", {}),
    "phi3": ("Phi3Config", {}), "qwen2": ("Qwen2Config", {}), "qwen2_moe": ("Qwen2MoeConfig", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}), "starcoder2": ("Starcoder2Config", {"sliding_window": None}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 256,
                            "scale_attn_by_inverse_layer_idx": True, "bos_token_id": 1, "eos_token_id": 2}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "intermediate_size": 64, "vocab_size": 256, "bos_token_id": 1, "eos_token_id": 2}),
    "opt": ("OPTConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 64,
                          "word_embed_proj_dim": 32, "vocab_size": 256, "max_position_embeddings": 128,
                          "bos_token_id": 1, "eos_token_id": 2}),
}
WHOLE = {"gpt2", "gpt_neox", "opt"}  # configs spelled in their own names


def test_every_verified_model_type_has_a_tiny_config_here() -> None:
    assert set(TINY) == VERIFIED_MODEL_TYPES


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_each_verified_model_type_samples_the_same_tokens_from_the_same_logits(model_type: str) -> None:
    name, arguments = TINY[model_type]
    config = getattr(transformers, name)(**(arguments if model_type in WHOLE else {**TINY_DECODER, **arguments}))
    assert config.model_type == model_type
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert supports_shared_prefix(model)
    shared, shared_logits, _ = sample(model, True, n=6)
    repeated, repeated_logits, _ = sample(model, False, n=6)
    assert shared.tokens == repeated.tokens
    for a, b in zip(shared_logits, repeated_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_one_prompt_of_many_samples_samples_as_with_the_repeated_cache() -> None:
    """One prompt, 64 samples (the shape of ``dpo-lightning-evaluate``'s Monte-Carlo KL)."""
    model = tiny_llama()
    shared, shared_logits, _ = sample(model, True, k=64, n=4, stops=[1], prompts=[[5, 6, 7]])
    repeated, repeated_logits, _ = sample(model, False, k=64, n=4, stops=[1], prompts=[[5, 6, 7]])
    assert shared.tokens == repeated.tokens and len(shared.tokens) == 64
    for a, b in zip(shared_logits, repeated_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_auto_shares_where_repeating_would_copy_a_mebibyte_a_layer_on_a_cpu(monkeypatch) -> None:
    model = tiny_llama()  # 2 kv heads of 8 dims, float32: 128 bytes of keys and values a position
    assert repeated_prompt_bytes(model, prompts=4, length=6, samples=3) == 2 * 4 * 6 * 2 * 8 * 2 * 4 == 6144
    assert repeated_prompt_bytes(model.to(torch.bfloat16), prompts=4, length=6, samples=3) == 3072
    model = model.float()
    assert share_from_bytes(torch.device("cpu")) == 2**20 and share_from_bytes(torch.device("cuda", 0)) == 2**28
    _, _, caches = sample(model, None, k=3, n=3)  # 6 KB: the repeated cache
    assert not isinstance(caches[-1].layers[0], SharedPrefixLayer)
    monkeypatch.setitem(SHARE_FROM_BYTES, "cpu", 6144)
    _, _, caches = sample(model, None, k=3, n=3)
    assert isinstance(caches[-1].layers[0], SharedPrefixLayer)
    monkeypatch.setitem(SHARE_FROM_BYTES, "cpu", 0)
    _, _, caches = sample(model, None, k=1, n=3)  # one sample: nothing to share
    assert not isinstance(caches[-1].layers[0], SharedPrefixLayer)


def test_models_it_cannot_serve_are_refused_by_name_or_left_to_the_repeated_cache(monkeypatch) -> None:
    torch.manual_seed(0)
    common = TINY_DECODER
    windowed = MistralForCausalLM(MistralConfig(sliding_window=4, **common)).eval()
    gemma2 = Gemma2ForCausalLM(Gemma2Config(head_dim=8, **common)).eval()  # soft-capped logits, sliding layers
    alibi = FalconForCausalLM(FalconConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           alibi=True, pad_token_id=0)).eval()  # ALiBi biases travel in the mask
    assert not any(supports_shared_prefix(m) for m in (windowed, gemma2, alibi))
    assert supports_shared_prefix(MistralForCausalLM(MistralConfig(sliding_window=None, **common)))
    with pytest.raises(ValueError, match="MistralForCausalLM cannot decode with a shared prefix"):
        sample(windowed, True)
    monkeypatch.setitem(SHARE_FROM_BYTES, "cpu", 0)  # sharing would pay at any size
    decoded, _, caches = sample(windowed, None, n=8)  # auto: the repeated cache, as before
    assert not isinstance(caches[-1].layers[0], SharedPrefixLayer) and len(decoded.tokens) == 3 * len(PROMPTS)


def test_the_attention_is_switched_back_when_decoding_fails_and_overlapping_decodes_are_refused() -> None:
    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7]])
    cache = share_prefix(model(ids, use_cache=True).past_key_values, torch.ones(1, 3), 2, 4)
    with pytest.raises(KeyError):
        with decoding_attention(model, cache):
            assert model.config._attn_implementation == ATTENTION_NAME and ACTIVE_CACHE.get() is cache
            with pytest.raises(RuntimeError, match="already decoding with a shared prefix"):
                with decoding_attention(model, cache):
                    pass
            assert model.config._attn_implementation == ATTENTION_NAME  # the refused one changed nothing
            raise KeyError("boom")
    assert model.config._attn_implementation == "sdpa" and ACTIVE_CACHE.get() is None


def test_bfloat16_decoding_stays_within_rounding_of_the_repeated_cache() -> None:
    """The first decode step (same tokens on both sides) in bfloat16: both layouts within bfloat16
    rounding of the float32 model's logits."""
    model = tiny_llama()
    _, exact, _ = sample(model, False, n=2, stops=[1])
    model = model.to(torch.bfloat16)
    _, shared, _ = sample(model, True, n=2, stops=[1])
    _, repeated, _ = sample(model, False, n=2, stops=[1])
    assert shared[1].dtype == torch.bfloat16
    shared_error = (shared[1].float() - exact[1]).abs().max().item()
    repeated_error = (repeated[1].float() - exact[1]).abs().max().item()
    assert shared_error < 0.1 and repeated_error < 0.1, (shared_error, repeated_error)
