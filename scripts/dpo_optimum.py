"""How far each loss ends from the KL-regularised optimum on Bradley-Terry-labelled pairs, in the
enumerable setting of tests/test_dpo_optimum.py (printed, not asserted).

    .venv/bin/python scripts/dpo_optimum.py              # 3 pair seeds, about 8 CPU minutes
    .venv/bin/python scripts/dpo_optimum.py --seeds 1

Setting: a randomly initialised tiny Llama is pi_ref; for each of 2 prompts, the 8 completions
of dpo_lightning.experiments.enumerable (rewards 0, 1/3, 2/3, 1); 2000 pairs a prompt drawn
from pi_ref over that set and labelled by a Bradley-Terry labeller of temperature tau = 0.25,
P(y1 preferred) = sigmoid((r1 - r2) / tau). DPO at beta then has pi* at beta * tau as its exact
optimum (dpo_lightning.experiments.bradley_terry). Every loss trains through
dpo_lightning.train on the same pairs (KTO: chosen replies desirable, rejected undesirable),
3 epochs, batch 64, lr 1e-3 (KTO's batches mix the prompts). Per loss: the mean over the prompts of its reward and KL on the
completion set (the policy conditioned on answering within it, exactly), against pi* at
beta * tau = 0.25, and its regret: pi*'s reward at the policy's own KL minus the policy's
reward (how far below the frontier it lies, whatever beta it aims at); ``BT fit`` is the
Bradley-Terry maximum-likelihood policy of the same pairs.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
               "tie_word_embeddings": True}
PROMPTS = {"Review the lamp.": "lamp", "What do you think of this kettle?": "kettle"}
TAU, PAIRS_PER_PROMPT, MODEL_SEED = 0.25, 2000, 3


def losses() -> list[tuple[str, Any, float]]:
    """(label, loss, the beta whose pi* the row is compared with)."""
    from dpo_lightning.losses import DPOLoss, IPOLoss, KTOLoss, ODPOLoss

    return [
        ("DPO beta 1", DPOLoss(beta=1.0), TAU),
        ("DPO beta 0.25 (= tau)", DPOLoss(beta=0.25), TAU * 0.25),
        ("IPO beta 1", IPOLoss(beta=1.0), TAU),
        ("IPO beta 2", IPOLoss(beta=2.0), TAU),
        ("ODPO beta 1, alpha 1", ODPOLoss(beta=1.0, alpha=1.0), TAU),
        ("KTO beta 1", KTOLoss(beta=1.0), TAU),
    ]


def build_world(folder: Path, seed: int) -> tuple[str, Any, dict, list[dict]]:
    """The reference model (saved), its tokenizer, per prompt (texts, rewards, ref log-probs,
    chosen, rejected), and the shuffled pair rows (with reward scores, for ODPO)."""
    from dpo_lightning.experiments import bradley_terry, enumerable
    from dpo_lightning.models import ModelSpec, load_causal_lm, load_tokenizer

    tok = load_tokenizer(ModelSpec(config=TINY_CONFIG, tokenizer=str(ROOT / "data" / "tokenizer")))
    model = load_causal_lm(ModelSpec(config=dict(TINY_CONFIG), tokenizer=str(ROOT / "data" / "tokenizer"),
                                     seed=MODEL_SEED), tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    world, rows = {}, []
    for prompt, product in PROMPTS.items():
        texts = enumerable.completions(product)
        rewards = enumerable.rewards(texts)
        ref = enumerable.set_logprobs(model, tok, prompt, texts)
        chosen, rejected = bradley_terry.sample_pairs(ref, rewards, TAU, PAIRS_PER_PROMPT, g)
        world[prompt] = (texts, rewards, ref, chosen, rejected)
        rows += [{"prompt": prompt, "chosen": texts[c], "rejected": texts[r], "score_chosen": float(rewards[c]),
                  "score_rejected": float(rewards[r])} for c, r in zip(chosen.tolist(), rejected.tolist())]
    random.Random(seed).shuffle(rows)
    return str(folder), tok, world, rows


def point(world: dict, logprobs_of) -> tuple[float, float]:
    """Mean over prompts of (reward, KL to pi_ref) of the set distributions ``logprobs_of(prompt, ...)``."""
    from dpo_lightning.experiments import optimum

    pts = []
    for prompt, (texts, rewards, ref, chosen, rejected) in world.items():
        logprobs = logprobs_of(prompt, texts, rewards, ref, chosen, rejected)
        pts.append((optimum.expected_reward(logprobs, rewards), optimum.kl_divergence(logprobs, ref)))
    return sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)


def optimum_reward_at(world: dict, kl: float) -> float:
    """pi*'s mean reward over the prompts at mean KL ``kl`` (one beta for all prompts, by
    bisection on log beta): the frontier a policy at that KL is measured against."""
    from dpo_lightning.experiments import optimum

    lo, hi = math.log(1e-3), math.log(1e3)
    for _ in range(100):
        beta = math.exp((lo + hi) / 2)
        if point(world, lambda p, t, r, ref, c, rj: optimum.optimal_logprobs(ref, r, beta))[1] > kl:
            lo = math.log(beta)
        else:
            hi = math.log(beta)
    return point(world, lambda p, t, r, ref, c, rj: optimum.optimal_logprobs(ref, r, math.exp((lo + hi) / 2)))[0]


def run_seed(seed: int, out: Path) -> list[dict[str, Any]]:
    from dpo_lightning import train
    from dpo_lightning.experiments import bradley_terry, enumerable, optimum

    reference_dir, tok, world, rows = build_world(out / f"ref{seed}", seed)
    results = []
    for beta in sorted({b for _, _, b in losses()}, reverse=True):
        reward, kl = point(world, lambda p, t, r, ref, c, rj: optimum.optimal_logprobs(ref, r, beta))
        results.append({"seed": seed, "label": f"pi* at {beta:g}", "reward": reward, "kl": kl, "target": beta})
    reward, kl = point(world, lambda p, t, r, ref, c, rj: optimum.normalised(ref + bradley_terry.fit_scores(c, rj, len(t))))
    results.append({"seed": seed, "label": "BT fit (pi* of the pairs)", "reward": reward, "kl": kl, "target": TAU})
    for label, loss, target in losses():
        torch.manual_seed(seed)
        # KTO's KL rows pair a completion with another prompt's: batches must mix the two prompts,
        # which grouping by length (the prompts differ in length) would keep apart
        data_args = {"group_by_length": False} if label.startswith("KTO") else None
        run = train(reference_dir, rows, loss=loss, lr=1e-3, batch_size=64, max_epochs=3, data_args=data_args,
                    output_dir=out / f"{label}_{seed}".replace(" ", "_"), accelerator="cpu", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        policy = run.module.policy
        reward, kl = point(world, lambda p, t, r, ref, c, rj: enumerable.set_logprobs(policy, tok, p, t))
        results.append({"seed": seed, "label": label, "reward": reward, "kl": kl, "target": target,
                        "regret": optimum_reward_at(world, kl) - reward})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="pair seeds (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.argv = sys.argv[:1]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for s in range(args.seeds) for r in run_seed(s, Path(tmp))]
    stars = {(r["seed"], r["target"]): r for r in rows if r["label"].startswith("pi*")}
    print(f"\n{args.seeds} pair seeds; mean (min..max over seeds); reward gap and KL ratio against pi* at the target beta")
    print(f"{'policy':<28}{'target':>7}{'reward':>22}{'KL (nats)':>22}{'reward - pi*':>22}{'KL / pi*':>22}"
          f"{'regret at own KL':>22}")
    for label in dict.fromkeys(r["label"] for r in rows):
        group = [r for r in rows if r["label"] == label]
        gap = [r["reward"] - stars[(r["seed"], r["target"])]["reward"] for r in group]
        ratio = [r["kl"] / stars[(r["seed"], r["target"])]["kl"] for r in group]
        cell = lambda v: f"{sum(v) / len(v):.3f} ({min(v):.3f}..{max(v):.3f})"
        print(f"{label:<28}{group[0]['target']:>7g}{cell([r['reward'] for r in group]):>22}"
              f"{cell([r['kl'] for r in group]):>22}{cell(gap):>22}{cell(ratio):>22}"
              + (f"{cell([r['regret'] for r in group]):>22}" if "regret" in group[0] else ""))


if __name__ == "__main__":
    main()
