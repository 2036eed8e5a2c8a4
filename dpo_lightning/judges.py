"""Judges: what scores a policy's samples in online training and evaluation.

One call signature per kind, whatever is behind it:

* :class:`Judge` (pointwise): ``score(prompts, completions) -> (N,)`` float scores, higher is better;
* :class:`PairwiseJudge`: ``prefer(prompts, first, second) -> (N,)`` the probability that
  ``first[i]`` is the better completion of ``prompts[i]``, in ``[0, 1]``.

``prompts[i]`` is the prompt as the data gives it: a string, or a conversation (a list of
``{"role", "content"}`` messages). ``completions[i]`` is always the text of a completion (the
sampled tokens decoded without special tokens).

Implementations:

* :class:`FunctionJudge`: a Python function named ``module:function`` (e.g.
  ``dpo_lightning.experiments.sentiment:score``) of the completion, or of the prompt and the
  completion (decided by its signature);
* :class:`RewardModelJudge`: a sequence-classification reward model (what
  :class:`~dpo_lightning.modules.RewardModule` exports), scoring ``prompt + completion``
  tokenized exactly as the reward model's training pairs were;
* :class:`FunctionPairwiseJudge`: a function ``(prompt, first, second) -> float`` in ``[0, 1]``.

A judge is not an ``nn.Module``: it is not trained, not checkpointed (the recipe rebuilds it)
and not moved by Lightning; the training module calls :meth:`Judge.to` with its device.
In a recipe, a judge sits under ``model.init_args.judge``::

    judge:
      class_path: dpo_lightning.judges.FunctionJudge
      init_args: {path: dpo_lightning.experiments.sentiment:score}
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .data.collator import pad_sequences
from .data.formats import as_assistant_replies
from .data.tokenization import PairEncoder, TokenizationSettings
from .fingerprints import settings_fingerprint
from .models import ModelSpec, load_reward_model, load_tokenizer

#: a prompt as the data gives it: a string or a conversation
Prompt = str | list[dict[str, str]]
#: where a judge's arguments sit in a recipe, named in errors
JUDGE_KEY = "model.init_args.judge.init_args"
#: a function judge's function: ``(completion) -> float`` or ``(prompt, completion) -> float``
Scorer = Callable[..., float]


class JudgeError(ValueError):
    """A judge raised, or gave a value it must not give (non-finite, out of range).

    ``position``: the index, within the judge's call, of the completion (or pair) it failed on,
    when known; :func:`~dpo_lightning.generation.judge_samples` turns it into the prompt's index.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


def load_scorer(path: str) -> Scorer:
    """Import ``module:function`` (or ``module.function``)."""
    module, _, name = path.replace(":", ".").rpartition(".")
    if not module:
        raise ValueError(f"--scorer {path!r}: give module:function, e.g. dpo_lightning.experiments.sentiment:score")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--scorer {path!r}: {module} has no function {name!r}")
    return fn


class Judge:
    """Pointwise judge: a score for each (prompt, completion); higher is better."""

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> Tensor:
        """``(N,)`` float32 scores (on the CPU) of ``completions[i]`` as a reply to ``prompts[i]``."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Judge:
        """Move whatever the judge computes with to ``device`` (a model); default: nothing to move."""
        return self

    def fingerprint(self) -> dict[str, str]:
        """``{"judge": Class{plain settings}}`` (a function judge's path and arguments, a reward
        model's folder and batch size, ...): part of the online run fingerprint, so a resume with
        another judge is refused."""
        return {"judge": settings_fingerprint(self)}


class PairwiseJudge:
    """Pairwise judge: which of two completions of the same prompt is better."""

    def prefer(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> Tensor:
        """``(N,)`` float32 in ``[0, 1]`` (on the CPU): the probability that ``first[i]`` is better
        than ``second[i]`` as a reply to ``prompts[i]``; 0.5 is a tie."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> PairwiseJudge:
        return self

    def fingerprint(self) -> dict[str, str]:
        """``{"judge": Class{plain settings}}``, as :meth:`Judge.fingerprint`."""
        return {"judge": settings_fingerprint(self)}


def _check_lengths(*columns: Sequence[Any]) -> int:
    sizes = {len(c) for c in columns}
    if len(sizes) != 1:
        raise ValueError(f"a judge needs as many prompts as completions, got lengths {[len(c) for c in columns]}")
    return sizes.pop()


def _load_function(path: str, key: str) -> Callable[..., Any]:
    """``module:function`` (or ``module.function``) through :func:`load_scorer`, with errors
    naming the recipe ``key``."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{key}: give the function as module:function, e.g. dpo_lightning.experiments.sentiment:score; got {path!r}")
    try:
        return load_scorer(path)
    except ImportError as err:
        raise ValueError(
            f"{key}: cannot import the module of {path!r} ({err}); give module:function with the module on "
            "PYTHONPATH, e.g. dpo_lightning.experiments.sentiment:score"
        ) from err
    except ValueError as err:
        raise ValueError(f"{key}: {str(err).split(': ', 1)[-1]}") from err


def _required_positional(fn: Callable[..., Any]) -> tuple[int, bool] | None:
    """``(number of required positional parameters, takes *args)``, or ``None`` when the
    signature cannot be read (some builtins)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = sum(p.kind in positional and p.default is inspect.Parameter.empty for p in parameters)
    return required, any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)


