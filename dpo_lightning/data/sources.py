"""Weighted mixtures of sources, column renaming, and the checks that every source's rows are
of one kind (all plain strings or all conversations) and named as the data modules read them.

A mixture is a list of :class:`DataSource`; :meth:`~dpo_lightning.data.TokenizedDataModule.load_split`
reads each source, renames and checks it, samples it (:func:`sample_rows`) and joins them
(:func:`combine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Union

import datasets
import numpy as np

from .formats import TEXT_FIELDS, row_kind


@dataclass
class DataSource:
    """One source of a weighted mixture::

        train_data:
          - {path: data/a.jsonl, fraction: 0.5}
          - {path: org/prefs, rows: 1000, split: train}

    Attributes:
        path: what a plain ``train_data`` may be (hub id, folder, file or glob; from Python also a
            ``Dataset``, ``DatasetDict`` or list of row dicts).
        fraction: keep this fraction of the source's rows, in (0, 1].
        rows: keep this many rows (at most the source's size). Neither: every row.
        split: the split to read (hub id, folder, ``DatasetDict``); default the data module's.
        config / data_dir: the hub dataset's configuration name and data folder; default the data module's.
        columns: this source's own renaming ``{its_name: canonical_name}``, applied before
            ``data.init_args.columns``.

    Rows are sampled without replacement, seeded by ``data.init_args.split_seed``, and keep
    their order within the source; the report says how many came from each source.
    """

    path: Any
    fraction: float | None = None
    rows: int | None = None
    split: str | None = None
    config: str | None = None
    data_dir: str | None = None
    columns: dict[str, str] | None = None

    def describe(self) -> str:
        """The source as a recipe names it."""
        return self.path if isinstance(self.path, str) else f"in-memory {type(self.path).__name__}"


#: what ``train_data`` / ``val_data`` accept (see the module docstring)
DataSpec = Union[
    str, list[str], list[Union[str, DataSource]], datasets.Dataset, datasets.DatasetDict, list[dict[str, Any]]
]
_SOURCE_KEYS = tuple(f.name for f in fields(DataSource))


def is_source(item: Any) -> bool:
    """A :class:`DataSource`, or a dict that describes one (it has a ``path``)."""
    return isinstance(item, DataSource) or (isinstance(item, dict) and "path" in item)


def as_sources(data: Any, key: str) -> list[DataSource] | None:
    """``data`` as a weighted mixture, or ``None`` when it is not one (a path, files, rows).

    A list is a mixture when its items are sources (:func:`is_source`) or plain paths, at least
    one being a source. Raises ``ValueError`` naming ``key[i]`` for an unknown key or a bad weight.
    """
    if not isinstance(data, (list, tuple)) or not any(is_source(item) for item in data):
        return None
    sources = []
    for i, item in enumerate(data):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            item = DataSource(path=item)
        elif isinstance(item, dict):
            unknown = sorted(set(item) - set(_SOURCE_KEYS))
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {unknown}; a source takes {list(_SOURCE_KEYS)}")
            item = DataSource(**item)
        elif not isinstance(item, DataSource):
            raise ValueError(
                f"{where}: {type(item).__name__} in a list of sources; give each as {{path: ..., fraction: ...}} "
                "or a plain path"
            )
        check_source(item, where)
        sources.append(item)
    return sources


def check_source(source: DataSource, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` for a weight that cannot be used."""
    if source.fraction is not None and source.rows is not None:
        raise ValueError(f"{where}: set fraction or rows, not both")
    if source.fraction is not None and not (isinstance(source.fraction, (int, float)) and 0 < source.fraction <= 1):
        raise ValueError(f"{where}.fraction must be in (0, 1], got {source.fraction!r}")
    if source.rows is not None and not (isinstance(source.rows, int) and not isinstance(source.rows, bool) and source.rows >= 1):
        raise ValueError(f"{where}.rows must be an integer >= 1, got {source.rows!r}")
    if source.path is None or (isinstance(source.path, str) and not source.path.strip()):
        raise ValueError(f"{where}.path is empty; give a file, folder or hub dataset id")


def value_kind(value: Any) -> str:
    """A name for the kind of one cell, for messages about columns that mix kinds."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "plain strings"
    if isinstance(value, bool):
        return "booleans"
    if isinstance(value, (int, float)):
        return "numbers"
    if row_kind({"prompt": value}) == "conversation":
        return "conversations"
    return type(value).__name__ + "s"


def rows_from_list(rows: list[dict[str, Any]], key: str) -> datasets.Dataset:
    """A ``Dataset`` of in-memory row dicts; rows that mix plain strings and conversations, or a
    column that mixes kinds, is an error naming the first row of each kind."""
    check_one_kind([row_kind(r) for r in rows], key)
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as err:  # pyarrow's type errors; find the column that mixes kinds
        for column in dict.fromkeys(c for r in rows for c in r):
            first: dict[str, int] = {}
            for i, r in enumerate(rows):
                first.setdefault(value_kind(r.get(column)), i)
            first.pop("null", None)
            if len(first) > 1:
                (a, i), (b, j) = list(first.items())[:2]
                raise ValueError(
                    f"{key}: column {column!r} holds {a} (first: row {i}) and {b} (first: row {j}); "
                    "give every row the same kind of value in it"
                ) from err
        raise ValueError(f"{key}: cannot make a dataset of these rows ({type(err).__name__}: {err})") from err


def mixed_kinds_message(key: str, text_row: str, conversation_row: str) -> str:
    """The error for rows of one dataset that mix plain strings and conversations."""
    return (
        f"{key}: the rows mix plain strings (first: {text_row}) and conversations (first: {conversation_row}); "
        "the string rows would be tokenized as raw text and the others through the chat template. Make them one "
        "kind: turn the strings into conversations (prompt -> [{role: user, content: ...}], each completion -> "
        "[{role: assistant, content: ...}]), or render the conversations to text"
    )


def check_one_kind(kinds: Sequence[str | None], key: str) -> dict[str, int]:
    """``{kind: first row}`` of per-row kinds (see :func:`.formats.row_kind`); both kinds is an error."""
    first: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        if kind is not None and kind not in first:
            first[kind] = i
            if len(first) == 2:
                raise ValueError(mixed_kinds_message(key, f"row {first['text']}", f"row {first['conversation']}"))
    return first


def feature_kind(feature: Any) -> str | None:
    """``"text"`` for a string column, ``"conversation"`` for a list of ``{role, content}``
    structs, ``None`` when the column must be read to know (e.g. a JSON column of mixed values)."""
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "text"
    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    if isinstance(inner, dict) and {"role", "content"} <= set(inner):
        return "conversation"
    return None


def first_rows_by_kind(rows: datasets.Dataset, key: str, fields: Sequence[str] = TEXT_FIELDS) -> dict[str, int]:
    """``{kind: first row}`` of ``rows`` (``"text"`` / ``"conversation"``, see :func:`.formats.row_kind`)
    over the text ``fields`` a module reads; an error naming the first row of each when both
    occur. Reads the rows only when the column types leave it open (JSON columns that hold both)."""
    present = [f for f in fields if f in rows.column_names]
    if not present or len(rows) == 0:
        return {}
    types = {feature_kind(rows.features[f]) for f in present}
    if "conversation" in types:
        return {"conversation": 0}
    if types == {"text"}:
        return {"text": 0}
    return check_one_kind([row_kind(r) for r in rows.select_columns(present)], key)


def rename_columns(rows: datasets.Dataset, mapping: dict[str, str] | None, key: str, source: str) -> datasets.Dataset:
    """Rename ``{source_name: canonical_name}``; a source column that is absent, or a target that
    already exists, is an error naming ``key`` (the mapping's config key)."""
    if not mapping:
        return rows
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"{key} must map column names to column names, e.g. {{question: prompt}}; got {mapping!r}")
    missing = [name for name in mapping if name not in rows.column_names]
    if missing:
        raise ValueError(
            f"{key}: column(s) {missing} are not in {source}; its columns are {rows.column_names} "
            "(names are case-sensitive): fix the names in the mapping"
        )
    targets = [t for s, t in mapping.items() if s != t]
    if len(set(targets)) != len(targets):
        raise ValueError(f"{key}: two columns are mapped to the same name: {mapping}")
    for name, target in mapping.items():
        if name != target and target in rows.column_names and target not in mapping:
            raise ValueError(
                f"{key}: maps {name!r} to {target!r}, but {source} already has a {target!r} column; "
                f"map that one to another name as well (e.g. {target}: {target}_original)"
            )
    return rows.rename_columns({s: t for s, t in mapping.items() if s != t})


def check_column_case(rows: datasets.Dataset, expected: Sequence[str], key: str) -> None:
    """A column named like an expected one but for case or spaces (``Prompt``) is an error: it
    would be ignored (and a prompt inferred) without a word."""
    for name in expected:
        if name in rows.column_names:
            continue
        near = [c for c in rows.column_names if c.strip().lower() == name.lower()]
        if near:
            raise ValueError(
                f"{key}: column {near[0]!r} looks like {name!r}, but column names are case-sensitive, so it would be "
                f"ignored; rename it to {name!r}, or set data.init_args.columns: {{{near[0]!r}: {name!r}}}"
            )


def sample_rows(rows: datasets.Dataset, source: DataSource, seed: int, where: str) -> datasets.Dataset:
    """``source.fraction`` / ``source.rows`` of ``rows``, drawn without replacement with ``seed``,
    in their original order."""
    total = len(rows)
    if source.rows is not None:
        n = source.rows
        if n > total:
            raise ValueError(
                f"{where}.rows asks for {n} rows but {source.describe()} has {total}; lower rows, or use fraction"
            )
    elif source.fraction is not None:
        n = round(source.fraction * total)
        if n == 0:
            raise ValueError(f"{where}.fraction {source.fraction} of {total} rows is 0 rows; raise it or leave the source out")
    else:
        return rows
    if n == total:
        return rows
    picked = np.sort(np.random.default_rng(seed).permutation(total)[:n])
    return rows.select(picked.tolist())


def combine(parts: list[datasets.Dataset], names: list[str], key: str) -> datasets.Dataset:
    """Concatenate the sources of a mixture; they must have the same columns (types are cast to
    the first source's where they differ)."""
    first = set(parts[0].column_names)
    for i, part in enumerate(parts[1:], start=1):
        if set(part.column_names) != first:
            raise ValueError(
                f"{key}: the sources have different columns: {key}[0] ({names[0]}) has {sorted(first)}, "
                f"{key}[{i}] ({names[i]}) has {sorted(part.column_names)}; rename them with each source's "
                "`columns:` so they match"
            )
    aligned = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        part = part.select_columns(parts[0].column_names)
        if part.features != parts[0].features:
            try:
                part = part.cast(parts[0].features, keep_in_memory=True)  # no cache file to go stale
            except Exception as err:  # noqa: BLE001 - any failed cast is the same problem
                differ = [c for c in parts[0].column_names if part.features[c] != parts[0].features[c]]
                raise ValueError(
                    f"{key}: {key}[{i}] ({names[i]}) stores column(s) {differ} as "
                    f"{[str(part.features[c]) for c in differ]}, {key}[0] as {[str(parts[0].features[c]) for c in differ]}; "
                    f"convert them to one type ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                ) from err
        aligned.append(part)
    return datasets.concatenate_datasets(aligned)
