"""``TripleDataModule``: TPO's triples (a gold completion besides the pair), batched in the
``TRIPLES`` layout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
from torch import Tensor

from ..contract import BatchLayout
from .base import TokenizedDataModule
from .collator import carry_columns, pad_sequences
from .tokenization import TripleEncoder


class TripleCollator:
    """The ``TRIPLES`` layout: chosen, rejected then gold sequences of ``B`` triples in one batch.

    Input rows carry ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``gold_ids``, ``row_id``
    and any of ``columns``. Output:

    * ``input_ids``, ``attention_mask``, ``completion_mask`` ``(3B, T)`` long (see
      :func:`~.collator.pad_sequences`): rows ``[0, B)`` prompt+chosen, ``[B, 2B)``
      prompt+rejected, ``[2B, 3B)`` prompt+gold (TRL's ``DataCollatorForTriplePreference`` order);
    * ``row_id`` ``(B,)`` long and each of ``columns`` ``(B,)`` float32.
    """

    def __init__(self, pad_token_id: int, columns: Sequence[str] = ()) -> None:
        self.pad_token_id = pad_token_id
        self.columns = tuple(columns)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        prompts = [list(r["prompt_ids"]) for r in rows]
        completions = [list(r[c]) for c in ("chosen_ids", "rejected_ids", "gold_ids") for r in rows]
        return carry_columns(pad_sequences(prompts * 3, completions, self.pad_token_id), rows, self.columns)


class TripleDataModule(TokenizedDataModule):
    """Triples ``prompt``, ``chosen``, ``rejected``, ``gold`` (strings or conversations) for TPO
    (:class:`~dpo_lightning.losses.TPOLoss`): ``gold`` is the best known completion, trained on
    with an NLL term. The prompt column is required. TRL names the gold column ``reference``;
    read such a dataset with ``data.init_args.columns: {reference: gold}``.

    Takes the arguments of :class:`~dpo_lightning.data.base.TokenizedDataModule`; ``batch_size``
    counts triples (the model sees ``3 * batch_size`` sequences).
    """

    layout = BatchLayout.TRIPLES
    text_fields = ("prompt", "chosen", "rejected", "gold")
    completion_fields = ("chosen_ids", "rejected_ids", "gold_ids")

    def columns_hint(self) -> str:
        return f"{type(self).__name__} reads {list(self.text_fields)} (TRL's triples name gold `reference`: {{reference: gold}})"

    def row_encoder(self, rows: datasets.Dataset) -> TripleEncoder:
        assert self.tokenizer is not None
        return TripleEncoder(self.tokenizer, self.settings, self.requirements.columns, **self.encoder_options())

    def collator(self) -> TripleCollator:
        assert self.tokenizer is not None
        return TripleCollator(self.tokenizer.pad_token_id, columns=self.batch_columns)


__all__ = ["TripleCollator", "TripleDataModule"]
