"""Sample from a policy, score samples, build preference pairs, and measure reward against KL.

Two commands:

* ``dpo-lightning-sample-pairs``: sample ``k`` completions per prompt, score them, and write
  the best and the worst as a pair with ``score_chosen`` / ``score_rejected`` (for ODPO).
* ``dpo-lightning-evaluate``: sample from a policy on held-out prompts and report the mean
  score and a Monte-Carlo estimate of the sequence-level ``KL(pi || pi_ref)``.

A scorer is any function ``str -> float`` named as ``module:function`` (or ``module.function``).
Sampling is exact ancestral sampling (temperature 1, no top-k / top-p), which the KL estimate
needs: ``KL = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)]``, estimated by the mean over samples,
with its standard error.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data.collator import pad_sequences
from .data.tokenization import PairEncoder, TokenizationSettings
from .models import ModelSpec, load_causal_lm, load_tokenizer
from .modules.logprobs import LogProbSelector

Scorer = Callable[[str], float]


def load_scorer(path: str) -> Scorer:
    """Import ``module:function`` (or ``module.function``)."""
    module, _, name = path.replace(":", ".").rpartition(".")
    if not module:
        raise ValueError(f"--scorer {path!r}: give module:function, e.g. dpo_lightning.experiments.sentiment:score")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--scorer {path!r}: {module} has no function {name!r}")
    return fn


def read_prompts(path: str) -> list[str]:
    """The ``prompt`` field of every line of a JSON-lines file."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"--prompts {path}: row {i} has no string 'prompt'")
    return [r["prompt"] for r in rows]


@dataclass
class Samples:
    """``n`` completions of one prompt: token ids (each ending at its first EOS, if any) and text."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    texts: list[str]


@torch.no_grad()
def sample(model, tokenizer, prompt: str, n: int, max_new_tokens: int) -> Samples:
    """``n`` exact samples (temperature 1, no truncation of the distribution) for ``prompt``."""
    encoder = PairEncoder(tokenizer, TokenizationSettings(max_length=10**9))
    prompt_ids = encoder.encode_prompt(prompt)
    input_ids = torch.tensor([prompt_ids] * n, device=model.device)
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=1.0,
        top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    completions = []
    for row in out[:, len(prompt_ids) :].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        completions.append(row)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Samples(prompt_ids, completions, texts)


@torch.no_grad()
def completion_logprobs(model, pad_token_id: int, prompt_ids: list[int], completions: list[list[int]]) -> Tensor:
    """``(n,)`` ``log p(y | x)`` of each completion under ``model`` (teacher forcing), by the same
    log-prob path as training (:class:`~dpo_lightning.modules.LogProbSelector`)."""
    batch = pad_sequences([prompt_ids] * len(completions), completions, pad_token_id)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    return LogProbSelector()(model, batch).sums.double().cpu()


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def _load(path: str, trust_remote_code: bool):
    spec = ModelSpec(name_or_path=path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(spec)
    return load_causal_lm(spec, tokenizer).eval(), tokenizer


def evaluate_policy(
    policy: str,
    reference: str,
    prompts: str,
    scorer: str = "dpo_lightning.experiments.sentiment:score",
    samples_per_prompt: int = 8,
    max_new_tokens: int = 32,
    seed: int = 0,
    output: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """Mean score of the policy's samples and the Monte-Carlo sequence-level KL to the reference.

    Args:
        policy / reference: folders (or hub ids) of causal LMs sharing a tokenizer.
        prompts: JSON-lines file with a ``prompt`` field.
        scorer: ``module:function`` mapping a completion's text to a float.
        samples_per_prompt: completions drawn per prompt; the KL and reward are averaged over all
            ``len(prompts) * samples_per_prompt`` samples.
        max_new_tokens: sampling stops at EOS or after this many tokens.
        seed: torch seed for sampling.
        output: also write the result as JSON here.
    Returns:
        ``{"reward", "reward_stderr", "kl", "kl_stderr", "samples"}``.
    """
    torch.manual_seed(seed)
    score = load_scorer(scorer)
    pi, tokenizer = _load(policy, trust_remote_code)
    ref, _ = _load(reference, trust_remote_code)
    rewards: list[float] = []
    log_ratios: list[float] = []
    for text in tqdm(read_prompts(prompts), desc="evaluating", unit="prompt"):
        s = sample(pi, tokenizer, text, samples_per_prompt, max_new_tokens)
        lp = completion_logprobs(pi, tokenizer.pad_token_id, s.prompt_ids, s.completion_ids)
        lr = completion_logprobs(ref, tokenizer.pad_token_id, s.prompt_ids, s.completion_ids)
        log_ratios += (lp - lr).tolist()
        rewards += [float(score(t)) for t in s.texts]
    reward, reward_se = mean_and_stderr(rewards)
    kl, kl_se = mean_and_stderr(log_ratios)
    result = {"reward": reward, "reward_stderr": reward_se, "kl": kl, "kl_stderr": kl_se, "samples": len(rewards)}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
    print(f"reward {reward:.4f} ± {reward_se:.4f}   KL {kl:.4f} ± {kl_se:.4f} nats   ({len(rewards)} samples)")
    return result


def sample_pairs(
    policy: str,
    prompts: str,
    output: str,
    scorer: str = "dpo_lightning.experiments.sentiment:score",
    samples_per_prompt: int = 4,
    max_new_tokens: int = 32,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> Path:
    """Sample completions per prompt, score them, and write (best, worst) pairs as JSON lines.

    Prompts whose samples all score the same give no pair and are counted in the printed line.
    Rows: ``prompt``, ``chosen``, ``rejected``, ``score_chosen``, ``score_rejected``.
    """
    torch.manual_seed(seed)
    score = load_scorer(scorer)
    model, tokenizer = _load(policy, trust_remote_code)
    rows, ties = [], 0
    for text in tqdm(read_prompts(prompts), desc="sampling pairs", unit="prompt"):
        s = sample(model, tokenizer, text, samples_per_prompt, max_new_tokens)
        scored = sorted(zip((float(score(t)) for t in s.texts), s.texts), key=lambda x: x[0])
        (low, worst), (high, best) = scored[0], scored[-1]
        if high <= low or best == worst:
            ties += 1
            continue
        rows.append({"prompt": text, "chosen": best, "rejected": worst, "score_chosen": high, "score_rejected": low})
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {target} ({ties} prompts skipped: all samples scored the same)")
    return target


def main_evaluate() -> None:
    """Console-script entry point ``dpo-lightning-evaluate``."""
    from jsonargparse import auto_cli

    auto_cli(evaluate_policy, as_positional=False)


def main_sample_pairs() -> None:
    """Console-script entry point ``dpo-lightning-sample-pairs``."""
    from jsonargparse import auto_cli

    auto_cli(sample_pairs, as_positional=False)
