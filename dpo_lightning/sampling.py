"""Sample from a policy, score samples, build preference pairs, and measure reward against KL.

Two commands:

* ``dpo-lightning-sample-pairs``: sample ``k`` completions per prompt, score them, and write
  the best and the worst as a pair with ``score_chosen`` / ``score_rejected`` (for ODPO).
* ``dpo-lightning-evaluate``: sample from a policy on held-out prompts and report the mean
  score and a Monte-Carlo estimate of the sequence-level ``KL(pi || pi_ref)``.

Prompts are a JSON-lines file with a ``prompt`` field: a string, or a conversation (a list of
``{"role", "content"}`` messages) that goes through the tokenizer's chat template with the
generation prompt, exactly as :class:`~dpo_lightning.data.PromptDataModule` encodes it for
online training (a string gets the tokenizer's leading special tokens once).

Scoring is a judge (:mod:`dpo_lightning.judges`): ``--scorer module:function`` names a
function of the completion's text, or of the prompt and the completion (read from its
signature; :class:`~dpo_lightning.judges.FunctionJudge`); ``--judge`` takes any judge class,
e.g. ``--judge dpo_lightning.judges.RewardModelJudge --judge.name_or_path outputs/reward_model/model``.
Sampling is exact ancestral sampling (temperature 1, no top-k / top-p, and no repetition
penalty or other processor a checkpoint's ``generation_config`` may switch on), which the KL
estimate needs: ``KL = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)]``, estimated by the mean over
samples, with its standard error. Each completion ends at its first EOS (the tokenizer's or
any of the ``generation_config``'s).

``--save_samples path.jsonl`` writes every scored sample, one a line: ``prompt``,
``completion``, ``score`` and, for ``evaluate``, ``log_ratio`` (``log pi(y|x) - log pi_ref(y|x)``,
the sample's term of the KL estimate), ``logp_policy`` and ``logp_reference``.

This module also holds the generation helpers the training-time samplers share
(:func:`stop_token_ids`, :func:`generating_model`, :func:`encode_prompt`).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data.collator import pad_sequences
from .data.formats import as_assistant_replies, is_conversation
from .data.tokenization import PairEncoder, TokenizationSettings
from .judges import JUDGE_KEY, FunctionJudge, Judge, PairwiseJudge, Prompt
from .models import ModelSpec, load_causal_lm, load_tokenizer
from .modules.logprobs import LogProbSelector

Scorer = Callable[[str], float]
#: the scorer used when neither --scorer nor --judge is given
DEFAULT_SCORER = "dpo_lightning.experiments.sentiment:score"


def load_scorer(path: str) -> Scorer:
    """Import ``module:function`` (or ``module.function``)."""
    module, _, name = path.replace(":", ".").rpartition(".")
    if not module:
        raise ValueError(f"--scorer {path!r}: give module:function, e.g. dpo_lightning.experiments.sentiment:score")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--scorer {path!r}: {module} has no function {name!r}")
    return fn


def choose_judge(scorer: str | None, judge: Judge | PairwiseJudge | None, pairwise: bool = False) -> Judge | PairwiseJudge:
    """The judge of a command: ``--judge`` as given, or ``--scorer`` as a
    :class:`~dpo_lightning.judges.FunctionJudge`, or the default scorer when neither is set.

    Raises:
        ValueError: both are set; the scorer cannot be loaded (naming ``--scorer``); a pairwise
            judge where only a pointwise one can be used (``pairwise=False``).
    """
    if scorer is not None and judge is not None:
        raise ValueError("give either --scorer or --judge, not both")
    if judge is not None:
        if not isinstance(judge, (Judge, PairwiseJudge)):
            raise TypeError(f"--judge must be a dpo_lightning.judges.Judge, got {type(judge).__name__}")
        if isinstance(judge, PairwiseJudge) and not pairwise:
            raise ValueError(
                f"--judge {type(judge).__name__} compares two completions; this command needs a score for each "
                "sample (a Judge: FunctionJudge, RewardModelJudge)"
            )
        return judge
    path = scorer if scorer is not None else DEFAULT_SCORER
    try:
        return FunctionJudge(path)
    except ValueError as err:
        message = str(err).replace(
            f"Set {JUDGE_KEY}.arguments to completion or prompt_completion",
            f"Give it as --judge dpo_lightning.judges.FunctionJudge --judge.path {path} --judge.arguments "
            "completion (or prompt_completion)",
        )
        raise ValueError(message.replace(f"{JUDGE_KEY}.path", "--scorer").replace(JUDGE_KEY, "--scorer")) from err


def read_prompts(path: str) -> list[Prompt]:
    """The ``prompt`` field of every line of a JSON-lines file: strings or conversations."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not (isinstance(prompt, str) or is_conversation(prompt)):
            raise ValueError(
                f"--prompts {path}: row {i} has no 'prompt' that is a string or a conversation "
                f"(a list of {{role, content}} messages); got {prompt!r:.200}"
            )
    return [r["prompt"] for r in rows]


