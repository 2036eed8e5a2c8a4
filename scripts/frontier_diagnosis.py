"""Where a policy's KL from the SFT model goes, in the controlled-sentiment experiment.

    .venv/bin/python scripts/frontier_diagnosis.py                  # the seed-0 runs of outputs/frontier
    .venv/bin/python scripts/frontier_diagnosis.py POLICY [POLICY ...] --reference outputs/frontier/sft

``scripts/sentiment_frontier.py`` calls :func:`diagnose` on its seed-0 policies and writes
``docs/frontier_kl_split.csv``. For each policy: ``samples_per_prompt`` samples on each held-out
prompt (exact sampling), and for every sampled position the exact KL between the policy's and the
reference's next-token distributions, ``sum_v pi(v|prefix) log(pi(v|prefix) / pi_sft(v|prefix))``.
Summed over a sample's positions this is an unbiased estimate of the sequence-level
``KL(pi || pi_sft)`` (the chain rule; lower variance than the sampled log-ratio that
``dpo-lightning-evaluate`` reports). Each position is put in one of three groups by the token that
was sampled there:

* ``sentiment``: the token is part of a sentiment word (dpo_lightning.experiments.sentiment's
  POSITIVE or NEGATIVE lists): where the reward is decided;
* ``eos``: the end-of-sequence token (where the review stops);
* ``other``: everything else: the review's template, the product, broken words.

A KL-optimal policy for this reward (``pi_sft exp(r / beta) / Z``) changes only which sentiment
word fills a slot (and slightly which template: the 2-slot one is easier to make all positive),
so nearly all of its KL sits on ``sentiment`` positions. KL on ``other`` positions buys no
reward: it is spent on changing the language itself.

Also per policy: the share of samples that are a review template word for word (``wellformed``),
the share of sentiment slots of those holding a negative word (``negative_slots``), the mean
reward per product (its spread: do the failures concentrate on some products?), and the mean
completion length and EOS share.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

_WORD = re.compile(r"[a-z]+")


def load(path: str):
    from dpo_lightning.models import ModelSpec, load_causal_lm, load_tokenizer

    spec = ModelSpec(name_or_path=path)
    tokenizer = load_tokenizer(spec)
    return load_causal_lm(spec, tokenizer).eval(), tokenizer


def sentiment_spans(text: str) -> list[tuple[int, int]]:
    from dpo_lightning.experiments import sentiment

    lower = text.lower()
    return [m.span() for m in _WORD.finditer(lower) if m.group() in sentiment._POS or m.group() in sentiment._NEG]


def token_groups(tokenizer, completion: list[int], eos_ids: set[int]) -> list[str]:
    """``sentiment`` / ``eos`` / ``other`` for each token of a completion (see the module docstring)."""
    text = tokenizer.decode(completion, skip_special_tokens=True)
    spans = sentiment_spans(text)
    groups, previous = [], 0
    for i, token in enumerate(completion):
        if token in eos_ids:
            groups.append("eos")
            continue
        end = len(tokenizer.decode(completion[: i + 1], skip_special_tokens=True))
        start, previous = previous, end
        groups.append("sentiment" if any(s < end and start < e for s, e in spans) else "other")
    return groups


@torch.no_grad()
def position_kl(policy, reference, pad_token_id: int, prompt_ids: list[int], completions: list[list[int]]) -> list[list[float]]:
    """Exact KL(pi(.|prefix) || pi_ref(.|prefix)) at every completion position of every completion."""
    from dpo_lightning.data.collator import pad_sequences

    batch = pad_sequences([prompt_ids] * len(completions), completions, pad_token_id)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logp = torch.log_softmax(policy(**kwargs).logits.double(), -1)
    logq = torch.log_softmax(reference(**kwargs).logits.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (n, T): position t predicts token t + 1
    start = len(prompt_ids) - 1
    return [kl[i, start : start + len(c)].tolist() for i, c in enumerate(completions)]


def diagnose(policy_dir: str, reference_dir: str, prompts: str, samples_per_prompt: int = 16,
             max_new_tokens: int = 32, seed: int = 0) -> dict[str, Any]:
    """The KL split, the sample breakdown and the per-product rewards of one policy (see the module docstring)."""
    from dpo_lightning.experiments import sentiment
    from dpo_lightning.sampling import read_prompts, sample
    from sentiment_frontier import sample_breakdown

    torch.manual_seed(seed)
    policy, tokenizer = load(policy_dir)
    reference, _ = load(reference_dir)
    eos_ids = {int(tokenizer.eos_token_id)}
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    rows, lengths, eos, per_product = [], [], [], defaultdict(list)
    for prompt in read_prompts(prompts):
        s = sample(policy, tokenizer, prompt, samples_per_prompt, max_new_tokens)
        kls = position_kl(policy, reference, tokenizer.pad_token_id, s.prompt_ids, s.completion_ids)
        product = next(p for p in sentiment.PRODUCTS if re.search(rf"\b{p}\b", str(prompt)))
        for completion, text, kl in zip(s.completion_ids, s.texts, kls):
            for group, value in zip(token_groups(tokenizer, completion, eos_ids), kl):
                totals[group] += value
                counts[group] += 1
            score = sentiment.score(text)
            rows.append({"completion": text, "score": score})
            per_product[product].append(score)
            lengths.append(len(completion))
            eos.append(any(t in eos_ids for t in completion))
    n = len(rows)
    kl_total = sum(totals.values()) / n
    products = {p: sum(v) / len(v) for p, v in per_product.items()}
    result = {
        "samples": n,
        "reward": sum(r["score"] for r in rows) / n,
        "kl_exact": kl_total,
        **{f"kl_{g}": totals[g] / n for g in ("sentiment", "eos", "other")},
        "kl_sentiment_share": totals["sentiment"] / max(sum(totals.values()), 1e-12),
        "tokens_sentiment": counts["sentiment"] / n,
        "tokens_other": counts["other"] / n,
        "length": sum(lengths) / n,
        "eos": sum(eos) / n,
        **sample_breakdown(rows),
        "product_reward_min": min(products.values()),
        "product_reward_max": max(products.values()),
        "worst_product": min(products, key=products.get),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policies", nargs="*", help="policy folders (default: the seed-0 runs of outputs/frontier)")
    parser.add_argument("--reference", default=str(ROOT / "outputs" / "frontier" / "sft"))
    parser.add_argument("--prompts", default=str(ROOT / "data" / "sentiment" / "eval_prompts.jsonl"))
    parser.add_argument("--samples-per-prompt", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    policies = args.policies or [str(args.reference)] + sorted(
        str(p) for p in (ROOT / "outputs" / "frontier" / "policies").glob("*_seed0"))
    for policy in policies:
        result = diagnose(policy, args.reference, args.prompts, args.samples_per_prompt, seed=args.seed)
        print(json.dumps({"policy": policy, **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}}))


if __name__ == "__main__":
    main()
