"""Generation: sample from a policy -> cut at EOS -> judge -> pair, one pipeline for online
training (:class:`~dpo_lightning.modules.OnlinePreferenceModule`), iterative rounds
(:class:`~dpo_lightning.iterative.IterativePairsDataModule`), the sampling commands
(:mod:`dpo_lightning.sampling`) and :class:`~dpo_lightning.callbacks.LogCompletions`.

* :class:`SamplingSpec`: the ``sampling:`` block of a recipe (samples per prompt, pairing rule,
  ``max_new_tokens``, temperature / top-p / top-k, missing-EOS penalty, seed);
* :func:`sample_completions`: ``k`` completions per prompt of a left-padded ``PROMPTS`` batch,
  each cut at its first EOS (:func:`cut_at_eos`) -> :class:`Samples`;
* :func:`judge_samples`: the one judge dispatch (pointwise scores, or a pairwise judge's mean win
  rates), with non-finite scores and errors inside a judge refused in one line naming the judge,
  the prompt and the value;
* :func:`form_pairs`: pairs from the scores; :func:`pair_rows` / :func:`build_pair_batch`: the
  pairs as ``PairCollator`` rows / a ``PAIRS`` batch; :func:`text_pair_rows`: as a preference
  dataset's rows.

This module sits below ``modules/``: it imports data and judges, never a training module.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .data.collator import PairCollator, pad_sequences
from .data.formats import as_assistant_replies
from .data.tokenization import PairEncoder, TokenizationSettings
from .decoding import base_model, can_decode, decode
from .judges import Judge, JudgeError, PairwiseJudge, Prompt

PairMode = Literal["best_vs_worst", "all"]
#: how completions are sampled (see :class:`SamplingSpec`)
Engine = Literal["auto", "generate"]
ENGINES = ("auto", "generate")
#: the batch columns filled from the judge's scores
SCORE_COLUMNS = ("score_chosen", "score_rejected")
#: sampling settings that draw from the policy's own distribution (validation's KL estimate, the commands)
EXACT = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
#: mixed into a step's sampling seed for its Bradley-Terry label draws (a stream of their own)
LABEL_STREAM = 0x1ABE1


# -- settings ----------------------------------------------------------------------------------------
@dataclass
class SamplingSpec:
    """How completions are sampled and paired: the ``sampling:`` block of the online and
    iterative recipes (``model.init_args.sampling`` / ``data.init_args.sampling``).

    Attributes:
        num_samples: completions per prompt, >= 2 (a pair needs two).
        pairs: ``"best_vs_worst"``: per prompt its best against its worst sample (one pair at
            most); ``"all"``: every two samples whose scores differ.
        max_new_tokens: most tokens per completion, >= 1; the longest prompt plus this must fit
            the model's ``max_position_embeddings``.
        temperature: > 0. top_p: in (0, 1]. top_k: >= 0, 0 is off. Defaults: exact sampling.
        missing_eos_penalty: subtracted from the score of a completion that reached
            ``max_new_tokens`` without an EOS; ``None`` leaves scores alone.
        seed: base seed of sampling; ``None``: the Lightning seed (``PL_GLOBAL_SEED``, set by
            ``seed_everything``), else 0.
        label_temperature: ``None``: the higher-scored sample of a pair is always chosen. A
            number ``tau > 0``: Bradley-Terry labels, each pair's order drawn with
            ``P(a chosen over b) = sigmoid((s_a - s_b) / tau)`` (pairs of equal scores are still
            skipped as ties). DPO at ``beta`` on such labels has ``pi_ref exp(s / (beta tau)) / Z``
            as its exact optimum (DPO paper, arXiv 2305.18290, section 5), while always
            preferring the higher score leaves the loss without a finite minimiser. The draws
            come from the step's sampling seed, so a resumed or repeated run draws the same.
        engine: ``"auto"``: the sampling loop of :mod:`dpo_lightning.decoding` (each prompt's
            prefill once, finished rows dropped from the batch, its own seeded random stream)
            for decoder-only models with a KV cache, ``generate`` for the others;
            ``"generate"``: always transformers' ``generate``. The same distribution, other
            random draws (so other samples for the same seed). Not part of a run's fingerprint:
            it changes the draws, not what is sampled from.
    """

    num_samples: int = 2
    pairs: PairMode = "best_vs_worst"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    missing_eos_penalty: float | None = None
    seed: int | None = None
    label_temperature: float | None = None
    engine: Engine = "auto"

    def validate(self, key: str) -> SamplingSpec:
        """Refuse unusable settings, naming ``<key>.<field>``; return ``self``."""
        if not (isinstance(self.num_samples, int) and self.num_samples >= 2):
            raise ValueError(f"{key}.num_samples must be an int >= 2 (a pair needs two samples), got {self.num_samples!r}")
        if self.pairs not in ("best_vs_worst", "all"):
            raise ValueError(f"{key}.pairs must be best_vs_worst or all, got {self.pairs!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"{key}.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"{key}.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{key}.top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"{key}.top_k must be an int >= 0 (0 is off), got {self.top_k!r}")
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise ValueError(f"{key}.missing_eos_penalty must be a finite number or null, got {self.missing_eos_penalty}")
        check_label_temperature(self.label_temperature, f"{key}.label_temperature")
        check_engine(self.engine, f"{key}.engine")
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        return self

    def base_seed(self) -> int:
        """``seed``, or the Lightning seed, or 0."""
        return int(self.seed) if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def pairs_per_prompt(self) -> int:
        """The most pairs one prompt can give: 1, or ``k (k - 1) / 2`` for ``all``."""
        return 1 if self.pairs == "best_vs_worst" else self.num_samples * (self.num_samples - 1) // 2

    def distribution(self) -> dict[str, Any]:
        """``temperature`` / ``top_p`` / ``top_k``, as :func:`sample_completions` takes them."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def check_engine(value: Any, name: str) -> None:
    """Refuse a sampling engine other than ``auto`` / ``generate``, naming the setting ``name``."""
    if value not in ENGINES:
        raise ValueError(f"{name} must be auto (the prefill-once sampling loop, generate for models it cannot serve) "
                         f"or generate (transformers' generate), got {value!r}")


