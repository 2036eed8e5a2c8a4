"""Rows read through a ``datasets`` builder (local files or a folder of them), with
its cache checked against what it was built from.

``datasets`` keeps the parsed rows as Arrow files in its cache and knows a local data file by its
path and modification time only: a file rewritten with other rows but its time kept would be
read from the old Arrow files. Here every load first checks the builder's cache folder against a
stamp written beside its Arrow files (``dpo_lightning_stamp.json``):

* ``sources``: the content digest of the local data files it was built from
  (:func:`~dpo_lightning.digests.files_digest`); another digest means the files changed;
* ``files``: the digest of every Arrow file the builder wrote and of its ``dataset_info.json``;
  another one means a damaged, truncated or replaced cache file.

Either, or a local cache with no stamp, rebuilds the cache from the data files with one line
saying which folder and why. The rows' ``datasets`` fingerprint is then made from the data
files' digest and the reading settings (:func:`with_content`), so the tokenization cache, the
reference cache and the run fingerprint, which all derive from it, follow the content: other
bytes give another fingerprint, the same bytes written again the same one. A hub dataset is
read by ``datasets.load_dataset`` as it is: its cache is keyed by the hub revision it was
downloaded at.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import datasets
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info

from ..digests import bytes_digest, file_digest, files_digest, folder_files

STAMP = "dpo_lightning_stamp.json"


def builder_files(folder: Path) -> list[Path]:
    """The files a builder wrote in ``folder``: its Arrow files (not the ``cache-*`` files of
    later maps) and ``dataset_info.json`` (its split sizes decide which rows are read)."""
    arrow = [p for p in folder.glob("*.arrow") if not p.name.startswith("cache-")]
    info = folder / "dataset_info.json"
    return sorted(arrow + ([info] if info.is_file() else []))


def stale_reason(folder: Path, sources: str | None) -> str:
    """Why the builder cache in ``folder`` cannot be read (``""``: it can, or it is not built).

    Args:
        folder: the builder's cache folder (``builder.cache_dir``).
        sources: the content digest of the local data files, ``None`` for a hub dataset.
    """
    if not (folder / "dataset_info.json").exists():
        return ""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return "" if sources is None else "it holds no record of the data files it was built from"
    if not isinstance(stamp, dict) or not isinstance(stamp.get("files"), dict):
        return "its record of what it was built from is unreadable"
    if sources is not None and stamp.get("sources") != sources:
        return "the data files' content changed since it was built"
    for name, digest in stamp["files"].items():
        path = folder / name
        if not path.is_file():
            return f"its file {name} is missing"
        if file_digest(path) != digest:
            return f"its file {name} does not match the digest recorded when it was written (damaged or replaced)"
    if {p.name for p in builder_files(folder)} != set(stamp["files"]):
        return "it holds files it did not write"
    return ""


def write_stamp(folder: Path, sources: str | None) -> None:
    """Record ``sources`` and the digest of every builder Arrow file in ``folder`` (atomically)."""
    stamp = {"sources": sources, "files": {p.name: file_digest(p) for p in builder_files(folder)}}
    tmp = folder / f".{STAMP}.{os.getpid()}"
    tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True))
    os.replace(tmp, folder / STAMP)


def with_content(rows: datasets.Dataset, digest: str, settings: str | None = None) -> datasets.Dataset:
    """``rows`` under a fingerprint from ``digest`` (no data is copied): with ``settings`` (how the
    rows were read from the files: builder, split, options), that fingerprint is a function of
    the files' content and those settings alone, so the same bytes read the same way give the
    same fingerprint wherever and whenever they were written; without, it is folded with the
    rows' own fingerprint."""
    base = settings if settings is not None else rows._fingerprint
    return rows.select_columns(rows.column_names, new_fingerprint=bytes_digest(f"{base}\0{digest}".encode()))


def load_checked(path: str, *, split: str, sources: list[str] | None, where: str, **config_kwargs: Any) -> datasets.Dataset:
    """``datasets.load_dataset(path, split=split, **config_kwargs)``, its cache checked first.

    Args:
        path: a builder name (``json``, ``parquet``, ``csv``) or a folder.
        split: the split, may be sliced (``train[:10%]``).
        sources: the local data files the rows come from (their content is the cache's key);
            ``None`` checks the Arrow files only (an unstamped cache is then trusted).
        where: what is read, for the message when the cache is rebuilt.
        config_kwargs: passed to ``datasets.load_dataset_builder`` (``data_files``, ``name`` ...).
    """
    digest = files_digest(sources) if sources is not None else None
    builder = datasets.load_dataset_builder(path, **config_kwargs)
    folder = Path(builder.cache_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.dpo_lightning.lock"):  # one process checks and rebuilds; the others then read
        reason = stale_reason(folder, digest)
        if reason:  # removed, and a new builder made: the old one holds the old split sizes
            rank_zero_info(f"rebuilding the datasets cache {folder} of {where}: {reason}")
            shutil.rmtree(folder)
            builder = datasets.load_dataset_builder(path, **config_kwargs)
        unstamped = reason or not (folder / STAMP).exists()
        builder.download_and_prepare()
        if unstamped:
            write_stamp(folder, digest)
    rows = builder.as_dataset(split=split)
    if digest is None:
        return rows
    settings = json.dumps(
        {"path": path, "split": split, "options": {k: v for k, v in config_kwargs.items() if k != "data_files"},
         "datasets": datasets.__version__, "reader": "dpo_lightning.load_checked/1"},
        sort_keys=True, default=str,
    )
    return with_content(rows, digest, settings)


def saved_files(folder: str) -> list[Path]:
    """The files ``save_to_disk`` wrote in ``folder`` (not the ``cache-*`` files that maps of its
    rows, the tokenization among them, write beside them)."""
    return [p for p in folder_files(folder) if not p.name.startswith("cache-")]


def load_saved(folder: str) -> datasets.Dataset | datasets.DatasetDict:
    """A folder written by ``save_to_disk``, its fingerprints folded with its files' digest."""
    saved = datasets.load_from_disk(folder)
    digest = files_digest(saved_files(folder))
    if isinstance(saved, datasets.DatasetDict):
        return datasets.DatasetDict({name: with_content(rows, digest) for name, rows in saved.items()})
    return with_content(saved, digest)
