"""The chunked LM head computes in the autocast dtype under mixed precision (both passes), with
float32 log-softmax, and is unchanged outside autocast."""

from __future__ import annotations

import pytest
import torch

from dpo_lightning.data import PairCollator
from dpo_lightning.models import load_causal_lm
from dpo_lightning.modules.logprobs import (
    ChunkedTargetLogProbs, autocast_compute_dtype, chunked_model_logprobs, token_logprobs,
)
from conftest import MatmulDtypes, head_inputs, tiny_spec
from test_logprobs import rows


def test_compute_dtype_follows_the_autocast_state() -> None:
    x = torch.zeros(2)
    assert autocast_compute_dtype(x) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_compute_dtype(x) == torch.bfloat16
        assert autocast_compute_dtype(x.double()) is None
    with torch.autocast("cpu", dtype=torch.float16):
        assert autocast_compute_dtype(x) == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert autocast_compute_dtype(x) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_head_matmul_runs_in_the_autocast_dtype_forward_and_backward(dtype: torch.dtype) -> None:
    hidden, weight, targets, upstream = head_inputs()
    with torch.autocast("cpu", dtype=dtype):
        with MatmulDtypes() as forward:
            out = ChunkedTargetLogProbs.apply(hidden, weight, targets, 5)
        assert out.dtype == torch.float32
    # as under Lightning's precision plugins: backward runs outside the autocast region (and, on
    # CUDA, on autograd's device thread, which never has the caller's autocast state)
    with MatmulDtypes() as backward:
        (out * upstream).sum().backward()
    assert len(forward.seen) == 3  # one per chunk: 12 positions, chunks of 5
    assert len(backward.seen) == 9  # per chunk: logits again, dlogits @ W, dlogits^T @ h
    assert set(forward.seen + backward.seen) == {(dtype, dtype)}
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_bf16_values_and_gradients_are_close_to_float32() -> None:
    hidden, weight, targets, upstream = head_inputs(seed=1)
    ref = ChunkedTargetLogProbs.apply(hidden.double(), weight.double(), targets, 5)
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ChunkedTargetLogProbs.apply(hidden, weight, targets, 5)
    grads = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
    # bf16 keeps 8 bits of mantissa: logits of size ~5 are off by ~0.02; the logsumexp is float32
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=0.05)
    assert not torch.equal(out.double(), ref.detach())  # it did compute in bf16
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), rtol=0.05, atol=0.02)


def test_float32_path_is_the_plain_float32_computation_bitwise() -> None:
    hidden, weight, targets, upstream = head_inputs(seed=2)
    with MatmulDtypes() as seen:
        out = ChunkedTargetLogProbs.apply(hidden, weight, targets, 64)  # one chunk
        grads = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
    assert set(seen.seen) == {(torch.float32, torch.float32)}
    logits = hidden.detach() @ weight.detach().T
    assert torch.equal(out, token_logprobs(logits, targets))
    dlogits = torch.softmax(logits, dim=-1).mul_(-upstream[:, None])
    dlogits[torch.arange(len(targets)), targets] += upstream
    assert torch.equal(grads[0], dlogits @ weight.detach())
    assert torch.equal(grads[1], dlogits.T @ hidden.detach())


def test_tiny_model_under_bf16_autocast_is_close_to_float32(tokenizer) -> None:
    model = load_causal_lm(tiny_spec(seed=4), tokenizer)
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    full = chunked_model_logprobs(model, batch, chunk_size=4)
    grads_full = torch.autograd.grad(full.sums.sum(), list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = chunked_model_logprobs(model, batch, chunk_size=4)
    grads_mixed = torch.autograd.grad(mixed.sums.sum(), list(model.parameters()))
    assert mixed.sums.dtype == torch.float32
    scale = full.sums.detach().abs().max()
    torch.testing.assert_close(mixed.sums, full.sums, rtol=0, atol=0.02 * float(scale))
    head = dict(model.named_parameters())["lm_head.weight" if "lm_head.weight" in dict(model.named_parameters())
                                           else "model.embed_tokens.weight"]
    for (name, param), a, b in zip(model.named_parameters(), grads_mixed, grads_full):
        if param is head:
            cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
            assert cosine > 0.99, name
