"""Prompt / completion rows for supervised fine-tuning, batched in the ``COMPLETIONS`` layout."""

from __future__ import annotations

from typing import Any

import datasets
from torch import Tensor

from ..contract import BatchLayout
from .base import TokenizedDataModule
from .collator import carry_columns, pad_sequences
from .tokenization import CompletionEncoder


class CompletionCollator:
    """The ``COMPLETIONS`` layout: ``input_ids``, ``attention_mask``, ``completion_mask``
    ``(B, T)`` and ``row_id`` ``(B,)``, one ``prompt + completion`` per row."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        prompts = [list(r["prompt_ids"]) for r in rows]
        completions = [list(r["completion_ids"]) for r in rows]
        return carry_columns(pad_sequences(prompts, completions, self.pad_token_id), rows, ())


class SFTDataModule(TokenizedDataModule):
    """``prompt`` and ``completion`` (strings or conversations), or one ``messages`` column of
    conversations; the loss is on completion tokens.

    ``messages`` (the usual chat SFT format): the completion is the conversation's last message,
    which must be the assistant's (a row that ends with another role is dropped as
    ``no_final_assistant``); the prompt is every message before it, rendered through the chat
    template with the generation prompt. So each row trains on its final assistant turn only
    (TRL's SFTTrainer trains on the whole conversation, or on every assistant turn with
    ``assistant_only_loss``; split a multi-turn conversation into one row per turn for that).

    Takes the arguments of :class:`~dpo_lightning.data.base.TokenizedDataModule`.
    """

    layout = BatchLayout.COMPLETIONS
    text_fields = ("prompt", "completion")
    convertible_fields = ("messages",)
    completion_fields = ("completion_ids",)

    @staticmethod
    def uses_messages(rows: datasets.Dataset) -> bool:
        """True when the rows are ``messages`` conversations (and have no ``completion`` column)."""
        return "messages" in rows.column_names and "completion" not in rows.column_names

    def needed_columns(self, rows: datasets.Dataset) -> tuple[str, ...]:
        return ("messages",) if self.uses_messages(rows) else self.text_fields

    def columns_hint(self) -> str:
        return f"{type(self).__name__} reads ['prompt', 'completion'], or one 'messages' column of conversations"

    def row_encoder(self, rows: datasets.Dataset) -> CompletionEncoder:
        assert self.tokenizer is not None
        return CompletionEncoder(self.tokenizer, self.settings, **self.encoder_options())

    def collator(self) -> CompletionCollator:
        assert self.tokenizer is not None
        return CompletionCollator(self.tokenizer.pad_token_id)
