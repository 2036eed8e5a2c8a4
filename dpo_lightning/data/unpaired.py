"""Unpaired rows (``prompt``, ``completion``, ``label``) for KTO, with mismatched KL pairs."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from ..contract import BatchLayout
from .base import TokenizedDataModule
from .collator import pad_sequences
from .formats import normalize_pair
from .tokenization import UnpairedEncoder


class UnpairedCollator:
    """The ``UNPAIRED_WITH_KL`` layout: ``B`` labelled completions plus ``B`` mismatched pairs
    for KTO's KL estimate.

    Output:

    * ``input_ids``, ``attention_mask``, ``completion_mask`` ``(2B, T)``: rows ``[0, B)`` are
      ``prompt_i + completion_i``; rows ``[B, 2B)`` are ``prompt_i + completion_j`` with ``j``
      the first of ``i+1, i+2, ...`` (cyclically) whose prompt differs from row ``i``'s, so a KL
      row never pairs a prompt with one of its own completions (cut to ``max_length``);
    * ``label`` ``(B,)`` bool (True = desirable), ``row_id`` ``(B,)`` long.

    A batch of one row, or whose rows all share one prompt, has no mismatched pair: that is an
    error (use ``batch_size >= 2``; shuffle the data).
    """

    def __init__(self, pad_token_id: int, max_length: int) -> None:
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    @staticmethod
    def partner(prompts: list[list[int]], i: int) -> int:
        """The row whose completion row ``i``'s prompt is paired with for the KL estimate."""
        n = len(prompts)
        for step in range(1, n):
            if prompts[(i + step) % n] != prompts[i]:
                return (i + step) % n
        raise ValueError(
            f"KTO: every row of this batch of {n} has the same prompt, so no KL row can pair it with "
            "another prompt's completion; raise data.init_args.batch_size or shuffle the rows"
        )

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        n = len(rows)
        if n < 2:
            raise ValueError(
                "KTO needs at least 2 rows per batch to pair prompts with other rows' completions "
                "for the KL estimate; set data.init_args.batch_size (and eval_batch_size) >= 2"
            )
        prompts = [list(r["prompt_ids"]) for r in rows]
        completions = [list(r["completion_ids"]) for r in rows]
        mismatched = [completions[self.partner(prompts, i)][: self.max_length - len(prompts[i])] for i in range(n)]
        batch = pad_sequences(prompts + prompts, completions + mismatched, self.pad_token_id)
        batch["label"] = torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool)
        batch["row_id"] = torch.tensor([int(r["row_id"]) for r in rows], dtype=torch.long)
        return batch


class UnpairedDataModule(TokenizedDataModule):
    """Unpaired ``prompt``, ``completion``, ``label`` (bool) rows, for :class:`KTOLoss`.

    A source with ``prompt``/``chosen``/``rejected`` columns instead is unpaired
    automatically: each pair gives a desirable row (chosen) then an undesirable one
    (rejected), so row ``2k`` and ``2k + 1`` of the report come from pair ``k``.
    Takes the arguments of :class:`~dpo_lightning.data.base.TokenizedDataModule`;
    ``batch_size`` must be >= 2.
    """

    layout = BatchLayout.UNPAIRED_WITH_KL
    text_fields = ("prompt", "completion", "label")
    convertible_fields = ("chosen", "rejected")
    completion_fields = ("completion_ids",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.batch_size < 2 or self.eval_batch_size < 2:
            raise ValueError(
                "data.init_args.batch_size and data.init_args.eval_batch_size must be >= 2 for unpaired (KTO) data: "
                "the KL estimate pairs each prompt with another row's completion"
            )

    def columns_hint(self) -> str:
        return (
            f"{type(self).__name__} reads ['prompt', 'completion', 'label'] "
            "(or paired 'chosen' / 'rejected' rows, which it unpairs)"
        )

    def prepare_rows(self, rows: datasets.Dataset, key: str) -> datasets.Dataset:
        columns = set(rows.column_names)
        if "completion" in columns or not {"chosen", "rejected"} <= columns:
            return rows
        rank_zero_info(f"{key}: paired rows found; unpairing them (chosen -> desirable, rejected -> undesirable)")
        has_prompt = "prompt" in columns

        def unpair(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"prompt": [], "completion": [], "label": []}
            for i in range(len(batch["chosen"])):
                row = {name: values[i] for name, values in batch.items()}
                normalized = normalize_pair(row, has_prompt)
                # a bad pair stays as-is, so that validation reports it with its reason
                prompt, chosen, rejected = (
                    normalized if not isinstance(normalized, str) else (row.get("prompt"), row["chosen"], row["rejected"])
                )
                out["prompt"] += [prompt, prompt]
                out["completion"] += [chosen, rejected]
                out["label"] += [True, False]
            return out

        return rows.map(unpair, batched=True, remove_columns=rows.column_names, desc="unpairing")

    def tokenize(self, rows: datasets.Dataset, split: str, key: str, **kwargs: Any) -> datasets.Dataset:
        tokenized = super().tokenize(rows, split, key, **kwargs)
        labels = set(tokenized["label"])
        if split == "train" and len(labels) == 1:
            only = "desirable" if labels.pop() else "undesirable"
            raise ValueError(
                f"{key}: after validation the rows are only {only}; KTO needs both labels "
                "(True and False) in the training data"
            )
        return tokenized

    def row_encoder(self, rows: datasets.Dataset) -> UnpairedEncoder:
        assert self.tokenizer is not None
        return UnpairedEncoder(self.tokenizer, self.settings, **self.encoder_options())

    def collator(self) -> UnpairedCollator:
        assert self.tokenizer is not None
        return UnpairedCollator(self.tokenizer.pad_token_id, self.settings.max_length)

    def drop_last_train_batch(self, rows_per_epoch: int) -> bool:
        # A final batch of one row cannot be paired; skip it. The order differs every epoch,
        # so a different row sits out each time and none is lost for good.
        return rows_per_epoch % self.batch_size == 1

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is not None and len(self.val_dataset) % self.eval_batch_size == 1:
            raise ValueError(
                f"data: {len(self.val_dataset)} validation rows leave a last batch of 1, which KTO cannot "
                f"score; choose data.init_args.eval_batch_size so the remainder is not 1"
            )
        return super().val_dataloader()
