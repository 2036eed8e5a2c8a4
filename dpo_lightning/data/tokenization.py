"""Turn a canonical pair row into token ids, exactly once per row.

What the model sees for each response is ``prompt_ids + completion_ids``:

* ``prompt_ids`` = the tokenizer's own leading special tokens (BOS where it uses one,
  written once even if the prompt text already starts with it) + the prompt's tokens.
* ``completion_ids`` = the completion's tokens + exactly one EOS (an EOS the text already
  ends with is not repeated).

Prompt and completion are tokenized separately, so the boundary between them is always a
token boundary and the completion mask is exact.

Conversations (lists of ``{"role", "content"}`` messages) go through the tokenizer's chat
template, which is then the only source of special tokens (as in ``apply_chat_template``):

* ``prompt_ids`` = tokens of the prompt rendered with ``add_generation_prompt=True``;
* ``completion_ids`` = tokens of the whole conversation after those prompt tokens, ending at
  the template's end-of-turn token when that is the tokenizer's EOS (what follows, such as a
  newline, is cut), otherwise followed by one EOS.

A template that does not render the prompt as a token prefix of the whole conversation
(templates that rewrite earlier turns, or a token merge across the boundary) gets the row
dropped as ``template_mismatch``: no guessing at where the completion starts. A template that
raises on a row (``raise_exception('roles must alternate')``, a missing key) gets it dropped as
``template_error``, with the template's message kept for strict mode.

Every render passes ``chat_template_kwargs`` (e.g. ``{"enable_thinking": False}``) and ``tools``
to ``apply_chat_template``; both are attributes of the encoder, so they are part of the
``datasets`` cache key.

Truncation policy (``max_length`` counts prompt + completion):
1. the prompt is cut to ``max_prompt_length`` tokens: ``keep_end`` (default) keeps the
   leading special tokens and the last tokens of the prompt; ``keep_start`` keeps its start;
2. each completion is cut to ``max_length - len(prompt_ids)`` tokens, keeping its start
   (its EOS is then cut too);
3. a row whose prompt leaves no room for a completion token is dropped as ``too_long``;
4. a pair whose chosen and rejected ids are equal after all this is dropped as ``identical_pair``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from ..fingerprints import code_version
from .formats import normalize_completion, normalize_messages, normalize_pair, normalize_triple, normalize_unpaired

#: the code that turns rows into ids; ``datasets.map`` hashes the encoder with it, so the
#: tokenization cache is keyed by this code as well as by the data and settings
ENCODING_CODE_VERSION = code_version("data.tokenization", "data.formats")

TruncationMode = Literal["keep_end", "keep_start"]


@dataclass(frozen=True)
class TokenizationSettings:
    """Lengths in tokens; see the module docstring for the truncation policy."""

    max_length: int = 1024
    max_prompt_length: int | None = None
    truncation_mode: TruncationMode = "keep_end"

    def validate(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"data.init_args.max_length must be >= 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(
                f"data.init_args.max_prompt_length must be in [1, max_length={self.max_length}), got {self.max_prompt_length}"
            )
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"data.init_args.truncation_mode must be 'keep_end' or 'keep_start', got {self.truncation_mode!r}")


#: arguments of ``apply_chat_template`` the encoder sets itself
RESERVED_TEMPLATE_KWARGS = (
    "conversation", "messages", "tools", "documents", "tokenize", "add_generation_prompt",
    "continue_final_message", "return_dict", "return_tensors", "padding", "truncation", "max_length",
)


def check_template_kwargs(kwargs: dict[str, Any] | None, key: str = "data.init_args.chat_template_kwargs") -> dict[str, Any]:
    """``kwargs`` as a dict; a key the encoder sets itself is an error naming ``key``."""
    kwargs = dict(kwargs or {})
    clash = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS)
    if clash:
        hint = " (give tools as data.init_args.tools)" if "tools" in clash else ""
        raise ValueError(
            f"{key}: {clash} are set by dpo-lightning for every render; remove them{hint}. "
            "Pass only the template's own variables, e.g. {enable_thinking: false}"
        )
    return kwargs


class Drop(str):
    """A drop reason (one of :data:`report.DROP_REASONS`) with an optional detail, e.g. the
    message of a chat template that raised. Compares and hashes as the plain reason."""

    detail: str = ""

    @classmethod
    def because(cls, reason: str, detail: str) -> Drop:
        out = cls(reason)
        out.detail = detail
        return out


class RenderError(Exception):
    """The chat template raised on a row."""


def special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text with ``add_special_tokens=True``."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


class RowEncoder:
    """Turns one normalised row into token ids: the rules every layout shares.

    Subclasses are ``datasets.map`` functions (``with_indices=True``) for one row schema
    (:class:`PairEncoder`, :class:`UnpairedEncoder`, :class:`CompletionEncoder`); each returns
    the ids, ``row_id``, ``drop_reason`` (``""`` when the row is kept; see
    :data:`report.DROP_REASONS`) and ``drop_detail`` (what went wrong, where known).
    ``score_columns`` must hold finite numbers (a NaN, an infinity or a string is ``wrong_type``).
    ``chat_template_kwargs`` and ``tools`` go to every ``apply_chat_template`` call.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        settings: TokenizationSettings,
        score_columns: tuple[str, ...] = (),
        has_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> None:
        settings.validate()
        self.code_version = ENCODING_CODE_VERSION  # hashed into the datasets cache fingerprint
        self.score_columns = tuple(score_columns)
        self.has_prompt = has_prompt
        self.chat_template_kwargs = check_template_kwargs(chat_template_kwargs)
        self.tools = list(tools) if tools else None
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; every completion must end with one")
        self.tokenizer = tokenizer
        self.settings = settings
        self.prefix, _ = special_affixes(tokenizer)

    # -- plain text ----------------------------------------------------------------------
    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, text: str) -> list[int]:
        """Leading special tokens + prompt tokens, BOS never doubled. Not truncated."""
        ids = self.ids(text)
        prefix = self.prefix
        while prefix and ids[: len(prefix)] == prefix:
            ids = ids[len(prefix) :]
        return list(prefix) + ids

    def end_with_eos(self, ids: list[int]) -> list[int]:
        """Cut after the last EOS if there is one (then trailing EOS repeats collapse, so a reply
        whose text ends in an EOS string keeps one), else append one."""
        eos = self.tokenizer.eos_token_id
        if eos not in ids:
            return ids + [eos]
        ids = ids[: len(ids) - ids[::-1].index(eos)]
        while len(ids) > 1 and ids[-1] == eos and ids[-2] == eos:
            ids = ids[:-1]
        return ids

    def encode_completion(self, text: str) -> list[int]:
        """Completion tokens + exactly one EOS. Not truncated."""
        ids = self.ids(text)
        eos = self.tokenizer.eos_token_id
        while ids and ids[-1] == eos:
            ids.pop()
        return ids + [eos]

    # -- conversations ---------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "conversational rows need a tokenizer with a chat template; set model.tokenizer to "
                "one that has it, or give the rows as plain strings"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=self.tools, tokenize=False, add_generation_prompt=generation_prompt,
                **self.chat_template_kwargs,
            )
        except Exception as err:  # noqa: BLE001 - a template may raise anything on a bad row
            raise RenderError(f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from err
        return self.collapse_leading_bos(self.ids(text))

    def encode_conversation(
        self, prompt: list[dict[str, str]], completions: list[list[dict[str, str]]]
    ) -> tuple[list[int], list[list[int]]] | str:
        try:
            return self.render_pieces(prompt, completions)
        except RenderError as err:
            return Drop.because("template_error", str(err))

    def render_pieces(
        self, prompt: list[dict[str, str]], completions: list[list[dict[str, str]]]
    ) -> tuple[list[int], list[list[int]]] | str:
        """Prompt ids and each completion's ids after them (see the module docstring)."""
        prompt_ids = self.render(prompt, generation_prompt=True) if prompt else []
        completion_ids = []
        for completion in completions:
            full = self.render(prompt + completion, generation_prompt=False)
            if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
                return "template_mismatch"
            completion_ids.append(self.end_with_eos(full[len(prompt_ids) :]))
        return prompt_ids, completion_ids

    # -- shared ----------------------------------------------------------------------------
    def collapse_leading_bos(self, ids: list[int]) -> list[int]:
        """One BOS at the start, however many the text, template or truncation put there."""
        bos = self.tokenizer.bos_token_id
        while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids

    def truncate_prompt(self, ids: list[int]) -> list[int]:
        limit = self.settings.max_prompt_length
        if limit is None or len(ids) <= limit:
            return ids
        if self.settings.truncation_mode == "keep_start":
            return ids[:limit]
        bos = self.tokenizer.bos_token_id
        n_head = 1 if bos is not None and ids and ids[0] == bos else 0
        keep = max(limit - n_head, 0)
        return ids[:n_head] + (ids[len(ids) - keep :] if keep else [])

    def check_scores(self, row: dict[str, Any]) -> str:
        """The drop reason for the row's score columns, or ``""``."""
        for name in self.score_columns:
            if row.get(name) is None:
                return "missing_field"
            if isinstance(row[name], bool) or not isinstance(row[name], (int, float)) or not math.isfinite(row[name]):
                return "wrong_type"
        return ""

    def encode(self, prompt: Any, completions: list[Any]) -> tuple[list[int], list[list[int]]] | str:
        """Truncated prompt ids and completion ids (strings or conversations), or a drop reason."""
        if isinstance(prompt, list):
            encoded = self.encode_conversation(prompt, completions)
            if isinstance(encoded, str):
                return encoded
            prompt_ids, completion_ids = encoded
        else:
            prompt_ids = self.encode_prompt(prompt)
            completion_ids = [self.encode_completion(c) for c in completions]
        prompt_ids = self.collapse_leading_bos(self.truncate_prompt(prompt_ids))
        if not prompt_ids:
            return "empty_prompt"
        budget = self.settings.max_length - len(prompt_ids)
        if budget < 1:
            return "too_long"
        return prompt_ids, [ids[:budget] for ids in completion_ids]

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def outcome(index: int, reason: str = "") -> dict[str, Any]:
        """``row_id``, ``drop_reason`` and ``drop_detail`` of one row."""
        return {"row_id": index, "drop_reason": str(reason), "drop_detail": getattr(reason, "detail", "")}


class PairEncoder(RowEncoder):
    """Pair rows: ``chosen`` and ``rejected`` (and ``prompt`` unless ``has_prompt`` is False:
    then the prompt is their common prefix), all strings or all conversations; see
    :mod:`.formats`. Returns ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``row_id``,
    ``drop_reason``."""

    def drop(self, row_id: int, reason: str) -> dict[str, Any]:
        return {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], **self.outcome(row_id, reason)}

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        normalized = normalize_pair(row, self.has_prompt)
        if isinstance(normalized, str):
            return self.drop(index, normalized)
        reason = self.check_scores(row)
        encoded = reason or self.encode(normalized[0], [normalized[1], normalized[2]])
        if isinstance(encoded, str):
            return self.drop(index, encoded)
        prompt_ids, (chosen_ids, rejected_ids) = encoded
        if chosen_ids == rejected_ids:  # different texts, same ids once truncated (or tokenized)
            return self.drop(index, "identical_pair")
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, **self.outcome(index)}


