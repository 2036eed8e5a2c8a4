"""Sample from a policy, score samples, build preference pairs, and measure reward against KL.

Two commands:

* ``dpo-lightning-sample-pairs``: sample ``k`` completions per prompt, score them, and write
  the best and the worst as a pair (or, with ``--pairs all``, every two samples whose scores
  differ) with ``score_chosen`` / ``score_rejected`` (for ODPO).
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

Sampling, judging and pairing are :mod:`dpo_lightning.generation`'s, as in online and iterative
training; a prompt is paired as ``sampling.pairs`` pairs it (``--pairs best_vs_worst``, the
default, or ``all``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .console import named_as_options, run_tool
from .data.collator import pad_sequences
from .data.formats import is_conversation
from .generation import (
    EXACT, PairMode, Samples, SamplingSpec, check_label_temperature, encode_prompt, generating_model, generation_seed, judge_and_pair, judge_samples, left_padded,
    sample_completions, stop_token_ids, text_pair_rows, write_jsonl,
)
from .export import REFERENCE_RECORD, read_reference_record
from .judges import JUDGE_KEY, FunctionJudge, Judge, PairwiseJudge, Prompt, Scorer, load_scorer
from .models import ModelSpec, load_causal_lm, load_tokenizer
from .modules.logprobs import LogProbSelector

#: sequences sampled together by ``evaluate_policy`` unless ``--batch_size`` says otherwise
EVALUATION_BATCH_SEQUENCES = 256
#: the scorer used when neither --scorer nor --judge is given
DEFAULT_SCORER = "dpo_lightning.experiments.sentiment:score"


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
    give_a_judge = {f"Set {JUDGE_KEY}.arguments to completion or prompt_completion":
                    f"Give it as --judge dpo_lightning.judges.FunctionJudge --judge.path {path} --judge.arguments "
                    "completion (or prompt_completion)"}
    with named_as_options({**judge_options(None), **give_a_judge}):
        return FunctionJudge(path)


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


# -- sampling and scoring ------------------------------------------------------------------------------
@dataclass
class PromptSamples:
    """``n`` completions of one prompt: token ids (each ending at its first EOS, if any) and text."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    texts: list[str]

    def as_samples(self, prompt: Prompt) -> Samples:
        """The same completions as the generation pipeline's :class:`~dpo_lightning.generation.Samples`."""
        n = len(self.texts)
        return Samples([self.prompt_ids], self.completion_ids, [True] * n, list(self.texts), [prompt], n)


def sample(
    model, tokenizer, prompt: Prompt, n: int, max_new_tokens: int, chat_template_kwargs: dict[str, Any] | None = None
) -> PromptSamples:
    """``n`` exact samples (temperature 1, no truncation of the distribution) for ``prompt``
    (a string, or a conversation rendered with the generation prompt), drawn from the caller's
    random stream (the commands seed it once with ``--seed``)."""
    ((_, samples),) = sample_prompts(model, tokenizer, [prompt], n, max_new_tokens, chat_template_kwargs)
    return samples


def sample_prompts(
    model, tokenizer, prompts: list[Prompt], n: int, max_new_tokens: int,
    chat_template_kwargs: dict[str, Any] | None = None, batch_size: int = 32,
) -> Iterator[tuple[Prompt, PromptSamples]]:
    """``(prompt, n exact samples)`` for every prompt in order, ``batch_size`` prompts (``B * n``
    sequences) per call of the sampling loop: each prompt's samples as :func:`sample` draws them
    (the same distribution; one seed drawn from the caller's stream per batch), at a fraction of
    the per-prompt overhead for small models."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch_size must be a positive integer (prompts per generation batch), got {batch_size!r}")
    stop_ids = stop_token_ids(model, tokenizer)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [encode_prompt(tokenizer, p, chat_template_kwargs, where="--prompts") for p in chunk]
        batch = {name: value.to(model.device) for name, value in left_padded(ids, tokenizer.pad_token_id).items()}
        out = sample_completions(model, tokenizer, {**batch, "prompt": chunk}, n, seed=None,
                                 max_new_tokens=max_new_tokens, stop_ids=stop_ids, **EXACT)
        for i, prompt in enumerate(chunk):
            rows = slice(i * n, (i + 1) * n)
            yield prompt, PromptSamples(ids[i], out.completion_ids[rows], out.texts[rows])


def judge_options(judge: Judge | PairwiseJudge | None) -> dict[str, str]:
    """The recipe key a judge's errors name (``model.init_args.judge.init_args.path``) and the
    command's option that set the judge: ``--judge`` when one was given, else ``--scorer``."""
    if judge is not None:
        return {JUDGE_KEY: "--judge"}
    return {f"{JUDGE_KEY}.path": "--scorer", JUDGE_KEY: "--scorer"}


