"""Turn a canonical pair row into token ids, exactly once per row.

What the model sees for each response is ``prompt_ids + completion_ids``:

* ``prompt_ids`` = the tokenizer's own leading special tokens (BOS where it uses one,
  written once even if the prompt text already starts with it) + the prompt's tokens.
* ``completion_ids`` = the completion's tokens + exactly one EOS (an EOS the text already
  ends with is not repeated).

Prompt and completion are tokenized separately, so the boundary between them is always a
token boundary and the completion mask is exact.

Truncation policy (``max_length`` counts prompt + completion):
1. the prompt is cut to ``max_prompt_length`` tokens: ``keep_end`` (default) keeps the
   leading special tokens and the last tokens of the prompt; ``keep_start`` keeps its start;
2. each completion is cut to ``max_length - len(prompt_ids)`` tokens, keeping its start
   (its EOS is then cut too);
3. a row whose prompt leaves no room for a completion token is dropped as ``too_long``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

TruncationMode = Literal["keep_end", "keep_start"]
PAIR_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")


@dataclass(frozen=True)
class TokenizationSettings:
    """Lengths in tokens; see the module docstring for the truncation policy."""

    max_length: int = 1024
    max_prompt_length: int | None = None
    truncation_mode: TruncationMode = "keep_end"

    def validate(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(
                f"data.max_prompt_length must be in [1, max_length={self.max_length}), got {self.max_prompt_length}"
            )
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"data.truncation_mode must be 'keep_end' or 'keep_start', got {self.truncation_mode!r}")


def special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text with ``add_special_tokens=True``."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


class PairTokenizer:
    """``datasets.map`` function (``with_indices=True``) for ``prompt/chosen/rejected`` rows.

    Returns ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of ints), ``row_id`` and
    ``drop_reason`` (``""`` when the row is kept; see :data:`report.DROP_REASONS`).
    ``score_columns`` must hold finite numbers (a NaN or a string is ``wrong_type``).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        settings: TokenizationSettings,
        score_columns: tuple[str, ...] = (),
    ) -> None:
        settings.validate()
        self.score_columns = tuple(score_columns)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; every completion must end with one")
        self.tokenizer = tokenizer
        self.settings = settings
        self.prefix, _ = special_affixes(tokenizer)

    def encode_prompt(self, text: str) -> list[int]:
        """Leading special tokens + prompt tokens, BOS never doubled. Not truncated."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        prefix = self.prefix
        if prefix and ids[: len(prefix)] == prefix:
            ids = ids[len(prefix) :]
        return list(prefix) + list(ids)

    def encode_completion(self, text: str) -> list[int]:
        """Completion tokens + exactly one EOS. Not truncated."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        while ids and ids[-1] == eos:
            ids.pop()
        return ids + [eos]

    def truncate_prompt(self, ids: list[int]) -> list[int]:
        limit = self.settings.max_prompt_length
        if limit is None or len(ids) <= limit:
            return ids
        if self.settings.truncation_mode == "keep_start":
            return ids[:limit]
        n_prefix = len(self.prefix) if ids[: len(self.prefix)] == self.prefix else 0
        keep = max(limit - n_prefix, 0)
        return ids[:n_prefix] + (ids[len(ids) - keep :] if keep else [])

    @staticmethod
    def drop(row_id: int, reason: str) -> dict[str, Any]:
        return {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "row_id": row_id, "drop_reason": reason}

    def check_fields(self, row: dict[str, Any], text_fields: tuple[str, ...]) -> str:
        """The drop reason for a row's field values, or ``""`` when they are usable."""
        for name in text_fields:
            if row.get(name) is None:
                return "missing_field"
            if not isinstance(row[name], str):
                return "wrong_type"
        for name in self.score_columns:
            if row.get(name) is None:
                return "missing_field"
            if isinstance(row[name], bool) or not isinstance(row[name], (int, float)) or row[name] != row[name]:
                return "wrong_type"
        return ""

    def encode(self, prompt: str, completions: list[str]) -> tuple[list[int], list[list[int]]] | str:
        """Truncated prompt ids and completion ids, or a drop reason."""
        if any(not c.strip() for c in completions):
            return "empty_completion"
        prompt_ids = self.truncate_prompt(self.encode_prompt(prompt))
        if not prompt_ids:
            return "empty_prompt"
        budget = self.settings.max_length - len(prompt_ids)
        if budget < 1:
            return "too_long"
        return prompt_ids, [self.encode_completion(c)[:budget] for c in completions]

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        reason = self.check_fields(row, PAIR_FIELDS)
        if not reason and row["chosen"] == row["rejected"] and row["chosen"].strip():
            reason = "identical_pair"
        encoded = reason or self.encode(row["prompt"], [row["chosen"], row["rejected"]])
        if isinstance(encoded, str):
            return self.drop(index, encoded)
        prompt_ids, (chosen_ids, rejected_ids) = encoded
        return {
            "prompt_ids": prompt_ids,
            "chosen_ids": chosen_ids,
            "rejected_ids": rejected_ids,
            "row_id": index,
            "drop_reason": "",
        }


class UnpairedTokenizer(PairTokenizer):
    """``datasets.map`` function for unpaired rows ``prompt``, ``completion``, ``label`` (bool).

    Returns ``prompt_ids``, ``completion_ids``, ``label``, ``row_id``, ``drop_reason``; same
    BOS/EOS and truncation rules as :class:`PairTokenizer`.
    """

    @staticmethod
    def drop(row_id: int, reason: str) -> dict[str, Any]:
        return {"prompt_ids": [], "completion_ids": [], "label": False, "row_id": row_id, "drop_reason": reason}

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        reason = self.check_fields(row, UNPAIRED_FIELDS[:2])
        if not reason and row.get("label") is None:
            reason = "missing_field"
        elif not reason and not isinstance(row["label"], bool):
            reason = "wrong_type"
        encoded = reason or self.encode(row["prompt"], [row["completion"]])
        if isinstance(encoded, str):
            return self.drop(index, encoded)
        prompt_ids, (completion_ids,) = encoded
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "label": row["label"],
            "row_id": index,
            "drop_reason": "",
        }