class TripleEncoder(RowEncoder):
    """Triple rows (TPO): ``prompt``, ``chosen``, ``rejected`` and ``gold``, all strings or all
    conversations (see :func:`.formats.normalize_triple`). Returns ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``, ``gold_ids``, ``row_id``, ``drop_reason``."""

    def drop(self, row_id: int, reason: str) -> dict[str, Any]:
        return {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "gold_ids": [], **self.outcome(row_id, reason)}

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        normalized = normalize_triple(row)
        reason = normalized if isinstance(normalized, str) else self.check_scores(row)
        encoded = reason or self.encode(normalized[0], list(normalized[1:]))
        if isinstance(encoded, str):
            return self.drop(index, encoded)
        prompt_ids, (chosen_ids, rejected_ids, gold_ids) = encoded
        if chosen_ids == rejected_ids:
            return self.drop(index, "identical_pair")
        return {
            "prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "gold_ids": gold_ids,
            **self.outcome(index),
        }


class UnpairedEncoder(RowEncoder):
    """Unpaired rows ``prompt``, ``completion``, ``label`` (bool), for KTO.

    Returns ``prompt_ids``, ``completion_ids``, ``label``, ``row_id``, ``drop_reason``.
    """

    def drop(self, row_id: int, reason: str) -> dict[str, Any]:
        return {"prompt_ids": [], "completion_ids": [], "label": False, **self.outcome(row_id, reason)}

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        normalized = normalize_unpaired(row)
        encoded = normalized if isinstance(normalized, str) else self.encode(normalized[0], [normalized[1]])
        if isinstance(encoded, str):
            return self.drop(index, encoded)
        prompt_ids, (completion_ids,) = encoded
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": row["label"], **self.outcome(index)}


class CompletionEncoder(RowEncoder):
    """``prompt``, ``completion`` rows (SFT), or rows of one ``messages`` conversation (its last
    message, the assistant's, is the completion; see :func:`.formats.normalize_messages`).
    Returns ``prompt_ids``, ``completion_ids``, ``row_id``, ``drop_reason``, ``drop_detail``."""

    def drop(self, row_id: int, reason: str) -> dict[str, Any]:
        return {"prompt_ids": [], "completion_ids": [], **self.outcome(row_id, reason)}

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        uses_messages = "completion" not in row and "messages" in row
        normalized = normalize_messages(row) if uses_messages else normalize_completion(row)
        encoded = normalized if isinstance(normalized, str) else self.encode(normalized[0], [normalized[1]])
        if isinstance(encoded, str):
            return self.drop(index, encoded)
        prompt_ids, (completion_ids,) = encoded
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, **self.outcome(index)}