def _call(fn: Callable[..., Any], args: tuple[Any, ...], path: str, what: str, position: int) -> float:
    """``fn(*args)`` as a finite float; anything else (an exception inside ``fn``, a value that
    is no number or not finite) is a :class:`JudgeError` naming the path, ``what`` and ``position``."""
    try:
        value = fn(*args)
    except Exception as err:  # the user's function: any error, reported in one line
        raise JudgeError(f"{JUDGE_KEY}.path {path!r} raised {type(err).__name__}: {err} for {what}", position) from err
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise JudgeError(
            f"{JUDGE_KEY}.path {path!r} returned {value!r:.80} for {what}; it must return a number", position
        ) from err
    if not math.isfinite(out):
        raise JudgeError(f"{JUDGE_KEY}.path {path!r} returned {out} for {what}; scores must be finite", position)
    return out


class FunctionJudge(Judge):
    """A Python function as a pointwise judge.

    Args:
        path: ``module:function`` (or ``module.function``), importable from the run's
            ``PYTHONPATH``, e.g. ``dpo_lightning.experiments.sentiment:score``.
        arguments: what the function is called with. ``"auto"`` (default) reads its signature:
            one required positional parameter means ``fn(completion)``; two mean
            ``fn(prompt, completion)``; anything else is an error asking to set this key.
            ``"completion"`` / ``"prompt_completion"`` say it explicitly (e.g. for a function
            taking ``*args`` or a builtin without a readable signature).

    The prompt is given as the data holds it (a string, or a list of messages); the completion
    is its text. The function returns a finite number (a ``bool`` or a one-element tensor is
    taken as one); anything else is an error naming the path.
    """

    def __init__(self, path: str, arguments: Literal["auto", "completion", "prompt_completion"] = "auto") -> None:
        self.path = path
        self.fn = _load_function(path, f"{JUDGE_KEY}.path")
        if arguments not in ("auto", "completion", "prompt_completion"):
            raise ValueError(f"{JUDGE_KEY}.arguments must be auto, completion or prompt_completion, got {arguments!r}")
        if arguments == "auto":
            found = _required_positional(self.fn)
            if found is None or (found[0] not in (1, 2)):
                seen = "an unreadable signature" if found is None else f"{found[0]} required positional parameters"
                raise ValueError(
                    f"{JUDGE_KEY}.path {path!r} has {seen}; a judge function takes (completion) or "
                    f"(prompt, completion). Set {JUDGE_KEY}.arguments to completion or prompt_completion"
                )
            arguments = "completion" if found[0] == 1 else "prompt_completion"
        self.arguments = arguments

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> Tensor:
        _check_lengths(prompts, completions)
        values = [
            _call(self.fn, (c,) if self.arguments == "completion" else (p, c), self.path, f"completion {c!r:.80}", i)
            for i, (p, c) in enumerate(zip(prompts, completions))
        ]
        return torch.tensor(values, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"FunctionJudge({self.path!r}, arguments={self.arguments!r})"


class FunctionPairwiseJudge(PairwiseJudge):
    """A Python function ``(prompt, first, second) -> float`` as a pairwise judge.

    Args:
        path: ``module:function``; the function returns the probability (in ``[0, 1]``; a
            ``bool`` counts as 0 or 1) that ``first`` is the better reply to ``prompt``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fn = _load_function(path, f"{JUDGE_KEY}.path")
        found = _required_positional(self.fn)
        if found is not None and found[0] != 3 and not (found[1] and found[0] <= 3):
            raise ValueError(
                f"{JUDGE_KEY}.path {path!r} takes {found[0]} required positional parameters; a pairwise judge "
                "function takes (prompt, first, second) and returns the probability that first is better"
            )

    def prefer(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> Tensor:
        _check_lengths(prompts, first, second)
        values = []
        for i, (p, a, b) in enumerate(zip(prompts, first, second)):
            value = _call(self.fn, (p, a, b), self.path, f"the pair {a!r:.80} / {b!r:.80}", i)
            if not 0.0 <= value <= 1.0:
                raise JudgeError(
                    f"{JUDGE_KEY}.path {self.path!r} returned {value} for the pair {a!r:.80} / {b!r:.80}; a pairwise "
                    "judge returns the probability that the first completion is better, in [0, 1]", i
                )
            values.append(value)
        return torch.tensor(values, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"FunctionPairwiseJudge({self.path!r})"


class RewardModelJudge(Judge):
    """A sequence-classification reward model (one output) as a pointwise judge.

    Loads the model as ``dpo-lightning-score`` does (:func:`~dpo_lightning.models.load_reward_model`,
    its own tokenizer, weights as safetensors) and scores each ``prompt + completion`` as the
    reward model's training pairs were built (:class:`~dpo_lightning.data.tokenization.PairEncoder`'s
    rules: the tokenizer's BOS once, prompt tokens, completion tokens and one EOS; a conversational
    prompt goes through the chat template with the completion as the assistant's reply), right-
    padded by :func:`~dpo_lightning.data.collator.pad_sequences`; the reward is the head's
    output ``logits[:, 0]`` at the last non-padding token. So a folder exported by
    :class:`~dpo_lightning.modules.RewardModule` gives the rewards it was trained to give.

    The completion reaches the reward model as text (decoded from the policy's tokens and
    re-encoded by the reward model's tokenizer), so policy and reward model need not share a
    tokenizer.

    Args:
        name_or_path: folder exported by ``RewardModule``, or a hub id of a sequence classifier.
        batch_size: sequences per forward pass.
        max_length / max_prompt_length: tokenization limits (the training data's rules:
            the prompt is cut first, keeping its end; then the completion).
        trust_remote_code: run modelling code shipped with the checkpoint. Off unless set.
        dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``auto``.
        chat_template_kwargs: extra variables for the chat template (conversational prompts).
    """

    def __init__(
        self,
        name_or_path: str,
        batch_size: int = 16,
        max_length: int = 1024,
        max_prompt_length: int | None = None,
        trust_remote_code: bool = False,
        dtype: str = "float32",
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"{JUDGE_KEY}.batch_size must be >= 1, got {batch_size}")
        self.name_or_path = name_or_path
        self.batch_size = batch_size
        spec = ModelSpec(name_or_path=name_or_path, trust_remote_code=trust_remote_code, dtype=dtype)
        spec.validate(JUDGE_KEY)  # errors name model.init_args.judge.init_args.name_or_path
        try:
            self.tokenizer = load_tokenizer(spec)
            self.model = load_reward_model(spec, self.tokenizer).eval().requires_grad_(False)
        except OSError as err:
            raise OSError(str(err).replace("model.name_or_path", f"{JUDGE_KEY}.name_or_path", 1)) from err
        if getattr(self.model.config, "num_labels", 1) != 1:
            raise ValueError(
                f"{JUDGE_KEY}.name_or_path {name_or_path!r} has {self.model.config.num_labels} outputs; a reward model "
                "has one (RewardModule exports such a model)"
            )
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 0:
            max_length = min(max_length, limit)
        self.settings = TokenizationSettings(max_length, max_prompt_length)
        try:
            self.settings.validate()
        except ValueError as err:
            raise ValueError(str(err).replace("data.init_args", JUDGE_KEY)) from err
        self.encoder = PairEncoder(self.tokenizer, self.settings, chat_template_kwargs=chat_template_kwargs)

    def to(self, device: torch.device | str) -> RewardModelJudge:
        self.model.to(device)
        return self

    def encode(self, prompt: Prompt, completion: str) -> tuple[list[int], list[int]]:
        """Prompt ids and completion ids of one pair, by the training data's rules."""
        replies: list[Any] = [completion]
        if isinstance(prompt, list):
            replies = as_assistant_replies([completion])
        encoded = self.encoder.encode(prompt, replies)
        if isinstance(encoded, str):
            raise ValueError(
                f"{JUDGE_KEY}: the reward model cannot score the prompt {prompt!r} ({encoded}); "
                f"raise {JUDGE_KEY}.max_length or set {JUDGE_KEY}.max_prompt_length"
            )
        prompt_ids, (completion_ids,) = encoded
        return prompt_ids, completion_ids

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> Tensor:
        n = _check_lengths(prompts, completions)
        pieces = [self.encode(p, c) for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        out: list[Tensor] = []
        for start in range(0, n, self.batch_size):
            chunk = pieces[start : start + self.batch_size]
            batch = pad_sequences([p for p, _ in chunk], [c for _, c in chunk], self.tokenizer.pad_token_id)
            with torch.autocast(device.type, enabled=False):  # the model's own dtype, whatever the trainer's precision
                logits = self.model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
            out.append(logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __repr__(self) -> str:
        return f"RewardModelJudge({self.name_or_path!r})"


__all__ = [
    "FunctionJudge",
    "FunctionPairwiseJudge",
    "Judge",
    "JudgeError",
    "PairwiseJudge",
    "Prompt",
    "RewardModelJudge",
    "load_scorer",
]
