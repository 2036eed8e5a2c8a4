"""Chunked log-probs through the LM head equal the full-logits path in value and gradient."""

from __future__ import annotations

import pytest
import torch

from conftest import rows
from dpo_lightning.data import PairCollator
from dpo_lightning.models import ModelSpec, load_causal_lm
from dpo_lightning.modules.logprobs import (
    ChunkedTargetLogProbs, chunked_model_logprobs, model_logprobs, supports_chunked_logprobs, token_logprobs,
)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_function_matches_full_logits_in_float64(chunk: int) -> None:
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(17, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 17, (10,), generator=g)
    upstream = torch.randn(10, generator=g, dtype=torch.float64)
    full = token_logprobs(hidden @ weight.T, targets)
    chunked = ChunkedTargetLogProbs.apply(hidden, weight, targets, chunk)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    grads_full = torch.autograd.grad((full * upstream).sum(), (hidden, weight))
    grads_chunked = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight))
    for a, b in zip(grads_chunked, grads_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w: ChunkedTargetLogProbs.apply(h, w, targets, chunk), (hidden, weight))


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_model_value_and_every_parameter_gradient(tokenizer, tied: bool) -> None:
    from conftest import TINY_CONFIG, TOKENIZER_DIR

    spec = ModelSpec(config={**TINY_CONFIG, "tie_word_embeddings": tied}, tokenizer=TOKENIZER_DIR, seed=3)
    model = load_causal_lm(spec, tokenizer).double()
    assert supports_chunked_logprobs(model)
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    full = model_logprobs(model, batch)
    grads_full = torch.autograd.grad(full.sums.sum(), list(model.parameters()))
    chunked = chunked_model_logprobs(model, batch, chunk_size=4)
    grads_chunked = torch.autograd.grad(chunked.sums.sum(), list(model.parameters()))
    torch.testing.assert_close(chunked.sums, full.sums, rtol=0, atol=1e-10)
    assert torch.equal(chunked.counts, full.counts)
    for (name, _), a, b in zip(model.named_parameters(), grads_chunked, grads_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_models_with_scaled_logits_use_the_full_path(tokenizer) -> None:
    from conftest import tiny_spec

    model = load_causal_lm(tiny_spec(), tokenizer)
    model.config.final_logit_softcapping = 30.0
    assert not supports_chunked_logprobs(model)


def test_granite_logits_scaling_takes_the_full_path_and_keeps_its_values(tokenizer) -> None:
    """Granite divides its logits by ``logits_scaling``: a head-only path would drop that. With a
    scaling other than 1 the selector's auto path is the full one, equal to the model's own logits."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from dpo_lightning.modules import LogProbSelector

    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=4, logits_scaling=4.0)
    torch.manual_seed(0)
    model = GraniteForCausalLM(config).double()
    assert not supports_chunked_logprobs(model)
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["completion_mask"][:, 1:].bool()
    picked = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    expected = (picked * mask).sum(-1)
    torch.testing.assert_close(LogProbSelector()(model, batch).sums, expected, rtol=0, atol=1e-10)
    config.logits_scaling = 1.0  # no scaling: the chunked path is exact again
    assert supports_chunked_logprobs(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_equals_the_plain_layout_in_value_and_gradient(tokenizer, attn: str) -> None:
    from conftest import TINY_CONFIG, TOKENIZER_DIR
    from dpo_lightning.modules.logprobs import shared_prompt_model_logprobs

    spec = ModelSpec(config=dict(TINY_CONFIG), tokenizer=TOKENIZER_DIR, seed=5, attn_implementation=attn)
    model = load_causal_lm(spec, tokenizer).double()
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    plain = model_logprobs(model, batch)
    grads_plain = torch.autograd.grad(plain.sums.sum(), list(model.parameters()))
    shared = shared_prompt_model_logprobs(model, batch, chunk_size=5)
    grads_shared = torch.autograd.grad(shared.sums.sum(), list(model.parameters()))
    # transformers' eager attention takes its softmax in float32 even in a float64 model (and the
    # two layouts see different padding columns in it), so eager agrees to float32 rounding; sdpa
    # stays in float64 and agrees to 1e-10
    if attn == "sdpa":
        torch.testing.assert_close(shared.sums, plain.sums, rtol=0, atol=1e-10)
    else:
        torch.testing.assert_close(shared.sums, plain.sums, rtol=1e-7, atol=1e-6)
    assert torch.equal(shared.counts, plain.counts)
    # Llama's RMSNorm runs in float32 even in a float64 model; the shared prompt's gradient is
    # summed before that float32 step instead of after it, so gradients agree to float32 precision.
    for (name, _), a, b in zip(model.named_parameters(), grads_shared, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
