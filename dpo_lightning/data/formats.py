"""Row formats: plain strings or conversations, explicit or implicit prompt.

Every pair row is normalised to ``(prompt, chosen, rejected)`` where all three are strings,
or all three are conversations (lists of ``{"role", "content"}`` messages). Unpaired rows
become ``(prompt, completion)`` the same way. A row that fits no format gets a drop reason.

Implicit prompt (no ``prompt`` column): the prompt is the longest common prefix of ``chosen``
and ``rejected``.

* strings: by character, moved back to a word boundary so that no word is split between
  prompt and completion (the whitespace before the first differing word starts the
  completion, as byte-level BPE tokenizers expect);
* conversations: by whole messages; the remaining messages of each are the completions.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]
Text = str | list[Message]


def is_conversation(value: Any) -> bool:
    """A non-empty list of dicts with string ``role`` and ``content``."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )


def kind_of(value: Any) -> str | None:
    """``"text"``, ``"conversation"``, or ``None`` for anything else."""
    if isinstance(value, str):
        return "text"
    if is_conversation(value):
        return "conversation"
    return None


def is_blank(value: Text) -> bool:
    """True for an empty / whitespace string or a conversation with only blank contents."""
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def split_text_prefix(a: str, b: str) -> tuple[str, str, str]:
    """``(prompt, rest_a, rest_b)``: the common prefix of ``a`` and ``b`` cut at a word boundary."""
    n = 0
    limit = min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1

    def boundary(s: str, i: int) -> bool:
        return i == len(s) or s[i].isspace()

    while n > 0 and not (boundary(a, n) and boundary(b, n)):
        n -= 1
    return a[:n], a[n:], b[n:]


def split_message_prefix(a: list[Message], b: list[Message]) -> tuple[list[Message], list[Message], list[Message]]:
    """``(prompt, rest_a, rest_b)``: the longest run of identical leading messages."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n], a[n:], b[n:]


def normalize_pair(row: dict[str, Any], has_prompt: bool) -> tuple[Text, Text, Text] | str:
    """``(prompt, chosen, rejected)`` of one kind, or a drop reason."""
    fields = ("prompt", "chosen", "rejected") if has_prompt else ("chosen", "rejected")
    if any(row.get(f) is None for f in fields):
        return "missing_field"
    kinds = {kind_of(row[f]) for f in fields}
    if None in kinds or len(kinds) != 1:
        return "wrong_type"
    chosen, rejected = row["chosen"], row["rejected"]
    if is_blank(chosen) or is_blank(rejected):
        return "empty_completion"
    if chosen == rejected:
        return "identical_pair"
    if has_prompt:
        prompt = row["prompt"]
    elif isinstance(chosen, str):
        prompt, chosen, rejected = split_text_prefix(chosen, rejected)
    else:
        prompt, chosen, rejected = split_message_prefix(chosen, rejected)
    if (isinstance(chosen, list) and not chosen) or (isinstance(rejected, list) and not rejected):
        return "empty_completion"
    if is_blank(chosen) or is_blank(rejected):
        return "empty_completion"
    return prompt, chosen, rejected


def normalize_completion(row: dict[str, Any]) -> tuple[Text, Text] | str:
    """``(prompt, completion)`` of one kind, or a drop reason."""
    if any(row.get(f) is None for f in ("prompt", "completion")):
        return "missing_field"
    kinds = {kind_of(row["prompt"]), kind_of(row["completion"])}
    if None in kinds or len(kinds) != 1:
        return "wrong_type"
    if is_blank(row["completion"]):
        return "empty_completion"
    return row["prompt"], row["completion"]


def normalize_unpaired(row: dict[str, Any]) -> tuple[Text, Text, bool] | str:
    """``(prompt, completion, label)`` with prompt and completion of one kind, or a drop reason."""
    if row.get("label") is None:
        return "missing_field"
    normalized = normalize_completion(row)
    if isinstance(normalized, str):
        return normalized
    if not isinstance(row["label"], bool):
        return "wrong_type"
    return normalized[0], normalized[1], row["label"]
