"""The sentiment experiment's parts: scorer, SFT loss, exact KL check, pair sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIG, TOKENIZER_DIR, tiny_recipe, write_jsonl, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.experiments.sentiment import PRODUCTS, PROMPTS, held_out_prompts, review, score, sft_rows
from dpo_lightning.models import ModelSpec, load_causal_lm, load_tokenizer
from dpo_lightning.sampling import evaluate_policy, load_scorer, sample_pairs, completion_logprobs


def test_scorer_counts_sentiment_words() -> None:
    assert score(" The kettle is great and sturdy. I love it.") == 1.0
    assert score(" The kettle is great and flimsy. I hate it.") == pytest.approx(1 / 3)
    assert score(" The kettle is awful and noisy. I return it.") == 0.0
    assert score("nothing to see") == 0.5
    import random

    assert all(0.0 <= score(review(random.Random(i), "lamp")) <= 1.0 for i in range(50))
    assert load_scorer("dpo_lightning.experiments.sentiment:score") is score
    with pytest.raises(ValueError, match="no function"):
        load_scorer("dpo_lightning.experiments.sentiment:nope")


def test_evaluation_prompts_never_appear_in_the_shipped_training_data() -> None:
    root = Path(__file__).resolve().parent.parent / "data" / "sentiment"

    def prompts(name: str) -> set[str]:
        return {json.loads(line)["prompt"] for line in (root / name).read_text().splitlines() if line.strip()}

    held_out = held_out_prompts()
    assert len(held_out) == len(set(held_out)) == len(PROMPTS) * len(PRODUCTS) // 4 == 40
    assert [json.loads(line)["prompt"] for line in (root / "eval_prompts.jsonl").read_text().splitlines()] == held_out
    training = prompts("sft_train.jsonl") | prompts("sft_val.jsonl") | prompts("pair_prompts.jsonl")
    assert not training & set(held_out)
    assert len(training) == 120  # every other (phrasing, product) pair occurs in training
    for product in PRODUCTS:  # every product and phrasing is seen in training, only not in these pairs
        assert any(product in p for p in training)
    for phrasing in PROMPTS:
        assert any(p.startswith(phrasing.split("{p}")[0]) for p in training)
    assert sft_rows(5, seed=7) == sft_rows(5, seed=7)


def test_sft_loss_is_token_mean_nll_on_completions(tmp_path) -> None:
    train = write_jsonl(tmp_path / "sft.jsonl", sft_rows(24))
    recipe = tiny_recipe(tmp_path, train, train)
    recipe["model"] = {"class_path": "dpo_lightning.modules.SFTModule", "init_args": {
        "model": recipe["model"]["init_args"]["model"], "export_dir": str(tmp_path / "export")}}
    recipe["data"]["class_path"] = "dpo_lightning.data.SFTDataModule"
    cli = run(["fit", "--config", write_recipe(tmp_path / "sft.yaml", recipe)])
    module, dm = cli.model, cli.datamodule
    batch = dm.collator()([dm.train_dataset[i] for i in range(3)])
    module.eval()
    with torch.no_grad():
        loss, _ = module.step(batch, module.val_metrics)
        logits = module.policy(input_ids=batch["input_ids"]).logits.double()
    total, tokens = 0.0, 0
    for i in range(3):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["completion_mask"][i, t]:
                total -= torch.log_softmax(logits[i, t - 1], -1)[batch["input_ids"][i, t]].item()
                tokens += 1
    assert loss.item() == pytest.approx(total / tokens, rel=1e-5)
    assert (tmp_path / "export" / "model.safetensors").exists()


def save_tiny(tmp_path, name: str, seed: int, scale: float = 1.0) -> str:
    tok = load_tokenizer(ModelSpec(config=TINY_CONFIG, tokenizer=TOKENIZER_DIR))
    model = load_causal_lm(ModelSpec(config=dict(TINY_CONFIG), tokenizer=TOKENIZER_DIR, seed=seed), tok)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale)  # sharper next-token distributions
    model.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def exact_kl(policy, reference, prompt_ids: list[int], eos: int) -> float:
    """KL over completions of at most 2 tokens (stopping at EOS), by enumeration."""
    def next_logps(model, prefixes):
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=torch.tensor(prefixes)).logits[:, -1].double(), -1)

    p1, q1 = next_logps(policy, [prompt_ids])[0], next_logps(reference, [prompt_ids])[0]
    kl = (p1.exp() * (p1 - q1))[eos].item()
    firsts = [a for a in range(p1.shape[0]) if a != eos]
    p2 = next_logps(policy, [prompt_ids + [a] for a in firsts])
    q2 = next_logps(reference, [prompt_ids + [a] for a in firsts])
    for row, a in enumerate(firsts):
        inner = (p2[row].exp() * (p2[row] - q2[row])).sum().item()
        kl += p1[a].exp().item() * ((p1[a] - q1[a]).item() + inner)
    return kl


def test_kl_estimate_matches_exact_enumeration(tmp_path) -> None:
    policy_dir, reference_dir = save_tiny(tmp_path, "pi", 1, scale=40.0), save_tiny(tmp_path, "ref", 2, scale=1.0)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Review the lamp."}])
    result = evaluate_policy(policy_dir, reference_dir, prompts, samples_per_prompt=3000, max_new_tokens=2,
                             output=str(tmp_path / "r.json"))
    tok = load_tokenizer(ModelSpec(name_or_path=policy_dir))
    pi = load_causal_lm(ModelSpec(name_or_path=policy_dir), tok).eval()
    ref = load_causal_lm(ModelSpec(name_or_path=reference_dir), tok).eval()
    exact = exact_kl(pi, ref, [tok.bos_token_id] + tok("Review the lamp.", add_special_tokens=False)["input_ids"],
                     tok.eos_token_id)
    assert exact > 0.01  # two different models: a KL worth estimating
    assert result["kl_stderr"] < exact / 4  # precise enough to tell a wrong estimator apart
    assert abs(result["kl"] - exact) < 4 * result["kl_stderr"], (result, exact)
    assert json.loads((tmp_path / "r.json").read_text())["samples"] == 3000
    with pytest.raises(ValueError, match=r"^--reference is the policy itself"):
        evaluate_policy(policy_dir, policy_dir, prompts, samples_per_prompt=16, max_new_tokens=4)


def test_sequence_logprobs_of_samples_are_teacher_forced_sums(tmp_path) -> None:
    tok = load_tokenizer(ModelSpec(config=TINY_CONFIG, tokenizer=TOKENIZER_DIR))
    model = load_causal_lm(ModelSpec(config=dict(TINY_CONFIG), tokenizer=TOKENIZER_DIR, seed=4), tok).double().eval()
    prompt, completion = [1, 40, 41], [50, 51, 2]
    got = completion_logprobs(model, tok.pad_token_id, prompt, [completion, completion[:1]])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([prompt + completion])).logits[0], -1)
    expected = sum(logps[len(prompt) + t - 1, tok_id].item() for t, tok_id in enumerate(completion))
    assert got[0].item() == pytest.approx(expected, abs=1e-9)
    assert got[1].item() == pytest.approx(logps[len(prompt) - 1, 50].item(), abs=1e-9)


def length_score(text: str) -> float:
    return float(len(text))


def test_sample_pairs_writes_best_and_worst_with_scores(tmp_path) -> None:
    model_dir = save_tiny(tmp_path, "m", 3)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Review the lamp number {i}."} for i in range(5)])
    import sys

    sys.modules[__name__].length_score = length_score
    out = sample_pairs(model_dir, prompts, str(tmp_path / "pairs.jsonl"), scorer=f"{__name__}:length_score",
                       samples_per_prompt=4, max_new_tokens=6)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and len(rows) <= 5
    for r in rows:
        assert r["score_chosen"] == len(r["chosen"]) > r["score_rejected"] == len(r["rejected"])
        assert set(r) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    assert not math.isnan(rows[0]["score_chosen"])


def test_sample_pairs_all_writes_every_untied_pair_of_each_prompts_samples(tmp_path) -> None:
    model_dir = save_tiny(tmp_path, "m", 3)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Review the lamp number {i}."} for i in range(6)])
    import sys
    from collections import Counter

    sys.modules[__name__].length_score = length_score
    out = sample_pairs(model_dir, prompts, str(tmp_path / "pairs.jsonl"), scorer=f"{__name__}:length_score",
                       samples_per_prompt=5, max_new_tokens=6, pairs="all", save_samples=str(tmp_path / "s.jsonl"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(samples) == 30
    expected: Counter = Counter()  # every two samples of a prompt whose scores differ, the higher one chosen
    for start in range(0, 30, 5):
        group = samples[start : start + 5]
        for a in range(5):
            for b in range(a + 1, 5):
                hi, lo = sorted((group[a], group[b]), key=lambda s: -s["score"])
                if hi["score"] != lo["score"]:
                    expected[(hi["prompt"], hi["completion"], lo["completion"])] += 1
    assert 6 < sum(expected.values()) <= 60  # more than one pair per prompt, at most 10 each
    assert Counter((r["prompt"], r["chosen"], r["rejected"]) for r in rows) == expected
    for r in rows:
        assert r["score_chosen"] == len(r["chosen"]) > r["score_rejected"] == len(r["rejected"])
    with pytest.raises(ValueError, match="--pairs must be best_vs_worst or all"):
        sample_pairs(model_dir, prompts, str(tmp_path / "x.jsonl"), scorer=f"{__name__}:length_score", pairs="every")


def test_sample_pairs_with_a_label_temperature_draws_bradley_terry_orders(tmp_path) -> None:
    model_dir = save_tiny(tmp_path, "m", 3)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Review the lamp number {i}."} for i in range(40)])
    import sys

    sys.modules[__name__].length_score = length_score
    out = sample_pairs(model_dir, prompts, str(tmp_path / "pairs.jsonl"), scorer=f"{__name__}:length_score",
                       samples_per_prompt=4, max_new_tokens=6, label_temperature=1000.0)  # near coin flips
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 30
    for r in rows:  # the written scores stay the judge's, whichever side won
        assert (r["score_chosen"], r["score_rejected"]) == (len(r["chosen"]), len(r["rejected"]))
    inverted = sum(r["score_chosen"] < r["score_rejected"] for r in rows)
    assert 0.25 * len(rows) < inverted < 0.75 * len(rows)
    with pytest.raises(ValueError, match="--label_temperature must be a number > 0"):
        sample_pairs(model_dir, prompts, str(tmp_path / "x.jsonl"), scorer=f"{__name__}:length_score", label_temperature=0.0)
