"""``datasets.map`` whose cache file is checked before it is read (the tokenization cache).

``datasets`` reuses a ``map`` result from ``cache-<fingerprint>.arrow`` beside the rows' Arrow
files whenever such a file exists, whatever its bytes: a damaged, truncated or swapped file
would be read (or fail with a raw Arrow error). :func:`checked_map` names the cache file
itself, from a fingerprint of the input rows' fingerprint, the function and its settings, and
keeps a stamp beside it (``cache-<fingerprint>.dpo_lightning.json``: the fingerprint, the row
count and the digest of every file of the result). Before a run reads the file, the stamp is
checked; a file without a stamp, or one whose bytes or row count differ from it, is deleted and
computed again, with one line naming the file and why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from datasets.fingerprint import Hasher
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info

from ..digests import file_digest
from ..fingerprints import library_versions

#: libraries whose upgrade may change a tokenizer's ids or the rows' types
LIBRARIES = ("transformers", "tokenizers", "datasets")
#: map arguments that do not change the result
_NOT_IN_KEY = ("num_proc", "desc")


def map_fingerprint(rows: datasets.Dataset, function: Callable, kwargs: dict[str, Any]) -> str:
    """The fingerprint of ``rows.map(function, **kwargs)``: rows, function, settings and the
    versions of the libraries that turn text into ids (:data:`LIBRARIES`)."""
    settings = {k: v for k, v in sorted(kwargs.items()) if k not in _NOT_IN_KEY}
    libraries = library_versions(*LIBRARIES)
    return Hasher.hash([rows._fingerprint, function, settings, libraries, "dpo_lightning.checked_map/1"])


def stamp_path(folder: Path, fingerprint: str) -> Path:
    """Where the stamp of the map result ``fingerprint`` lives."""
    return folder / f"cache-{fingerprint}.dpo_lightning.json"


def result_files(folder: Path, fingerprint: str) -> list[Path]:
    """The cache files of the map result ``fingerprint`` (one, or one per process)."""
    return sorted(folder.glob(f"cache-{fingerprint}*.arrow"))


def stale_reason(folder: Path, fingerprint: str) -> str:
    """Why the cached result ``fingerprint`` in ``folder`` cannot be read; ``""`` when it can
    or when there is none."""
    files = result_files(folder, fingerprint)
    if not files:
        return ""
    try:
        stamp = json.loads(stamp_path(folder, fingerprint).read_text())
    except (OSError, ValueError):
        return "it has no record of what was written (written by another program, or its record was lost)"
    if not isinstance(stamp, dict) or stamp.get("fingerprint") != fingerprint or not isinstance(stamp.get("files"), dict):
        return "its record belongs to another result"
    if {f.name for f in files} != set(stamp["files"]):
        return "its files are not the ones written"
    for f in files:
        if file_digest(f) != stamp["files"][f.name]:
            return f"{f.name} does not match the digest recorded when it was written (damaged, truncated or replaced)"
    return ""


def write_stamp(result: datasets.Dataset, folder: Path, fingerprint: str) -> None:
    """Record ``result``'s row count and the digest of each of its cache files in ``folder``."""
    files = [Path(f["filename"]) for f in result.cache_files if Path(f["filename"]).parent == folder]
    stamp = {"fingerprint": fingerprint, "rows": len(result), "files": {f.name: file_digest(f) for f in files}}
    path = stamp_path(folder, fingerprint)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True))
    os.replace(tmp, path)


def checked_map(rows: datasets.Dataset, function: Callable, **kwargs: Any) -> datasets.Dataset:
    """``rows.map(function, **kwargs)``, its cache file checked before it is read (see the
    module docstring). Rows held in memory (no cache files) are mapped in memory, as ``datasets``
    does."""
    if not rows.cache_files:
        return rows.map(function, **kwargs)
    fingerprint = map_fingerprint(rows, function, kwargs)
    folder = Path(rows.cache_files[0]["filename"]).parent
    target = folder / f"cache-{fingerprint}.arrow"
    with FileLock(str(stamp_path(folder, fingerprint)) + ".lock"):
        reason = stale_reason(folder, fingerprint)
        if reason:
            rank_zero_info(f"recomputing {target} ({kwargs.get('desc') or 'map'}): {reason}")
            for f in result_files(folder, fingerprint):
                f.unlink()
        result = rows.map(function, cache_file_name=str(target), new_fingerprint=fingerprint, **kwargs)
        try:
            stamp = json.loads(stamp_path(folder, fingerprint).read_text())
        except (OSError, ValueError):
            stamp = {}
        if reason or stamp.get("rows") != len(result) or set(stamp.get("files", {})) != {
            Path(f["filename"]).name for f in result.cache_files if Path(f["filename"]).parent == folder
        }:
            write_stamp(result, folder, fingerprint)
    return result
