"""Score columns (ODPO's ``score_chosen`` / ``score_rejected`` ...) hold finite numbers."""

from __future__ import annotations

import datasets
import pyarrow as pa
import pyarrow.compute as pc

#: rows named in the message at most
SHOWN = 10


def check_finite(rows: datasets.Dataset, column: str, key: str) -> None:
    """Refuse a float ``column`` of ``rows`` holding NaN, +inf or -inf, naming the rows.

    A non-finite score is no preference strength: ODPO's offset ``log(s_w - s_l)`` would be
    infinite or NaN. Such rows are refused rather than dropped, since they point at a broken
    scoring run (a reward model that overflowed) rather than at one odd row. Missing values
    and values of other types are left to the row encoder (``missing_field``, ``wrong_type``).

    Raises:
        ValueError: naming ``key``, the column, the first rows (by index in the source) and values.
    """
    if column not in rows.column_names or len(rows) == 0:
        return
    values = rows.select_columns([column]).with_format("arrow")[column]
    if isinstance(values, pa.Table):
        values = values.column(0)
    if not pa.types.is_floating(values.type):
        return
    bad = pc.fill_null(pc.invert(pc.is_finite(values)), False)
    rows_bad = pc.indices_nonzero(pa.concat_arrays(bad.chunks) if isinstance(bad, pa.ChunkedArray) else bad).to_pylist()
    if not rows_bad:
        return
    shown = ", ".join(f"row {i}: {values[i].as_py()}" for i in rows_bad[:SHOWN])
    more = f" and {len(rows_bad) - SHOWN} more" if len(rows_bad) > SHOWN else ""
    raise ValueError(
        f"{key}: column {column!r} must hold finite numbers, but {len(rows_bad)} row(s) hold NaN or an infinity "
        f"({shown}{more}); fix the scores of these rows or remove them (dpo-lightning-score writes finite scores)"
    )
