"""What happened to every row at setup: kept, or dropped with a reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# Reasons a row can be dropped. Each has a one-line explanation and a fix shown in the report.
DROP_REASONS: dict[str, str] = {
    "missing_field": "a required field is null/missing: fill it or remove the row",
    "wrong_type": "a field has the wrong type (e.g. not a string): convert it",
    "empty_completion": "chosen/rejected/completion is empty or whitespace: remove the row",
    "empty_prompt": "empty prompt and the tokenizer has no BOS: nothing to condition on",
    "identical_pair": "chosen is identical to rejected: no preference signal",
    "too_long": "prompt alone fills max_length: raise max_length or set max_prompt_length",
    "template_mismatch": "chat template output for the prompt is not a prefix of the full conversation",
    "template_error": "the chat template raised on this row (e.g. roles that do not alternate): fix the row or the template",
    "no_final_assistant": "`messages` does not end with an assistant message: SFT trains on that last reply; add it or remove the row",
}


@dataclass
class SourceCount:
    """How many rows one source of a weighted mixture gave (``data.init_args.train_data: [{path, fraction | rows}]``).

    Attributes:
        name: the source as the recipe names it (its path or hub id, or ``"in-memory"``).
        available: rows the source holds (its split, after ``columns`` renaming).
        taken: rows sampled from it (``fraction`` / ``rows``, capped by ``max_rows``).
    """

    name: str
    available: int
    taken: int



@dataclass
class DataReport:
    """Counts for one split, filled by the tokenization pass.

    Attributes:
        split: ``"train"`` or ``"val"``.
        rows_read: rows in the source after ``max_rows``.
        dropped: reason -> count.
        examples: reason -> the first few source row indices dropped for it.
        prompt_lengths / completion_lengths: token counts of kept rows (completions: all of them).
        sources: for a weighted mixture, the rows each source gave, in order (rows
            ``[0, taken_0)`` come from the first source, and so on, before any ``val_fraction`` split).
        details: reason -> the first explanation recorded for it (e.g. a chat template's message).
    """

    split: str
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)
    completion_lengths: list[int] = field(default_factory=list)
    sources: list[SourceCount] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)

    @property
    def rows_kept(self) -> int:
        return self.rows_read - sum(self.dropped.values())

    def record_drop(self, reason: str, row_id: int, max_examples: int = 5, detail: str = "") -> None:
        if reason not in DROP_REASONS:
            raise KeyError(f"unknown drop reason {reason!r}")
        self.dropped[reason] += 1
        if detail and reason not in self.details:
            self.details[reason] = f"row {row_id}: {detail}"
        ids = self.examples.setdefault(reason, [])
        if len(ids) < max_examples:
            ids.append(row_id)

    @staticmethod
    def _stats(values: list[int]) -> dict[str, float]:
        if not values:
            return {"min": 0, "median": 0, "p95": 0, "max": 0}
        arr = np.asarray(values)
        return {
            "min": int(arr.min()),
            "median": float(np.median(arr)),
            "p95": float(np.percentile(arr, 95)),
            "max": int(arr.max()),
        }

    def as_dict(self) -> dict[str, float]:
        """Flat numbers, suitable for ``logger.log_hyperparams``."""
        out: dict[str, float] = {f"data/{self.split}/rows_read": self.rows_read, f"data/{self.split}/rows_kept": self.rows_kept}
        for reason, count in sorted(self.dropped.items()):
            out[f"data/{self.split}/dropped/{reason}"] = count
        for i, source in enumerate(self.sources):
            out[f"data/{self.split}/source{i}/rows"] = source.taken
        for name, values in (("prompt_tokens", self.prompt_lengths), ("completion_tokens", self.completion_lengths)):
            for stat, value in self._stats(values).items():
                out[f"data/{self.split}/{name}/{stat}"] = value
        return out

    def format(self) -> str:
        """A short human table."""
        lines = [f"[data:{self.split}] rows read {self.rows_read}, kept {self.rows_kept}, dropped {sum(self.dropped.values())}"]
        for i, source in enumerate(self.sources):
            lines.append(f"  source {i}: {source.taken:>6} of {source.available} rows from {source.name}")
        for reason, count in sorted(self.dropped.items()):
            lines.append(
                f"  dropped {count:>6}  {reason:<18} rows {self.examples.get(reason, [])}  ({DROP_REASONS[reason]})"
            )
            if reason in self.details:
                lines.append(f"           first: {self.details[reason]}")
        for name, values in (("prompt tokens", self.prompt_lengths), ("completion tokens", self.completion_lengths)):
            if name == "completion tokens" and not any(values):  # prompt-only rows (online training)
                continue
            s = self._stats(values)
            lines.append(
                f"  {name:<18} min {s['min']}  median {s['median']:.0f}  p95 {s['p95']:.0f}  max {s['max']}"
            )
        return "\n".join(lines)
