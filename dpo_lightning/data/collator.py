"""Collate tokenized pairs into one ``[chosen; rejected]`` batch with dynamic padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class PairCollator:
    """Stack chosen then rejected sequences, right-padded to the longest in the batch.

    Input rows carry ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``row_id`` and any of
    ``score_columns``. Output for ``B`` rows:

    * ``input_ids`` ``(2B, T)`` long: rows ``[0, B)`` are prompt+chosen, ``[B, 2B)`` prompt+rejected;
    * ``attention_mask`` ``(2B, T)`` long: 1 on real tokens;
    * ``completion_mask`` ``(2B, T)`` long: 1 on completion tokens (what the loss scores);
    * ``row_id`` ``(B,)`` long: the source row index of each pair;
    * each score column ``(B,)`` float32.

    Args:
        pad_token_id: id written into padding (masked everywhere, so its value does not matter).
        pad_to_multiple_of: round ``T`` up (tensor-core friendly on GPU); ``None`` = exact.
        score_columns: extra per-pair float columns to carry through.
    """

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int | None = None, score_columns: Sequence[str] = ()
    ) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.score_columns = tuple(score_columns)

    def pad(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, Tensor]:
        """Right-pad ``prompt + completion`` sequences; ``(N, T)`` tensors."""
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(lengths)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        completion_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[i, : len(p) + len(c)] = 1
            completion_mask[i, len(p) : len(p) + len(c)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        prompts = [list(r["prompt_ids"]) for r in rows]
        batch = self.pad(prompts + prompts, [list(r["chosen_ids"]) for r in rows] + [list(r["rejected_ids"]) for r in rows])
        batch["row_id"] = torch.tensor([int(r["row_id"]) for r in rows], dtype=torch.long)
        for column in self.score_columns:
            batch[column] = torch.tensor([float(r[column]) for r in rows], dtype=torch.float32)
        return batch
