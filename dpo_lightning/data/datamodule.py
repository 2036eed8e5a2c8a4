"""``PreferenceDataModule``: preference pairs, batched in the ``PAIRS`` layout."""

from __future__ import annotations

import datasets
from lightning.pytorch.utilities import rank_zero_info

from ..contract import BatchLayout
from .base import TokenizedDataModule
from .collator import PairCollator
from .tokenization import PairEncoder


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs (``prompt``, ``chosen``, ``rejected``) for pairwise losses and reward models.

    Rows are strings or conversations, or the mixes TRL accepts (a string ``prompt`` with
    conversational ``chosen`` / ``rejected``, as in UltraFeedback-binarized; see :mod:`.formats`);
    without a ``prompt`` column the prompt is the common prefix of ``chosen`` and ``rejected``.
    Extra numeric columns the loss asks for (ODPO's scores, a reward model's margin) are carried
    into the batch.
    Arguments: see :class:`~dpo_lightning.data.base.TokenizedDataModule`; ``batch_size`` counts
    pairs (the model sees ``2 * batch_size`` sequences).
    """

    layout = BatchLayout.PAIRS
    text_fields = ("prompt", "chosen", "rejected")
    optional_field = "prompt"
    completion_fields = ("chosen_ids", "rejected_ids")

    def row_encoder(self, rows: datasets.Dataset) -> PairEncoder:
        assert self.tokenizer is not None
        has_prompt = "prompt" in rows.column_names
        if not has_prompt:
            rank_zero_info("no `prompt` column: each prompt is the common prefix of chosen and rejected")
        return PairEncoder(
            self.tokenizer, self.settings, self.requirements.columns, has_prompt=has_prompt, **self.encoder_options()
        )

    def collator(self) -> PairCollator:
        assert self.tokenizer is not None
        return PairCollator(self.tokenizer.pad_token_id, columns=self.batch_columns)
