"""Unpaired rows (``prompt``, ``completion``, ``label``): for KTO with mismatched KL pairs
(``UNPAIRED_WITH_KL``), for BCO without them (``UNPAIRED``)."""

from __future__ import annotations

from typing import Any, ClassVar

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from ..contract import BatchLayout, DataRequirements
from .base import TokenizedDataModule
from .collator import pad_sequences
from .formats import normalize_pair
from .map_cache import checked_map
from .tokenization import UnpairedEncoder


class UnpairedCollator:
    """The ``UNPAIRED_WITH_KL`` layout (``with_kl=True``, default): ``B`` labelled completions plus
    ``B`` mismatched pairs for KTO's KL estimate; the ``UNPAIRED`` layout (``with_kl=False``):
    the ``B`` labelled completions only.

    Output:

    * ``input_ids``, ``attention_mask``, ``completion_mask``: with KL rows ``(2B, T)``: rows
      ``[0, B)`` are ``prompt_i + completion_i``; rows ``[B, 2B)`` are ``prompt_i + completion_j``
      with ``j`` the first of ``i+1, i+2, ...`` (cyclically) whose prompt differs from row ``i``'s,
      so a KL row never pairs a prompt with one of its own completions (cut to ``max_length``).
      Without: ``(B, T)``, row ``i`` is ``prompt_i + completion_i``;
    * ``label`` ``(B,)`` bool (True = desirable), ``row_id`` ``(B,)`` long.

    With KL rows, a batch of one row, or whose rows all share one prompt, has no mismatched pair:
    that is an error (use ``batch_size >= 2``; shuffle the data). Without, any batch is fine.
    """

    def __init__(self, pad_token_id: int, max_length: int, with_kl: bool = True) -> None:
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.with_kl = with_kl

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
        if not self.with_kl:
            batch = pad_sequences([list(r["prompt_ids"]) for r in rows], [list(r["completion_ids"]) for r in rows],
                                  self.pad_token_id)
            batch["label"] = torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool)
            batch["row_id"] = torch.tensor([int(r["row_id"]) for r in rows], dtype=torch.long)
            return batch
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
    """Unpaired ``prompt``, ``completion``, ``label`` (bool) rows, for :class:`KTOLoss` and
    :class:`~dpo_lightning.losses.bco.BCOLoss`.

    It produces either of two layouts, the one the loss asks for at :meth:`connect`:
    ``UNPAIRED_WITH_KL`` (KTO; also the layout before ``connect``) adds a mismatched
    prompt/completion row per row for the KL estimate; ``UNPAIRED`` (BCO) holds the labelled
    rows only (see :class:`UnpairedCollator`).

    A source with ``prompt``/``chosen``/``rejected`` columns instead is unpaired
    automatically: each pair gives a desirable row (chosen) then an undesirable one
    (rejected), so row ``2k`` and ``2k + 1`` of the report come from pair ``k``.
    Takes the arguments of :class:`~dpo_lightning.data.base.TokenizedDataModule`;
    ``batch_size`` must be >= 2.
    """

    layout = BatchLayout.UNPAIRED_WITH_KL
    #: every layout this module produces; :attr:`layout` is the one ``connect`` was asked for
    layouts: ClassVar[tuple[BatchLayout, ...]] = (BatchLayout.UNPAIRED_WITH_KL, BatchLayout.UNPAIRED)
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

    def connect(self, tokenizer: Any, requirements: DataRequirements | None = None) -> None:
        """As :meth:`TokenizedDataModule.connect`; ``requirements.layout`` may be ``UNPAIRED_WITH_KL``
        or ``UNPAIRED``, and picks the layout of the batches from then on."""
        if requirements is not None and requirements.layout in self.layouts:
            self.layout = requirements.layout
        super().connect(tokenizer, requirements)

    @property
    def with_kl(self) -> bool:
        """Whether batches carry KTO's mismatched KL rows (the ``UNPAIRED_WITH_KL`` layout)."""
        return self.layout == BatchLayout.UNPAIRED_WITH_KL

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

        return checked_map(rows, unpair, batched=True, remove_columns=rows.column_names, desc="unpairing")

    def tokenize(self, rows: datasets.Dataset, split: str, key: str, **kwargs: Any) -> datasets.Dataset:
        tokenized = super().tokenize(rows, split, key, **kwargs)
        labels = set(tokenized["label"])
        if split == "train" and len(labels) == 1:
            only = "desirable" if labels.pop() else "undesirable"
            loss = "KTO needs" if self.with_kl else "an unpaired loss (BCO: a desirable / undesirable classifier) needs"
            raise ValueError(
                f"{key}: after validation the rows are only {only}; {loss} both labels "
                "(True and False) in the training data"
            )
        return tokenized

    def row_encoder(self, rows: datasets.Dataset) -> UnpairedEncoder:
        assert self.tokenizer is not None
        return UnpairedEncoder(self.tokenizer, self.settings, **self.encoder_options())

    def collator(self) -> UnpairedCollator:
        assert self.tokenizer is not None
        return UnpairedCollator(self.tokenizer.pad_token_id, self.settings.max_length, with_kl=self.with_kl)

    def drop_last_train_batch(self, rows_per_epoch: int) -> bool:
        # With KL rows, a final batch of one row cannot be paired; skip it. The order differs
        # every epoch, so a different row sits out each time and none is lost for good.
        return self.with_kl and rows_per_epoch % self.batch_size == 1

    def val_dataloader(self) -> DataLoader | list:
        if self.with_kl and self.val_dataset is not None and len(self.val_dataset) % self.eval_batch_size == 1:
            raise ValueError(
                f"data: {len(self.val_dataset)} validation rows leave a last batch of 1, which KTO cannot "
                f"score; choose data.init_args.eval_batch_size so the remainder is not 1"
            )
        return super().val_dataloader()
