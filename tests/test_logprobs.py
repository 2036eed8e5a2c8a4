"""Sequence log-probs against a manual per-token computation on a tiny model."""

from __future__ import annotations

import torch

from conftest import rows
from dpo_lightning.data import PairCollator
from dpo_lightning.models import load_causal_lm
from dpo_lightning.modules import logits_to_completion_logprobs, model_logprobs


def manual_logprob(model, prompt: list[int], completion: list[int]) -> float:
    """sum_t log p(completion_t | prompt, completion_<t) with one unpadded forward, float64."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for t, token in enumerate(completion):
        position = len(prompt) + t - 1  # logits at position p predict token p + 1
        total += torch.log_softmax(logits[position], -1)[token].item()
    return total


def test_padded_batch_matches_manual_per_token_and_each_row_alone(spec, tokenizer) -> None:
    model = load_causal_lm(spec, tokenizer).double().eval()
    collate = PairCollator(pad_token_id=tokenizer.pad_token_id)
    batch = collate(rows())
    with torch.no_grad():
        logps = model_logprobs(model, batch)
        for i, row in enumerate(rows()):
            alone = model_logprobs(model, collate([row]))
            for j, key in enumerate(("chosen_ids", "rejected_ids")):
                expected = manual_logprob(model, row["prompt_ids"], row[key])
                got = logps.sums[i + j * 3].item()
                assert abs(got - expected) < 1e-9, (i, key, got, expected)
                assert abs(alone.sums[j].item() - expected) < 1e-9
                assert logps.counts[i + j * 3].item() == len(row[key])


def test_prompt_and_padding_positions_contribute_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    input_ids = torch.tensor([[1, 3, 4, 5, 2, 0], [1, 3, 6, 2, 0, 0]])
    completion_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])
    base = logits_to_completion_logprobs(logits, input_ids, completion_mask)
    changed = logits.clone()
    changed[:, 0] += 100 * torch.randn(2, 9, generator=g, dtype=torch.float64)  # predicts prompt token 1
    changed[0, 5] += 50.0  # last position (padding) predicts nothing
    changed[1, 3:] -= 7.0  # rows' padding
    after = logits_to_completion_logprobs(changed, input_ids, completion_mask)
    torch.testing.assert_close(base.sums, after.sums)
    expected0 = sum(torch.log_softmax(logits[0, t - 1], -1)[input_ids[0, t]].item() for t in (2, 3, 4))
    assert abs(base.sums[0].item() - expected0) < 1e-12
    assert base.counts.tolist() == [3, 2]
