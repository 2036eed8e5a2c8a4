"""Collation: right-pad ``prompt + completion`` sequences; the pair layout ``[chosen; rejected]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad ``prompt_i + completion_i`` to the longest; every layout's collator uses this.

    Returns ``(N, T)`` long tensors:

    * ``input_ids``: the tokens, ``pad_token_id`` after each sequence's end;
    * ``attention_mask``: 1 on real tokens;
    * ``completion_mask``: 1 on completion tokens (what a loss scores).
    """
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    n, width = len(lengths), max(lengths)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def carry_columns(batch: dict[str, Tensor], rows: list[dict[str, Any]], columns: Sequence[str]) -> dict[str, Tensor]:
    """Add each per-row numeric column as a ``(B,)`` float32 tensor, and ``row_id`` ``(B,)`` long."""
    batch["row_id"] = torch.tensor([int(r["row_id"]) for r in rows], dtype=torch.long)
    for column in columns:
        batch[column] = torch.tensor([float(r[column]) for r in rows], dtype=torch.float32)
    return batch


class PairCollator:
    """The ``PAIRS`` layout: chosen then rejected sequences of ``B`` pairs in one batch.

    Input rows carry ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``row_id`` and any of
    ``columns``. Output:

    * ``input_ids``, ``attention_mask``, ``completion_mask`` ``(2B, T)`` long (see
      :func:`pad_sequences`): rows ``[0, B)`` are prompt+chosen, ``[B, 2B)`` prompt+rejected;
    * ``row_id`` ``(B,)`` long: the source row index of each pair;
    * each of ``columns`` ``(B,)`` float32.

    Args:
        pad_token_id: id written into padding (masked everywhere, so its value does not matter).
        columns: extra per-pair numeric columns to carry through (scores, reference log-probs).
    """

    def __init__(self, pad_token_id: int, columns: Sequence[str] = ()) -> None:
        self.pad_token_id = pad_token_id
        self.columns = tuple(columns)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        prompts = [list(r["prompt_ids"]) for r in rows]
        completions = [list(r["chosen_ids"]) for r in rows] + [list(r["rejected_ids"]) for r in rows]
        return carry_columns(pad_sequences(prompts + prompts, completions, self.pad_token_id), rows, self.columns)
