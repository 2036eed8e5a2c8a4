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
}


@dataclass
class DataReport:
    """Counts for one split, filled by the tokenization pass.

    Attributes:
        split: ``"train"`` or ``"val"``.
        rows_read: rows in the source after ``max_rows``.
        dropped: reason -> count.
        examples: reason -> the first few source row indices dropped for it.
        prompt_lengths / completion_lengths: token counts of kept rows (completions: all of them).
    """

    split: str
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)
    completion_lengths: list[int] = field(default_factory=list)

    @property
    def rows_kept(self) -> int:
        return self.rows_read - sum(self.dropped.values())

    def record_drop(self, reason: str, row_id: int, max_examples: int = 5) -> None:
        if reason not in DROP_REASONS:
            raise KeyError(f"unknown drop reason {reason!r}")
        self.dropped[reason] += 1
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
        for name, values in (("prompt_tokens", self.prompt_lengths), ("completion_tokens", self.completion_lengths)):
            for stat, value in self._stats(values).items():
                out[f"data/{self.split}/{name}/{stat}"] = value
        return out

    def format(self) -> str:
        """A short human table."""
        lines = [f"[data:{self.split}] rows read {self.rows_read}, kept {self.rows_kept}, dropped {sum(self.dropped.values())}"]
        for reason, count in sorted(self.dropped.items()):
            lines.append(
                f"  dropped {count:>6}  {reason:<18} rows {self.examples.get(reason, [])}  ({DROP_REASONS[reason]})"
            )
        for name, values in (("prompt tokens", self.prompt_lengths), ("completion tokens", self.completion_lengths)):
            s = self._stats(values)
            lines.append(
                f"  {name:<18} min {s['min']}  median {s['median']:.0f}  p95 {s['p95']:.0f}  max {s['max']}"
            )
        return "\n".join(lines)
