"""Prompt / completion rows for supervised fine-tuning (the reference policy of an experiment)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .collator import PairCollator
from .datamodule import PreferenceDataModule
from .tokenization import PairTokenizer, UnpairedTokenizer


class CompletionTokenizer(UnpairedTokenizer):
    """``prompt``, ``completion`` rows (no label); same BOS/EOS and truncation rules."""

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        return super().__call__({**row, "label": True}, index)


class SFTCollator:
    """``input_ids``, ``attention_mask``, ``completion_mask`` ``(B, T)`` and ``row_id`` ``(B,)``."""

    def __init__(self, pad_token_id: int) -> None:
        self.padder = PairCollator(pad_token_id)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = self.padder.pad([list(r["prompt_ids"]) for r in rows], [list(r["completion_ids"]) for r in rows])
        batch["row_id"] = torch.tensor([int(r["row_id"]) for r in rows], dtype=torch.long)
        return batch


class SFTDataModule(PreferenceDataModule):
    """``prompt`` and ``completion`` (strings or conversations); the loss is on completion tokens.

    Takes the same arguments as :class:`PreferenceDataModule`.
    """

    paired = True  # SFT has no preference loss to check against
    text_fields = ("prompt", "completion")
    optional_field = None
    completion_fields = ("completion_ids",)

    def _bind_to_module(self) -> None:
        loss = getattr(self.trainer.lightning_module, "loss", None) if self.trainer is not None else None
        if loss is not None:
            raise ValueError("SFTDataModule goes with SFTModule, which has no preference loss")
        super()._bind_to_module()

    def row_function(self, rows) -> PairTokenizer:
        assert self.tokenizer is not None
        return CompletionTokenizer(self.tokenizer, self.settings)

    def collator(self) -> SFTCollator:
        assert self.tokenizer is not None
        return SFTCollator(self.tokenizer.pad_token_id)
