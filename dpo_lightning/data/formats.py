"""Row formats: plain strings or conversations, explicit or implicit prompt.

Every pair row is normalised to ``(prompt, chosen, rejected)`` where all three are strings,
or all three are conversations (lists of ``{"role", "content"}`` messages). Unpaired and SFT
rows become ``(prompt, completion)`` the same way. A row that fits no format gets a drop reason.

Implicit prompt (no ``prompt`` column): the prompt is the longest common prefix of ``chosen``
and ``rejected``.

* strings: by character, moved back to a word boundary so that no word is split between
  prompt and completion (the whitespace before the first differing word starts the
  completion, as byte-level BPE tokenizers expect);
* conversations: by whole messages; the remaining messages of each are the completions.

Mixed kinds within a row (the shapes TRL accepts, and one more):

* a string ``prompt`` with conversational ``chosen`` / ``rejected`` that repeat the prompt
  turn(s) (UltraFeedback-binarized: ``chosen = [user, assistant]``): as in TRL's
  ``maybe_extract_prompt``, the prompt is the messages the two share at their start and the
  string ``prompt`` column is not used;
* a string ``prompt`` with conversational completions that share no leading message and are
  each one assistant message (the reply alone): the prompt becomes one user message
  ``[{"role": "user", "content": prompt}]``;
* a conversational ``prompt`` with string completions: each completion becomes one assistant
  message (TRL would drop the prompt and split the strings instead; keeping the prompt is what
  such a row means);
* anything else (``chosen`` a string and ``rejected`` a conversation, a string prompt with
  replies that start with a user turn, ...) cannot be made one kind: ``wrong_type``.

SFT rows may instead hold one ``messages`` conversation: the prompt is every message before
the last one, which must be the assistant's reply (the completion); see :func:`normalize_messages`.
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


def as_user_prompt(prompt: str, completions: list[list[Message]]) -> tuple[list[Message], list[list[Message]]] | str:
    """A string prompt before conversational replies: ``[user: prompt]``, or ``wrong_type`` unless
    each reply is one assistant message (a reply with more turns does not answer the one
    question the string asks; give such rows a conversational prompt)."""
    if any(len(c) != 1 or c[0]["role"] != "assistant" for c in completions):
        return "wrong_type"
    return [{"role": "user", "content": prompt}], completions


def as_assistant_replies(completions: list[str]) -> list[list[Message]]:
    """String completions after a conversational prompt: one assistant message each."""
    return [[{"role": "assistant", "content": c}] for c in completions]


def one_kind(prompt: Any, completions: list[Any]) -> tuple[Text, list[Text]] | str:
    """``(prompt, completions)`` made one kind by the rules in the module docstring (one reply,
    or replies without a shared leading message), or ``wrong_type``."""
    prompt_kind = kind_of(prompt)
    kinds = {kind_of(c) for c in completions}
    if prompt_kind is None or None in kinds or len(kinds) != 1:
        return "wrong_type"
    kind = kinds.pop()
    if kind == prompt_kind:
        return prompt, completions
    if prompt_kind == "conversation":
        return prompt, as_assistant_replies(completions)
    return as_user_prompt(prompt, completions)


def split_completions(prompt: Text, chosen: Text, rejected: Text) -> tuple[Text, Text, Text] | str:
    """An explicit prompt with its two completions, made one kind (see the module docstring)."""
    if isinstance(prompt, str) and is_conversation(chosen) and is_conversation(rejected):
        shared, rest_chosen, rest_rejected = split_message_prefix(chosen, rejected)
        if shared:  # TRL: the completions repeat the prompt turn(s); those are the prompt
            return shared, rest_chosen, rest_rejected
    unified = one_kind(prompt, [chosen, rejected])
    if isinstance(unified, str):
        return unified
    return unified[0], unified[1][0], unified[1][1]


def normalize_pair(row: dict[str, Any], has_prompt: bool) -> tuple[Text, Text, Text] | str:
    """``(prompt, chosen, rejected)`` of one kind, or a drop reason."""
    fields = ("prompt", "chosen", "rejected") if has_prompt else ("chosen", "rejected")
    if any(row.get(f) is None for f in fields):
        return "missing_field"
    kinds = {kind_of(row[f]) for f in ("chosen", "rejected")}
    if None in kinds or len(kinds) != 1 or (has_prompt and kind_of(row["prompt"]) is None):
        return "wrong_type"
    chosen, rejected = row["chosen"], row["rejected"]
    if is_blank(chosen) or is_blank(rejected):
        return "empty_completion"
    if chosen == rejected:
        return "identical_pair"
    if has_prompt:
        split = split_completions(row["prompt"], chosen, rejected)
        if isinstance(split, str):
            return split
        prompt, chosen, rejected = split
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
    unified = one_kind(row["prompt"], [row["completion"]])
    if isinstance(unified, str):
        return unified
    prompt, (completion,) = unified
    if is_blank(completion):
        return "empty_completion"
    return prompt, completion


def normalize_messages(row: dict[str, Any]) -> tuple[list[Message], list[Message]] | str:
    """One ``messages`` conversation as ``(prompt, completion)`` for SFT: the completion is the
    last message, which must be the assistant's (``no_final_assistant`` otherwise); the prompt
    is every message before it."""
    messages = row.get("messages")
    if messages is None:
        return "missing_field"
    if not is_conversation(messages):
        return "wrong_type"
    if messages[-1]["role"] != "assistant":
        return "no_final_assistant"
    if is_blank(messages[-1:]):
        return "empty_completion"
    return messages[:-1], messages[-1:]


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


def normalize_triple(row: dict[str, Any]) -> tuple[Text, Text, Text, Text] | str:
    """``(prompt, chosen, rejected, gold)`` of one kind (TPO's rows), or a drop reason: the pair
    as :func:`normalize_pair` with an explicit prompt, and ``gold`` made the kind of ``chosen``."""
    if row.get("gold") is None:
        return "missing_field"
    pair = normalize_pair(row, has_prompt=True)
    if isinstance(pair, str):
        return pair
    gold = split_completions(row["prompt"], row["chosen"], row["gold"])
    if isinstance(gold, str):
        return gold
    if is_blank(gold[2]) or (isinstance(gold[2], list) and not gold[2]):
        return "empty_completion"
    return pair[0], pair[1], pair[2], gold[2]


#: the fields that hold text or conversations, in any layout
TEXT_FIELDS = ("prompt", "chosen", "rejected", "gold", "completion", "messages")


def row_kind(row: dict[str, Any]) -> str | None:
    """How a row is rendered: ``"conversation"`` (chat template) when any text field holds a
    conversation, ``"text"`` when every present one is a string, ``None`` for neither (a row that
    will be dropped with its reason)."""
    kinds = {kind_of(row[f]) for f in TEXT_FIELDS if row.get(f) is not None}
    if "conversation" in kinds:
        return "conversation"
    return "text" if kinds == {"text"} else None