# -- generation helpers shared with training-time samplers -----------------------------------------
def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS, then any other EOS of the model's ``generation_config``."""
    ids = [int(tokenizer.eos_token_id)]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, (list, tuple)) else [configured]:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return ids


def generating_model(module: Any, what: str) -> torch.nn.Module:
    """The network a training module trains, checked to be a generating causal LM.

    Args:
        module: a training module (:class:`~dpo_lightning.modules.AlignmentModule`: its
            ``trained_model()``), or a model.
        what: who asks, named in the error (e.g. ``"LogCompletions"``).
    Raises:
        TypeError: the module trains no causal LM (a reward model, ``RewardModule``).
    """
    model = module.trained_model() if hasattr(module, "trained_model") else module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    can_generate = getattr(base, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        raise TypeError(
            f"{what} samples completions from the policy, but {type(module).__name__} trains "
            f"{type(base).__name__}, which does not generate (a reward model has no policy). Use it with "
            "PreferenceModule, SFTModule or OnlinePreferenceModule"
        )
    return model


def encode_prompt(
    tokenizer: Any, prompt: Prompt, chat_template_kwargs: dict[str, Any] | None = None, where: str = "prompt"
) -> list[int]:
    """Token ids of one prompt as online training encodes it
    (:class:`~dpo_lightning.data.PromptEncoder`'s rules, not truncated): a string gets the
    tokenizer's leading special tokens once; a conversation is rendered through the chat
    template with the generation prompt.

    Raises:
        ValueError: naming ``where``, when the prompt cannot be encoded (a template that raises,
            a tokenizer without a chat template, an empty prompt).
    """
    encoder = PairEncoder(tokenizer, TokenizationSettings(max_length=10**9), chat_template_kwargs=chat_template_kwargs)
    encoded = encoder.encode(prompt, [])
    if isinstance(encoded, str):
        detail = getattr(encoded, "detail", "")
        raise ValueError(f"{where}: cannot encode {prompt!r:.200} ({encoded}{': ' + detail if detail else ''})")
    return encoded[0]


def pair_row(prompt: Prompt, chosen: str, rejected: str, score_chosen: float, score_rejected: float) -> dict[str, Any]:
    """One preference row in the data modules' format; after a conversational prompt the
    completions are written as one assistant message each."""
    if isinstance(prompt, list):
        (chosen_out, rejected_out) = as_assistant_replies([chosen, rejected])
        return {"prompt": prompt, "chosen": chosen_out, "rejected": rejected_out,
                "score_chosen": score_chosen, "score_rejected": score_rejected}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines (parent folders created); return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


# -- sampling and scoring ------------------------------------------------------------------------------
@dataclass
class Samples:
    """``n`` completions of one prompt: token ids (each ending at its first EOS, if any) and text."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    texts: list[str]


@torch.no_grad()
def sample(
    model, tokenizer, prompt: Prompt, n: int, max_new_tokens: int, chat_template_kwargs: dict[str, Any] | None = None
) -> Samples:
    """``n`` exact samples (temperature 1, no truncation of the distribution) for ``prompt``
    (a string, or a conversation rendered with the generation prompt)."""
    prompt_ids = encode_prompt(tokenizer, prompt, chat_template_kwargs, where="--prompts")
    stops = stop_token_ids(model, tokenizer)
    input_ids = torch.tensor([prompt_ids] * n, device=model.device)
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=1.0,
        top_k=0, top_p=1.0, repetition_penalty=1.0, typical_p=1.0, min_p=0.0, no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
    )
    completions = []
    for row in out[:, len(prompt_ids) :].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        completions.append(row if end is None else row[: end + 1])
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Samples(prompt_ids, completions, texts)


def score_samples(judge: Judge | PairwiseJudge, prompt: Prompt, texts: list[str]) -> list[float]:
    """Each sample's score: the judge's, or with a pairwise judge the mean probability of
    beating the prompt's other samples (as online training scores them)."""
    if isinstance(judge, PairwiseJudge):
        from .modules.online import OnlineSamples, pairwise_win_rates

        samples = OnlineSamples([[]], [[]] * len(texts), [True] * len(texts), list(texts), [prompt], len(texts))
        return pairwise_win_rates(judge, samples).double().tolist()
    scores = judge.score([prompt] * len(texts), texts)
    if tuple(scores.shape) != (len(texts),):
        raise ValueError(f"the judge returned scores of shape {tuple(scores.shape)} for {len(texts)} completions")
    return scores.double().tolist()


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
    scorer: str | None = None,
    judge: Judge | None = None,
    samples_per_prompt: int = 8,
    max_new_tokens: int = 32,
    seed: int = 0,
    output: str | None = None,
    save_samples: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """Mean score of the policy's samples and the Monte-Carlo sequence-level KL to the reference.

    Args:
        policy / reference: folders (or hub ids) of causal LMs sharing a tokenizer.
        prompts: JSON-lines file with a ``prompt`` field (a string or a conversation).
        scorer: ``module:function`` of the completion's text, or of (prompt, completion), to a
            float; default ``dpo_lightning.experiments.sentiment:score`` when ``judge`` is unset too.
        judge: a pointwise judge instead (e.g. ``RewardModelJudge``); not with ``scorer``.
        samples_per_prompt: completions drawn per prompt; the KL and reward are averaged over all
            ``len(prompts) * samples_per_prompt`` samples.
        max_new_tokens: sampling stops at EOS or after this many tokens.
        seed: torch seed for sampling.
        output: also write the result as JSON here.
        save_samples: also write every sample here as JSON lines: ``prompt``, ``completion``,
            ``score``, ``log_ratio``, ``logp_policy``, ``logp_reference``.
        chat_template_kwargs: extra variables for the chat template (conversational prompts).
    Returns:
        ``{"reward", "reward_stderr", "kl", "kl_stderr", "samples"}``.
    """
    torch.manual_seed(seed)
    scoring = choose_judge(scorer, judge)
    pi, tokenizer = _load(policy, trust_remote_code)
    ref, _ = _load(reference, trust_remote_code)
    scoring.to(pi.device)
    rewards: list[float] = []
    log_ratios: list[float] = []
    saved: list[dict[str, Any]] = []
    for prompt in tqdm(read_prompts(prompts), desc="evaluating", unit="prompt"):
        s = sample(pi, tokenizer, prompt, samples_per_prompt, max_new_tokens, chat_template_kwargs)
        lp = completion_logprobs(pi, tokenizer.pad_token_id, s.prompt_ids, s.completion_ids)
        lr = completion_logprobs(ref, tokenizer.pad_token_id, s.prompt_ids, s.completion_ids)
        scores = score_samples(scoring, prompt, s.texts)
        log_ratios += (lp - lr).tolist()
        rewards += scores
        if save_samples:
            saved += [
                {"prompt": prompt, "completion": t, "score": r, "log_ratio": float(a - b), "logp_policy": float(a),
                 "logp_reference": float(b)}
                for t, r, a, b in zip(s.texts, scores, lp.tolist(), lr.tolist())
            ]
    reward, reward_se = mean_and_stderr(rewards)
    kl, kl_se = mean_and_stderr(log_ratios)
    result = {"reward": reward, "reward_stderr": reward_se, "kl": kl, "kl_stderr": kl_se, "samples": len(rewards)}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
    if save_samples:
        print(f"wrote {len(saved)} samples to {write_jsonl(save_samples, saved)}")
    print(f"reward {reward:.4f} ± {reward_se:.4f}   KL {kl:.4f} ± {kl_se:.4f} nats   ({len(rewards)} samples)")
    return result


def sample_pairs(
    policy: str,
    prompts: str,
    output: str,
    scorer: str | None = None,
    judge: Judge | PairwiseJudge | None = None,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 32,
    seed: int = 0,
    save_samples: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Sample completions per prompt, score them, and write (best, worst) pairs as JSON lines.

    Prompts whose samples all score the same give no pair and are counted in the printed line.
    Rows: ``prompt``, ``chosen``, ``rejected``, ``score_chosen``, ``score_rejected``; after a
    conversational prompt, ``chosen`` and ``rejected`` are one assistant message each.

    Args:
        scorer: ``module:function`` of the completion's text, or of (prompt, completion), to a
            float; default ``dpo_lightning.experiments.sentiment:score`` when ``judge`` is unset too.
        judge: a judge instead (``FunctionJudge``, ``RewardModelJudge``, or a pairwise judge:
            each sample's score is then its mean win probability against the prompt's other
            samples); not with ``scorer``.
        save_samples: also write every sample (``prompt``, ``completion``, ``score``) here.
    """
    torch.manual_seed(seed)
    scoring = choose_judge(scorer, judge, pairwise=True)
    model, tokenizer = _load(policy, trust_remote_code)
    scoring.to(model.device)
    rows, ties, saved = [], 0, []
    for prompt in tqdm(read_prompts(prompts), desc="sampling pairs", unit="prompt"):
        s = sample(model, tokenizer, prompt, samples_per_prompt, max_new_tokens, chat_template_kwargs)
        scores = score_samples(scoring, prompt, s.texts)
        saved += [{"prompt": prompt, "completion": t, "score": r} for t, r in zip(s.texts, scores)]
        scored = sorted(zip(scores, s.texts), key=lambda x: x[0])
        (low, worst), (high, best) = scored[0], scored[-1]
        if high <= low or best == worst:
            ties += 1
            continue
        rows.append(pair_row(prompt, best, worst, high, low))
    target = write_jsonl(output, rows)
    if save_samples:
        print(f"wrote {len(saved)} samples to {write_jsonl(save_samples, saved)}")
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