def check_label_temperature(value: float | None, name: str) -> None:
    """Refuse a Bradley-Terry label temperature that is not a finite number > 0 (``None`` is off),
    naming the setting ``name``."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a number > 0 (Bradley-Terry labels) or null (the higher score always "
                         f"wins), got {value}")


def refuse_flat_sampling(kwargs: dict[str, Any], key: str) -> None:
    """Point sampling settings given on their own (``max_new_tokens=8``; ``generation_seed``)
    to the ``sampling`` block where they live (``<key>.sampling.max_new_tokens``)."""
    moved = {name: name for name in SamplingSpec.__dataclass_fields__} | {"generation_seed": "seed"}
    found = [name for name in kwargs if name in moved]
    if found:
        raise TypeError(
            f"{key}.{found[0]} is a sampling setting: give it as {key}.sampling.{moved[found[0]]} "
            f"(sampling=SamplingSpec({moved[found[0]]}=...) in Python)"
        )


def check_judge(judge: Any, key: str, pairwise: bool = True) -> None:
    """Refuse what is no judge (or a pairwise judge where each sample needs its own score),
    naming the recipe ``key``."""
    kinds = (Judge, PairwiseJudge) if pairwise else (Judge,)
    if not isinstance(judge, kinds):
        wanted = "dpo_lightning.judges.Judge or PairwiseJudge" if pairwise else "dpo_lightning.judges.Judge"
        raise TypeError(
            f"{key} must be a {wanted} (e.g. class_path: dpo_lightning.judges.FunctionJudge, init_args: "
            f"{{path: module:function}}), got {type(judge).__name__}"
        )


def check_pair_columns(columns: Sequence[str], who: str, where: str) -> None:
    """Refuse a loss that reads columns other than the judge's scores (``who``: the loss, named
    in the error; ``where``: what forms the pairs)."""
    other = [c for c in columns if c not in SCORE_COLUMNS]
    if other:
        raise ValueError(
            f"{who} reads {other} from each pair; {where} carry only the judge's scores as {list(SCORE_COLUMNS)}"
        )


def generation_seed(base: int, *parts: int) -> int:
    """A 32-bit seed that is a function of ``base`` and ``parts`` (stage, step, batch, rank) only."""
    return int(np.random.SeedSequence([int(base) % 2**32, *(int(p) % 2**32 for p in parts)]).generate_state(1)[0])


# -- the policy and its prompts --------------------------------------------------------------------
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
        module: a training module (its ``trained_model()``), or a model.
        what: who asks, named in the error (e.g. ``"LogCompletions"``).
    Raises:
        TypeError: the module trains no causal LM (a reward model, ``RewardModule``).
    """
    model = module.trained_model() if hasattr(module, "trained_model") else module
    base = base_model(model)  # inside a peft wrapper
    can_generate = getattr(base, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        raise TypeError(
            f"{what} samples completions from the policy, but {type(module).__name__} trains "
            f"{type(base).__name__}, which does not generate (a reward model has no policy). Use it with "
            "PreferenceModule, SFTModule or OnlinePreferenceModule"
        )
    return model


def position_limit(model: torch.nn.Module) -> int | None:
    """The model's ``max_position_embeddings``, if it has one."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def check_positions(prompt_width: int, max_new_tokens: int, limit: int | None, key: str, hint: str) -> None:
    """Refuse prompts that with ``max_new_tokens`` exceed ``limit`` positions; ``key`` names the
    ``max_new_tokens`` setting, ``hint`` the other way out (shorter prompts)."""
    if limit is not None and prompt_width + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {prompt_width} tokens plus {key}={max_new_tokens} exceeds the model's {limit} positions "
            f"(max_position_embeddings); lower max_new_tokens or {hint} so that they add up to at most {limit}"
        )


def encode_prompt(
    tokenizer: Any, prompt: Prompt, chat_template_kwargs: dict[str, Any] | None = None, where: str = "prompt"
) -> list[int]:
    """Token ids of one prompt as :class:`~dpo_lightning.data.PromptDataModule` encodes it (not
    truncated): a string gets the tokenizer's leading special tokens once; a conversation is
    rendered through the chat template with the generation prompt.

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


def left_padded(prompt_ids: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, Tensor]:
    """``input_ids`` / ``attention_mask`` ``(B, T)`` of the prompts, left-padded for generation."""
    width = max(map(len, prompt_ids))
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, row in enumerate(prompt_ids):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# -- sample -> cut ---------------------------------------------------------------------------------------
@dataclass
class Samples:
    """``k`` completions for each of ``B`` prompts, sample ``j`` of prompt ``i`` at index ``i * k + j``.

    Attributes:
        prompt_ids: ``B`` lists: each prompt's tokens (left padding removed).
        completion_ids: ``B * k`` lists: the sampled tokens up to and including the first EOS;
            a sample that reached ``max_new_tokens`` first keeps all of them, with no EOS.
        has_eos: ``B * k``: whether the sample stopped by itself.
        texts: ``B * k`` completion texts (decoded without special tokens), what the judge reads.
        prompts: ``B`` prompts as the data gives them (strings or conversations).
        num_samples: ``k``.
        row_ids: ``B`` source rows of the prompts, when known (named in a judge's errors).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    has_eos: list[bool]
    texts: list[str]
    prompts: list[Prompt]
    num_samples: int
    row_ids: list[int] | None = None

    def prompts_per_sample(self) -> list[Prompt]:
        """``B * k`` prompts, one for each sample."""
        return [p for p in self.prompts for _ in range(self.num_samples)]

    def describe_prompt(self, i: int) -> str:
        """``prompt i`` (with its data row when known) and the start of its text, for errors."""
        row = f" (data row {self.row_ids[i]})" if self.row_ids is not None else ""
        return f"prompt {i}{row} {self.prompts[i]!r:.80}"


def cut_at_eos(rows: Sequence[Sequence[int]], eos_ids: Sequence[int]) -> tuple[list[list[int]], list[bool]]:
    """Each generated row up to and including its first EOS (any of ``eos_ids``), and whether it
    had one. A row without an EOS (generation stopped at ``max_new_tokens``) is kept whole: what
    the policy sampled, no EOS appended."""
    stops = set(int(e) for e in eos_ids)
    out, has_eos = [], []
    for row in rows:
        row = [int(t) for t in row]
        end = next((i for i, t in enumerate(row) if t in stops), None)
        out.append(row if end is None else row[: end + 1])
        has_eos.append(end is not None)
    return out, has_eos


@torch.no_grad()
def sample_completions(
    policy: torch.nn.Module,
    tokenizer: Any,
    batch: dict[str, Any],
    num_samples: int,
    *,
    seed: int | None,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    engine: Engine = "auto",
) -> Samples:
    """``num_samples`` completions of each prompt of a ``PROMPTS`` batch from ``policy``.

    ``engine="auto"`` (a decoder-only model with a KV cache, :func:`~dpo_lightning.decoding.can_decode`):
    the sampling loop of :mod:`dpo_lightning.decoding`: each prompt's prefill once, its cache
    expanded to the ``k`` samples, finished rows dropped from the batch, ``k`` completions drawn
    from a ``torch.Generator`` seeded with ``seed`` (with ``None``: a seed drawn from the caller's
    stream, which the commands seed once), so the caller's random stream is untouched.
    ``engine="generate"`` (and other models): ``generate`` on the prompts repeated ``k`` times,
    with ``do_sample`` and the KV cache, inside a forked RNG seeded with ``seed`` (CPU and, on
    CUDA, the batch's device), the processors a checkpoint's ``generation_config`` may turn on
    (repetition penalty, typical-p, min-p, no-repeat n-grams) switched off. Both draw from the
    same distribution (temperature / top-k / top-p as given; defaults: exact ancestral
    sampling) with different random streams. Runs under ``no_grad`` with every submodule of
    ``policy`` in eval mode (no dropout), each put back in its own mode after. Each completion
    ends at its first token of ``stop_ids`` (:func:`cut_at_eos`).

    Args:
        policy: a causal LM (or a peft model around one).
        tokenizer: its tokenizer (pad id, decoding).
        batch: ``input_ids`` / ``attention_mask`` ``(B, T)`` left-padded, ``prompt`` (``B``
            prompts), optionally ``row_id`` ``(B,)``.
        num_samples: ``k`` samples per prompt; sample ``j`` of prompt ``i`` is at ``i * k + j``.
        seed: the sampling seed, or ``None``.
        max_new_tokens: most tokens per completion.
        stop_ids: tokens that end a completion (the first is the tokenizer's EOS).
        engine: ``"auto"`` or ``"generate"`` (see :class:`SamplingSpec`).
    """
    check_engine(engine, "engine")
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    lengths = attention_mask.sum(-1).tolist()
    prompt_ids = [row[row.numel() - n :].tolist() for row, n in zip(input_ids, lengths)]
    modes = [(m, m.training) for m in policy.modules()]
    policy.eval()
    try:
        if engine == "auto" and can_decode(policy):
            if seed is None:  # the caller's stream gives the seed (the commands seed it once)
                seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
            decoded = decode(
                policy, input_ids, attention_mask, num_samples, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                generator=generator, temperature=temperature, top_p=top_p, top_k=top_k,
            )
            completions, has_eos = decoded.tokens, decoded.has_eos
        else:
            sequences = sample_with_generate(
                policy, tokenizer, input_ids, attention_mask, num_samples, seed=seed, max_new_tokens=max_new_tokens,
                stop_ids=stop_ids, temperature=temperature, top_p=top_p, top_k=top_k,
            )
            completions, has_eos = cut_at_eos(sequences[:, input_ids.shape[1] :].tolist(), stop_ids)
    finally:
        for module, training in modes:  # each submodule as it was (a frozen part may be in eval mode)
            module.training = training
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    row_ids = batch["row_id"].tolist() if isinstance(batch.get("row_id"), Tensor) else None
    return Samples(prompt_ids, completions, has_eos, texts, list(batch["prompt"]), num_samples, row_ids)


def sample_with_generate(
    policy: torch.nn.Module,
    tokenizer: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_samples: int,
    *,
    seed: int | None,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float,
    top_p: float,
    top_k: int,
) -> Tensor:
    """``(B * k, T + n)`` prompts and sampled tokens from ``policy.generate`` on the prompts
    repeated ``k`` times (rows after a stop id padded), in a forked RNG seeded with ``seed``
    (with ``None``: the caller's stream). The caller puts the policy in eval mode."""
    device = input_ids.device
    settings = dict(
        input_ids=input_ids.repeat_interleave(num_samples, 0),
        attention_mask=attention_mask.repeat_interleave(num_samples, 0),
        do_sample=True, max_new_tokens=max_new_tokens, use_cache=True, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=1.0, typical_p=1.0, min_p=0.0, no_repeat_ngram_size=0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=list(stop_ids),
    )
    if seed is None:
        out = policy.generate(**settings)
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            out = policy.generate(**settings)
    return out.sequences if hasattr(out, "sequences") else out


# -- judge: the one dispatch ---------------------------------------------------------------------------
def _call_judge(judge: Judge | PairwiseJudge, call: Any, prompt_of: Sequence[int], samples: Samples) -> Tensor:
    """``call()``, its errors wrapped in one line naming the judge and the prompt (``prompt_of``:
    the prompt index of each position of the judge's call)."""
    try:
        return call()
    except Exception as err:  # a judge is user code: any error, reported in one line
        position = getattr(err, "position", None)
        if position is not None and 0 <= position < len(prompt_of):
            where = samples.describe_prompt(prompt_of[position])
        else:
            where = f"prompts 0-{len(samples.prompts) - 1} of this batch"
            if samples.row_ids is not None:
                where += f" (data rows {samples.row_ids})"
        cause = str(err) if isinstance(err, JudgeError) else f"{type(err).__name__}: {err}"
        raise JudgeError(f"judge {judge!r} failed on {where}: {cause}", position) from err


def _refuse_nonfinite(judge: Judge | PairwiseJudge, values: Tensor, prompt_of: Sequence[int], samples: Samples) -> None:
    """One line naming the judge, the prompt and the value for the first non-finite value."""
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise JudgeError(
            f"judge {judge!r} gave the non-finite value {values[i].item()} on {samples.describe_prompt(prompt_of[i])} "
            f"({len(bad)} of {values.numel()} values non-finite); a judge must return finite scores: fix the judge "
            "(a reward model with NaN weights, a function dividing by zero)", i
        )


def pairwise_win_rates(judge: PairwiseJudge, samples: Samples) -> Tensor:
    """``(B * k,)``: each sample's mean probability, by ``judge``, of beating the other samples
    of its prompt (every unordered pair judged once, in one call). With ``k = 2``: ``p`` and
    ``1 - p`` for the judge's ``p``."""
    k = samples.num_samples
    index = [(i * k + a, i * k + b) for i in range(len(samples.prompts)) for a in range(k) for b in range(a + 1, k)]
    prompt_of = [first // k for first, _ in index]
    prompts = [samples.prompts[i] for i in prompt_of]
    first, second = [samples.texts[a] for a, _ in index], [samples.texts[b] for _, b in index]
    p = _call_judge(judge, lambda: judge.prefer(prompts, first, second), prompt_of, samples).double().cpu()
    _refuse_nonfinite(judge, p, prompt_of, samples)
    wins = torch.zeros(len(samples.texts), dtype=torch.float64)
    for (a, b), value in zip(index, p.tolist()):
        wins[a] += value
        wins[b] += 1.0 - value
    return (wins / (k - 1)).float()


def judge_samples(judge: Judge | PairwiseJudge, samples: Samples, missing_eos_penalty: float | None = None) -> Tensor:
    """``(B * k,)`` float32 scores of the samples: a pointwise judge's, or a pairwise judge's
    mean win rates (:func:`pairwise_win_rates`); minus ``missing_eos_penalty`` for a completion
    without an EOS.

    Raises:
        JudgeError: the judge raised, or gave a non-finite value (one line naming the judge, the
            prompt and the value); a ``ValueError`` for scores of the wrong shape.
    """
    if isinstance(judge, PairwiseJudge):
        scores = pairwise_win_rates(judge, samples)
    else:
        k = samples.num_samples
        prompt_of = [i // k for i in range(len(samples.texts))]
        scores = _call_judge(judge, lambda: judge.score(samples.prompts_per_sample(), samples.texts), prompt_of, samples)
        scores = scores.float().cpu()
        if tuple(scores.shape) != (len(samples.texts),):
            raise ValueError(
                f"judge {judge!r} returned scores of shape {tuple(scores.shape)} for {len(samples.texts)} completions"
            )
        _refuse_nonfinite(judge, scores, prompt_of, samples)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~torch.tensor(samples.has_eos)).float()
    return scores


# -- pair ------------------------------------------------------------------------------------------------
def form_pairs(
    scores: Tensor, mode: PairMode = "best_vs_worst", label_temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[tuple[int, int, int]], int]:
    """Preference pairs from the scores of ``k`` samples of each prompt.

    Args:
        scores: ``(B, k)`` judge scores (higher is better).
        mode: ``"best_vs_worst"``: per prompt, its highest-scored sample (the first of equal
            ones) against its lowest (the first of equal ones): at most one pair per prompt.
            ``"all"``: every two samples of a prompt whose scores differ: up to ``k (k - 1) / 2``
            pairs per prompt.
        label_temperature: ``None``: the higher-scored sample of a pair is chosen. ``tau > 0``:
            the order of each pair is drawn, ``a`` chosen over ``b`` with probability
            ``sigmoid((s_a - s_b) / tau)`` (one uniform draw from ``generator`` per pair, in
            the order the pairs are listed).
        generator: the random stream of the draws; required with ``label_temperature``.
    Returns:
        ``(pairs, ties)``: ``pairs`` as ``(prompt index, chosen sample j, rejected sample j)``
        in prompt order (then by sample index); ``ties``: candidate pairs skipped because their
        scores are equal (``best_vs_worst``: prompts whose samples all scored the same; ``all``:
        tied pairs of samples).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"form_pairs needs (B, k >= 2) scores, got shape {tuple(scores.shape)}")
    if mode not in ("best_vs_worst", "all"):
        raise ValueError(f"sampling.pairs must be best_vs_worst or all, got {mode!r}")
    if label_temperature is not None and generator is None:
        raise ValueError("form_pairs: label_temperature needs a generator for the Bradley-Terry draws")
    values = scores.detach().double().cpu().tolist()
    candidates: list[tuple[int, int, int]] = []  # (prompt, higher-scored, lower-scored)
    ties = 0
    for i, row in enumerate(values):
        if mode == "best_vs_worst":
            best = max(range(len(row)), key=lambda j: (row[j], -j))
            worst = min(range(len(row)), key=lambda j: (row[j], j))
            if row[best] > row[worst]:
                candidates.append((i, best, worst))
            else:
                ties += 1
            continue
        for a in range(len(row)):
            for b in range(a + 1, len(row)):
                if row[a] > row[b]:
                    candidates.append((i, a, b))
                elif row[b] > row[a]:
                    candidates.append((i, b, a))
                else:
                    ties += 1
    if label_temperature is None or not candidates:
        return candidates, ties
    gaps = torch.tensor([values[i][hi] - values[i][lo] for i, hi, lo in candidates], dtype=torch.float64)
    keep = torch.rand(len(candidates), generator=generator, dtype=torch.float64) < torch.sigmoid(gaps / label_temperature)
    return [(i, hi, lo) if k else (i, lo, hi) for (i, hi, lo), k in zip(candidates, keep.tolist())], ties


@dataclass
class JudgedPairs:
    """What one pass of the pipeline gives: the samples, their ``(B * k,)`` scores, the pairs
    ``(prompt i, chosen j, rejected j)`` and the number of ties (see :func:`form_pairs`)."""

    samples: Samples
    scores: Tensor
    pairs: list[tuple[int, int, int]]
    ties: int

    def pair_scores(self) -> tuple[list[float], list[float]]:
        """The chosen and the rejected sample's score of each pair (float64 values)."""
        flat, k = self.scores.double().tolist(), self.samples.num_samples
        return [flat[i * k + c] for i, c, _ in self.pairs], [flat[i * k + r] for i, _, r in self.pairs]


def judge_and_pair(judge: Judge | PairwiseJudge, samples: Samples, spec: SamplingSpec, seed: int = 0) -> JudgedPairs:
    """Score ``samples`` (:func:`judge_samples`, with the spec's missing-EOS penalty) and pair
    them by the spec's rule (:func:`form_pairs`); ``seed``: the seed the samples were drawn
    with, from which the Bradley-Terry label draws (``spec.label_temperature``) take their own
    stream."""
    scores = judge_samples(judge, samples, spec.missing_eos_penalty)
    generator = None
    if spec.label_temperature is not None:
        generator = torch.Generator().manual_seed(generation_seed(seed, LABEL_STREAM))
    pairs, ties = form_pairs(scores.view(len(samples.prompts), samples.num_samples), spec.pairs,
                             spec.label_temperature, generator)
    return JudgedPairs(samples, scores, pairs, ties)


def pair_rows(
    samples: Samples, pairs: Sequence[tuple[int, int, int]], scores: Tensor, row_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """The pairs as :class:`~dpo_lightning.data.PairCollator` rows: ``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``, ``row_id`` (the prompt's source row) and the judge's
    ``score_chosen`` / ``score_rejected``."""
    k = samples.num_samples
    flat = scores.detach().double().cpu().tolist()
    return [
        {
            "prompt_ids": samples.prompt_ids[i],
            "chosen_ids": samples.completion_ids[i * k + c],
            "rejected_ids": samples.completion_ids[i * k + r],
            "row_id": int(row_ids[i]),
            "score_chosen": flat[i * k + c],
            "score_rejected": flat[i * k + r],
        }
        for i, c, r in pairs
    ]


def build_pair_batch(
    samples: Samples,
    pairs: Sequence[tuple[int, int, int]],
    scores: Tensor,
    row_ids: Sequence[int],
    pad_token_id: int,
) -> dict[str, Tensor]:
    """The ``PAIRS`` batch of ``pairs``, built by :class:`~dpo_lightning.data.PairCollator`
    (so it is exactly what the offline data path gives for the same token ids):
    ``input_ids``, ``attention_mask``, ``completion_mask`` ``(2P, T)``, ``row_id`` ``(P,)`` (the
    prompt's source row), ``score_chosen`` / ``score_rejected`` ``(P,)`` float32.

    Args:
        samples: the sampled completions.
        pairs: ``(prompt index, chosen j, rejected j)`` from :func:`form_pairs`.
        scores: ``(B * k,)`` judge scores of the samples.
        row_ids: ``B`` source rows of the prompts.
        pad_token_id: the tokenizer's pad id.
    """
    return PairCollator(pad_token_id, columns=SCORE_COLUMNS)(pair_rows(samples, pairs, scores, row_ids))


def sample_pair_batch(
    samples: Samples,
    pairs: Sequence[tuple[int, int, int]],
    scores: Tensor,
    row_ids: Sequence[int],
    pad_token_id: int,
) -> dict[str, Tensor]:
    """The pairs as a batch of their distinct samples, each sample's sequence once however many
    pairs it is in (``pairs: all`` puts each of ``k`` samples in up to ``k - 1`` pairs):

    * ``input_ids``, ``attention_mask``, ``completion_mask`` ``(S, T)``: prompt + completion of
      each of the ``S`` distinct samples the pairs use (:func:`~dpo_lightning.data.collator.pad_sequences`),
      in the order they first appear (chosen sides first);
    * ``prompt_group`` ``(S,)`` long: the prompt each sample answers (samples of one prompt
      share it; the shared-prompt layout runs it once for them);
    * ``pair_sample`` ``(2P,)`` long: the sample row of each pair's chosen side (first ``P``)
      and rejected side (last ``P``), the order of :class:`~dpo_lightning.losses.SequenceLogProbs`
      for a ``PAIRS`` batch;
    * ``row_id`` ``(P,)``, ``score_chosen`` / ``score_rejected`` ``(P,)`` float32, as
      :func:`build_pair_batch`.

    Args: as :func:`build_pair_batch`.
    """
    k = samples.num_samples
    order: dict[int, int] = {}  # flat sample index -> row in the batch
    sides = [i * k + c for i, c, _ in pairs] + [i * k + r for i, _, r in pairs]
    for flat in sides:
        order.setdefault(flat, len(order))
    used = list(order)
    batch = pad_sequences([samples.prompt_ids[flat // k] for flat in used],
                          [samples.completion_ids[flat] for flat in used], pad_token_id)
    batch["prompt_group"] = torch.tensor([flat // k for flat in used], dtype=torch.long)
    batch["pair_sample"] = torch.tensor([order[flat] for flat in sides], dtype=torch.long)
    flat_scores = scores.detach().double().cpu()
    batch["row_id"] = torch.tensor([int(row_ids[i]) for i, _, _ in pairs], dtype=torch.long)
    batch["score_chosen"] = flat_scores[[i * k + c for i, c, _ in pairs]].float()
    batch["score_rejected"] = flat_scores[[i * k + r for i, _, r in pairs]].float()
    return batch


def pair_row(prompt: Prompt, chosen: str, rejected: str, score_chosen: float, score_rejected: float) -> dict[str, Any]:
    """One preference row in the data modules' format; after a conversational prompt the
    completions are written as one assistant message each."""
    if isinstance(prompt, list):
        chosen, rejected = as_assistant_replies([chosen, rejected])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def text_pair_rows(judged: JudgedPairs) -> list[dict[str, Any]]:
    """The pairs as a preference dataset's rows (:func:`pair_row`)."""
    samples, k = judged.samples, judged.samples.num_samples
    chosen, rejected = judged.pair_scores()
    return [
        pair_row(samples.prompts[i], samples.texts[i * k + c], samples.texts[i * k + r], sc, sr)
        for (i, c, r), sc, sr in zip(judged.pairs, chosen, rejected)
    ]


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines (parent folders created); return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


__all__ = [
    "EXACT", "SCORE_COLUMNS", "JudgedPairs", "PairMode", "SamplingSpec", "Samples", "build_pair_batch",
    "ENGINES", "Engine", "check_engine", "check_judge", "check_label_temperature", "check_pair_columns", "check_positions", "cut_at_eos", "encode_prompt", "form_pairs",
    "generating_model", "generation_seed", "judge_and_pair", "judge_samples", "left_padded", "pair_row",
    "pair_rows", "pairwise_win_rates", "position_limit", "refuse_flat_sampling", "sample_completions", "sample_pair_batch",
    "sample_with_generate", "stop_token_ids", "text_pair_rows", "write_jsonl",
]
