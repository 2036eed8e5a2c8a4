"""Read rows with ``datasets``: a hub dataset name, a local folder, or local files."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import datasets
from datasets.exceptions import DatasetGenerationError

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.path.exists(source) or any(
        source.endswith(ext) for ext in _BUILDERS
    )


def load_rows(
    source: str | Sequence[str],
    *,
    key: str,
    config: str | None = None,
    split: str = "train",
    max_rows: int | None = None,
) -> datasets.Dataset:
    """Load one split as a :class:`datasets.Dataset`.

    Args:
        source: a hub dataset name (``"org/name"``), a local folder ``datasets`` can read, or one
            or more local files / globs ending in ``.json``, ``.jsonl``, ``.parquet`` or ``.csv``.
        key: the config key this came from, named in errors (e.g. ``data.train_data``).
        config: the hub dataset's configuration name.
        split: the split to read from a hub name or folder.
        max_rows: keep only the first ``max_rows`` rows (for quick runs).
    """
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise ValueError(f"{key} is empty; give a hub dataset name or local files")
    if all(_is_local(s) for s in sources):
        files: list[str] = []
        for s in sources:
            if os.path.isdir(s) and len(sources) == 1:
                return _limit(datasets.load_dataset(s, name=config, split=split), max_rows)
            matched = sorted(glob.glob(os.path.expanduser(s)))
            if not matched:
                raise FileNotFoundError(f"{key}: no file matches {s!r}")
            files.extend(matched)
        extensions = {os.path.splitext(f)[1].lower() for f in files}
        builders = {_BUILDERS.get(ext) for ext in extensions}
        if None in builders or len(builders) != 1:
            raise ValueError(
                f"{key}: files must all be .json/.jsonl, .parquet or .csv (one kind), got {sorted(extensions)}"
            )
        builder = builders.pop()
        if builder in ("json", "csv"):
            for f in files:
                check_utf8(f, key)
        with explain_errors(key):
            rows = datasets.load_dataset(builder, data_files=files, split="train")
    elif len(sources) == 1:
        with explain_errors(key):
            rows = datasets.load_dataset(sources[0], name=config, split=split)
    else:
        raise ValueError(f"{key}: give one hub dataset name, or local files, not a mix: {sources}")
    return _limit(rows, max_rows)


def check_utf8(path: str, key: str) -> None:
    """Raise ``ValueError`` naming the file, line and byte of the first invalid UTF-8 sequence."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{key}: {path} line {number} is not valid UTF-8 (byte 0x{line[err.start]:02x} at column "
                    f"{err.start + 1}); re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from None


@contextmanager
def explain_errors(key: str) -> Iterator[None]:
    """Re-raise a ``datasets`` loading failure as one message naming the config key and the cause."""
    try:
        yield
    except (DatasetGenerationError, ValueError, TypeError) as err:
        cause = err.__cause__ or err
        raise ValueError(
            f"{key}: could not read the data ({type(cause).__name__}: {str(cause).splitlines()[0][:300]}). "
            "Check that every row has the same columns and types, and the file's format matches its extension"
        ) from err


def _limit(rows: datasets.Dataset, max_rows: int | None) -> datasets.Dataset:
    if max_rows is None or max_rows >= len(rows):
        return rows
    return rows.select(range(max_rows))