def score_samples(judge: Judge | PairwiseJudge, prompt: Prompt, texts: list[str]) -> list[float]:
    """Each sample's score: the judge's, or with a pairwise judge the mean probability of
    beating the prompt's other samples (:func:`~dpo_lightning.generation.judge_samples`, as
    online training scores them)."""
    samples = PromptSamples([], [[]] * len(texts), list(texts)).as_samples(prompt)
    return judge_samples(judge, samples).double().tolist()


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


def evaluation_reference(policy: str, reference: str | None, trust_remote_code: bool = False) -> ModelSpec:
    """The reference ``policy`` is measured against: ``reference`` when given, else the one
    recorded beside the exported policy (printed, as ``validate`` does); one line naming
    ``--reference`` when there is none or it is the policy's own folder."""
    if reference is None:
        spec = read_reference_record(policy) if os.path.isdir(policy) else None
        if spec is None:
            raise ValueError(
                f"--reference: {policy!r} records no reference (reference.json, written when dpo-lightning "
                "exports a policy); give --reference, the model the policy was trained from"
            )
        print(f"reference: {spec.name_or_path or 'the from-config model'}, as recorded in "
              f"{os.path.join(policy, REFERENCE_RECORD)}")
        return spec
    if os.path.isdir(policy) and os.path.isdir(reference) and os.path.samefile(policy, reference):
        raise ValueError(
            f"--reference is the policy itself ({reference!r}): the KL would be 0 and say nothing; give the model "
            "the policy was trained from, or leave --reference out to use the one recorded beside it"
        )
    return ModelSpec(name_or_path=reference, trust_remote_code=trust_remote_code)


