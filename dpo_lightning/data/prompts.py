"""Prompts alone, batched in the ``PROMPTS`` layout for online training (the module samples the
completions itself)."""

from __future__ import annotations

import json
from typing import Any

import datasets
import torch
from torch import Tensor

from ..contract import BatchLayout
from .base import TokenizedDataModule
from .formats import kind_of
from .tokenization import RowEncoder


class PromptEncoder(RowEncoder):
    """``prompt`` rows (a string, or a conversation rendered through the chat template with the
    generation prompt), by the rules of :mod:`.tokenization`: a string prompt gets the
    tokenizer's leading special tokens once; the prompt is cut to ``max_prompt_length``
    (``truncation_mode``); a prompt that leaves no room under ``max_length`` is dropped as
    ``too_long``.

    Returns ``prompt_ids``, ``prompt_json`` (the prompt as the row gives it, JSON-encoded so that
    strings and conversations share one column type), ``row_id``, ``drop_reason``, ``drop_detail``.
    """

    def drop(self, row_id: int, reason: str) -> dict[str, Any]:
        return {"prompt_ids": [], "prompt_json": "null", **self.outcome(row_id, reason)}

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        prompt = row.get("prompt")
        if prompt is None:
            return self.drop(index, "missing_field")
        if kind_of(prompt) is None:
            return self.drop(index, "wrong_type")
        encoded = self.encode(prompt, [])
        if isinstance(encoded, str):
            return self.drop(index, encoded)
        prompt_ids, _ = encoded
        return {"prompt_ids": prompt_ids, "prompt_json": json.dumps(prompt), **self.outcome(index)}


class PromptCollator:
    """The ``PROMPTS`` layout, left-padded for generation:

    * ``input_ids``, ``attention_mask`` ``(B, T)`` long: each prompt's tokens at the right end,
      ``pad_token_id`` (attention 0) before them;
    * ``row_id`` ``(B,)`` long: the source row of each prompt;
    * ``prompt``: a list of ``B`` prompts as the rows give them (strings or conversations), for
      the judge.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [list(r["prompt_ids"]) for r in rows]
        n, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1
        batch: dict[str, Tensor | list[Any]] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "row_id": torch.tensor([int(r["row_id"]) for r in rows], dtype=torch.long),
            "prompt": [json.loads(r["prompt_json"]) for r in rows],
        }
        return batch


class PromptDataModule(TokenizedDataModule):
    """Rows with a ``prompt`` column (strings, or conversations that get the chat template with the
    generation prompt); other columns are ignored. For
    :class:`~dpo_lightning.modules.online.OnlinePreferenceModule`, which samples the completions.

    Loading, splits (``val_data`` / ``val_fraction``), weighted mixtures, column renaming,
    caching and the drop report are :class:`~dpo_lightning.data.base.TokenizedDataModule`'s.
    ``max_length`` bounds the prompt (a prompt that fills it is dropped as ``too_long``); the
    completions the module generates add up to its ``max_new_tokens`` after the prompt.
    ``group_by_length`` batches prompts of similar length (less left-padding in generation).
    ``batch_size`` counts prompts; the module samples several completions for each.
    """

    layout = BatchLayout.PROMPTS
    text_fields = ("prompt",)
    completion_fields = ()

    def row_encoder(self, rows: datasets.Dataset) -> PromptEncoder:
        assert self.tokenizer is not None
        return PromptEncoder(self.tokenizer, self.settings, **self.encoder_options())

    def collator(self) -> PromptCollator:
        assert self.tokenizer is not None
        return PromptCollator(self.tokenizer.pad_token_id)

    def row_lengths(self, rows: datasets.Dataset) -> list[int]:
        """Each prompt's length (there are no completions yet)."""
        return [len(p) for p in rows["prompt_ids"]]
