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
    """``prompt`` and ``completion`` (strings or conversations); the loss is on completion tokens.

    Takes the arguments of :class:`~dpo_lightning.data.base.TokenizedDataModule`.
    """

    layout = BatchLayout.COMPLETIONS
    text_fields = ("prompt", "completion")
    completion_fields = ("completion_ids",)

    def row_encoder(self, rows: datasets.Dataset) -> CompletionEncoder:
        assert self.tokenizer is not None
        return CompletionEncoder(self.tokenizer, self.settings)

    def collator(self) -> CompletionCollator:
        assert self.tokenizer is not None
        return CompletionCollator(self.tokenizer.pad_token_id)
