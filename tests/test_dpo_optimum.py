"""DPO's theorem as a test: on Bradley-Terry-labelled pairs, offline DPO reaches the KL-regularised
optimum pi* = pi_ref exp(r / (beta tau)) / Z, computed exactly over an enumerable completion set."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import TOKENIZER_DIR, save_tiny_model
from dpo_lightning import train
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.experiments import bradley_terry, enumerable, optimum
from dpo_lightning.losses import DPOLoss
from dpo_lightning.models import ModelSpec, load_causal_lm, load_tokenizer


def test_optimum_of_two_completions_is_the_tilted_reference() -> None:
    ref = torch.tensor([math.log(0.3), math.log(0.7)], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    beta = 0.5
    p1 = 0.3 * math.exp(2.0) / (0.3 * math.exp(2.0) + 0.7)  # pi*(y1) by hand
    star = optimum.optimal_logprobs(ref, rewards, beta)
    assert star.exp().tolist() == pytest.approx([p1, 1 - p1], abs=1e-12)
    assert optimum.expected_reward(star, rewards) == pytest.approx(p1, abs=1e-12)
    kl = p1 * math.log(p1 / 0.3) + (1 - p1) * math.log((1 - p1) / 0.7)
    assert optimum.kl_divergence(star, ref) == pytest.approx(kl, abs=1e-12)


def test_optimum_attains_beta_log_partition_function() -> None:
    """max_pi E[r] - beta KL = beta log E_ref[exp(r / beta)], attained at pi* only."""
    g = torch.Generator().manual_seed(0)
    ref = optimum.normalised(torch.randn(8, generator=g, dtype=torch.float64))
    rewards = torch.rand(8, generator=g, dtype=torch.float64)
    beta = 0.3
    best = beta * math.log(float((ref.exp() * (rewards / beta).exp()).sum()))
    star = optimum.optimal_logprobs(ref, rewards, beta)
    assert optimum.kl_regularised_value(star, ref, rewards, beta) == pytest.approx(best, abs=1e-12)
    other = optimum.normalised(star + 0.1 * torch.randn(8, generator=g, dtype=torch.float64))
    assert optimum.kl_regularised_value(other, ref, rewards, beta) < best - 1e-6


def test_bradley_terry_labels_follow_the_reward_gap() -> None:
    ref = optimum.normalised(torch.zeros(2, dtype=torch.float64))
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    chosen, rejected = bradley_terry.sample_pairs(ref, rewards, 0.5, 20000, torch.Generator().manual_seed(1))
    assert bool((chosen != rejected).all())
    share = float((chosen == 0).double().mean())
    expected = 1 / (1 + math.exp(-2.0))  # sigmoid((1 - 0) / 0.5)
    assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / 20000)


def test_bradley_terry_fit_of_two_completions_is_the_log_odds() -> None:
    chosen = torch.tensor([1, 1, 1, 0])
    rejected = torch.tensor([0, 0, 0, 1])
    scores = bradley_terry.fit_scores(chosen, rejected, 2)
    assert scores.tolist() == pytest.approx([0.0, math.log(3.0)], abs=1e-10)
    with pytest.raises(ValueError, match="win and lose"):
        bradley_terry.fit_scores(torch.tensor([1, 1]), torch.tensor([0, 0]), 2)


def test_enumerable_completions_are_tokenized_as_the_data_module_does(tokenizer) -> None:
    """The float64 log-probs of the enumerable set score the very ids DPO trains on."""
    texts = enumerable.completions("kettle")
    assert len(set(texts)) == 8 and enumerable.rewards(texts).tolist() == [1, 2 / 3, 2 / 3, 1 / 3, 2 / 3, 1 / 3, 1 / 3, 0]
    dm = PreferenceDataModule(train_data=[{"prompt": "Review the kettle.", "chosen": texts[0], "rejected": texts[7]}],
                              tokenizer=TOKENIZER_DIR, max_length=64)
    dm.setup("fit")
    row = dm.train_dataset[0]
    prompt_ids, chosen_ids = enumerable.encode(tokenizer, "Review the kettle.", texts[0])
    assert (row["prompt_ids"], row["chosen_ids"]) == (prompt_ids, chosen_ids)
    assert row["rejected_ids"] == enumerable.encode(tokenizer, "Review the kettle.", texts[7])[1]
    assert len({len(enumerable.encode(tokenizer, "Review the kettle.", t)[1]) for t in texts}) == 1  # one length


# The theorem. Tiny Llama, random init (seed 3): pi_ref over the 8 completions of
# enumerable.TEMPLATE is close to uniform (0.09-0.18 each, mean reward 0.50). Labels by a
# Bradley-Terry labeller of temperature TAU; DPO at BETA targets pi* at BETA * TAU = 0.25:
# reward 0.79, KL 0.54 nats per prompt.
PROMPTS = {"Review the lamp.": "lamp", "What do you think of this kettle?": "kettle"}
TAU, BETA, PAIRS_PER_PROMPT = 0.25, 1.0, 2000


def test_offline_dpo_on_bradley_terry_pairs_reaches_the_kl_optimum(tmp_path) -> None:
    """Tolerances: reward within 0.02 and KL within 10 % of pi*'s, for the mean over the two
    prompts. Finite pairs: on these 4000 pairs the Bradley-Terry maximum-likelihood policy (the
    best the DPO loss can reach if every completion's log-ratio were free; fitted in float64)
    is 0.009-0.012 below pi*'s reward and 6-8 % below its KL per prompt (with pair seed 1, up
    to 0.04 and 34 %). Finite steps: after 3 epochs of Adam at lr 1e-3 the trained policy's
    loss is within 0.002 of that fit's; the network shares what it learns across slots and
    prompts, so its mean lands closer to pi* than the fit (pair seeds 0 and 1: reward within
    0.002, KL within 2 %).
    The tolerance tells the right target apart: pi* at a 10 % larger or smaller effective beta
    moves the reward by 0.02 and the KL by 15-18 %; DPO at beta = TAU (pi* at TAU^2) ends at
    reward 0.99."""
    torch.set_num_threads(1)
    reference_dir = save_tiny_model(tmp_path / "ref", seed=3)
    tok = load_tokenizer(ModelSpec(name_or_path=reference_dir))
    reference = load_causal_lm(ModelSpec(name_or_path=reference_dir), tok)
    g = torch.Generator().manual_seed(0)
    rows, world = [], {}
    for prompt, product in PROMPTS.items():
        texts = enumerable.completions(product)
        rewards = enumerable.rewards(texts)
        ref = enumerable.set_logprobs(reference, tok, prompt, texts)
        chosen, rejected = bradley_terry.sample_pairs(ref, rewards, TAU, PAIRS_PER_PROMPT, g)
        rows += [{"prompt": prompt, "chosen": texts[c], "rejected": texts[r]}
                 for c, r in zip(chosen.tolist(), rejected.tolist())]
        world[prompt] = (texts, rewards, ref)
    random.Random(0).shuffle(rows)

    run = train(reference_dir, rows, loss=DPOLoss(beta=BETA), lr=1e-3, batch_size=64, max_epochs=3,
                output_dir=tmp_path / "run", accelerator="cpu", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False)

    trained, target = [], []
    for prompt, (texts, rewards, ref) in world.items():
        policy = enumerable.set_logprobs(run.module.policy, tok, prompt, texts)
        star = optimum.optimal_logprobs(ref, rewards, BETA * TAU)
        trained.append((optimum.expected_reward(policy, rewards), optimum.kl_divergence(policy, ref)))
        target.append((optimum.expected_reward(star, rewards), optimum.kl_divergence(star, ref)))
    (reward, kl), (reward_star, kl_star) = [[sum(v) / len(v) for v in zip(*pts)] for pts in (trained, target)]
    assert reward_star == pytest.approx(0.788, abs=0.005) and kl_star == pytest.approx(0.54, abs=0.01)
    assert abs(reward - reward_star) < 0.02, (trained, target)
    assert abs(kl / kl_star - 1) < 0.10, (trained, target)