def _load(path: str, trust_remote_code: bool, option: str = "--policy"):
    """The causal LM and tokenizer at ``path``, errors naming the tool's ``option``."""
    spec = ModelSpec(name_or_path=path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(spec, option=option)
    return load_causal_lm(spec, tokenizer, option=option).eval(), tokenizer


def evaluate_policy(
    policy: str,
    reference: str | None,
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
    batch_size: int | None = None,
) -> dict[str, float]:
    """Mean score of the policy's samples and the Monte-Carlo sequence-level KL to the reference.

    Args:
        policy / reference: folders (or hub ids) of causal LMs sharing a tokenizer; ``reference``
            ``None``: the one recorded beside an exported policy (``reference.json``). The policy
            itself as its reference is refused (the KL would be 0 by construction).
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
        batch_size: prompts sampled together; ``None``: as many as make about 256 sequences
            (at least one prompt). The samples' distribution does not depend on it.
    Returns:
        ``{"reward", "reward_stderr", "kl", "kl_stderr", "samples"}``.
    """
    torch.manual_seed(seed)
    scoring = choose_judge(scorer, judge)
    judge_named = judge_options(judge)
    reference_spec = evaluation_reference(policy, reference, trust_remote_code)
    pi, tokenizer = _load(policy, trust_remote_code)
    ref = load_causal_lm(reference_spec, tokenizer, option="--reference" if reference is not None else None).eval()
    scoring.to(pi.device)
    rewards: list[float] = []
    log_ratios: list[float] = []
    saved: list[dict[str, Any]] = []
    prompt_list = read_prompts(prompts)
    if batch_size is None:
        batch_size = max(1, EVALUATION_BATCH_SEQUENCES // samples_per_prompt)
    batches = sample_prompts(pi, tokenizer, prompt_list, samples_per_prompt, max_new_tokens, chat_template_kwargs,
                             batch_size)
    for prompt, s in tqdm(batches, total=len(prompt_list), desc="evaluating", unit="prompt"):
        lp = completion_logprobs(pi, tokenizer.pad_token_id, s.prompt_ids, s.completion_ids)
        lr = completion_logprobs(ref, tokenizer.pad_token_id, s.prompt_ids, s.completion_ids)
        with named_as_options(judge_named):
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
    label_temperature: float | None = None,
    pairs: PairMode = "best_vs_worst",
    batch_size: int = 32,
) -> Path:
    """Sample completions per prompt, score them, and write preference pairs as JSON lines.

    Prompts whose samples all score the same give no pair; tied candidate pairs are counted in
    the printed line.
    Rows: ``prompt``, ``chosen``, ``rejected``, ``score_chosen``, ``score_rejected``; after a
    conversational prompt, ``chosen`` and ``rejected`` are one assistant message each.

    Args:
        scorer: ``module:function`` of the completion's text, or of (prompt, completion), to a
            float; default ``dpo_lightning.experiments.sentiment:score`` when ``judge`` is unset too.
        judge: a judge instead (``FunctionJudge``, ``RewardModelJudge``, or a pairwise judge:
            each sample's score is then its mean win probability against the prompt's other
            samples); not with ``scorer``.
        save_samples: also write every sample (``prompt``, ``completion``, ``score``) here.
        label_temperature: ``None``: the best sample is chosen. ``tau > 0``: Bradley-Terry labels,
            the best chosen over the worst with probability ``sigmoid((s_best - s_worst) / tau)``
            and rejected otherwise (:class:`~dpo_lightning.generation.SamplingSpec`); the
            written scores stay the judge's.
        pairs: ``"best_vs_worst"``: one pair per prompt, its best sample against its worst.
            ``"all"``: every two samples of a prompt whose scores differ, up to ``k (k - 1) / 2``
            pairs per prompt (each labelled on its own with ``label_temperature``), as
            ``sampling.pairs: all`` pairs them in online training
            (:func:`~dpo_lightning.generation.form_pairs`).
        batch_size: prompts sampled together (``batch_size * samples_per_prompt`` sequences a
            batch); the samples' distribution does not depend on it, their random draws do.
    """
    torch.manual_seed(seed)
    scoring = choose_judge(scorer, judge, pairwise=True)
    judge_named = judge_options(judge)
    model, tokenizer = _load(policy, trust_remote_code)
    scoring.to(model.device)
    rows, ties, saved = [], 0, []
    check_label_temperature(label_temperature, "--label_temperature")
    if pairs not in ("best_vs_worst", "all"):
        raise ValueError(f"--pairs must be best_vs_worst or all, got {pairs!r}")
    spec = SamplingSpec(num_samples=samples_per_prompt, pairs=pairs, max_new_tokens=max_new_tokens,
                        label_temperature=label_temperature)
    prompt_list = read_prompts(prompts)
    batches = sample_prompts(model, tokenizer, prompt_list, samples_per_prompt, max_new_tokens, chat_template_kwargs,
                             batch_size)
    for index, (prompt, s) in enumerate(tqdm(batches, total=len(prompt_list), desc="sampling pairs", unit="prompt")):
        with named_as_options(judge_named):
            judged = judge_and_pair(scoring, s.as_samples(prompt), spec, generation_seed(seed, index))
        scores = judged.scores.double().tolist()
        saved += [{"prompt": prompt, "completion": t, "score": r} for t, r in zip(s.texts, scores)]
        rows += text_pair_rows(judged)
        ties += judged.ties
    target = write_jsonl(output, rows)
    if save_samples:
        print(f"wrote {len(saved)} samples to {write_jsonl(save_samples, saved)}")
    skipped = "prompts skipped: all samples scored the same" if pairs == "best_vs_worst" else "tied pairs of samples skipped"
    print(f"wrote {len(rows)} pairs to {target} ({ties} {skipped})")
    return target


def main_evaluate() -> None:
    """Console-script entry point ``dpo-lightning-evaluate``: an error is one line on stderr
    and exit status 1 (:func:`~.console.run_tool`)."""
    run_tool(evaluate_policy)


def main_sample_pairs() -> None:
    """Console-script entry point ``dpo-lightning-sample-pairs``: an error is one line on stderr
    and exit status 1 (:func:`~.console.run_tool`)."""
    run_tool(sample_pairs)


__all__ = [
    "DEFAULT_SCORER", "PromptSamples", "Scorer", "choose_judge", "completion_logprobs", "encode_prompt",
    "evaluate_policy", "generating_model", "load_scorer", "main_evaluate", "main_sample_pairs", "mean_and_stderr",
    "read_prompts", "sample", "sample_pairs", "sample_prompts", "score_samples", "write_jsonl",
]
