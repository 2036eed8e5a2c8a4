"""Read rows with ``datasets``: a hub dataset, a local folder or files, or data already in memory.

What ``data.init_args.train_data`` (and ``val_data``) may be:

* a hub dataset id (``org/name``), with ``dataset_config``, ``data_dir`` and a split that may be
  sliced (``train[:10%]``, ``train[100:200]``), all passed to ``datasets.load_dataset``;
* a local folder: files named by split (``train.jsonl``, ``test.jsonl``, ...) of ONE kind, all
  of them read (a file named after no split beside split-named ones is refused, since
  ``datasets`` would leave it out), or a folder written by ``save_to_disk``;
* one or more local files / globs ending in ``.json``, ``.jsonl``, ``.parquet`` or ``.csv``
  (several files of one dataset; a slice in the split, ``train[:10%]``, applies to them);
* from Python: a ``datasets.Dataset``, a ``datasets.DatasetDict`` (the split is picked by
  name, and may be sliced) or a list of row dicts;
* a weighted mixture: a list of :class:`~.sources.DataSource` (``{path, fraction | rows, split, ...}``),
  read by the data modules (:meth:`~dpo_lightning.data.TokenizedDataModule.load_split`).

Local files are known by their bytes (:mod:`.builder_cache`): the ``datasets`` cache of them is
checked against their content before it is read, and the rows' fingerprint follows it.

A string that exists on disk or looks like a path (``./x``, ``/x``, ``a/b/c``, a data-file
extension) is never sent to the hub. CSV cells holding ``None``, ``NA`` or ``null`` stay text;
only empty cells are missing.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.exceptions import DatasetGenerationError

from .builder_cache import load_checked, load_saved
from .sources import DataSource, DataSpec, as_sources, rows_from_list

__all__ = ["DataSource", "DataSpec", "load_rows"]

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
#: other extensions of data files: a path with one is local, and a folder holding one is read by
#: ``datasets`` as another kind (so it is named in the error for folders of mixed kinds)
_OTHER_DATA_EXTENSIONS = (".txt", ".tsv", ".arrow", ".ndjson", ".pq", ".xlsx", ".xls", ".gz", ".zst", ".bz2", ".xz", ".zip", ".tar")
#: CSV cells "None", "NA", "null", "N/A", ... are text, not missing values; an empty cell is missing
_CSV_KWARGS = {"keep_default_na": False, "na_values": [""]}
#: files ``datasets`` writes next to data, which are not data
_DATASETS_METADATA = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")
_KINDS = ".json/.jsonl, .parquet or .csv"


def looks_local(source: str) -> bool:
    """True for a path that exists or looks like one; a hub id is ``name`` or ``org/name``."""
    lowered = source.lower()
    return (
        source.startswith((".", "/", "~"))
        or os.path.exists(os.path.expanduser(source))
        or source.count("/") > 1
        or "\\" in source
        or any(ch in source for ch in "*?[")
        or lowered.endswith(tuple(_BUILDERS) + _OTHER_DATA_EXTENSIONS)
    )


def load_rows(
    source: Any,
    *,
    key: str,
    config: str | None = None,
    split: str = "train",
    max_rows: int | None = None,
    data_dir: str | None = None,
) -> datasets.Dataset:
    """Load one split of one source as a :class:`datasets.Dataset` (weighted mixtures: see
    :meth:`~dpo_lightning.data.TokenizedDataModule.load_split`).

    Args:
        source: a hub id, a local folder, local file(s) / globs, a ``Dataset``, a ``DatasetDict``
            or a list of row dicts (see the module docstring).
        key: the config key this came from, named in errors (e.g. ``data.init_args.train_data``).
        config: the hub dataset's configuration name.
        split: the split to read from a hub id, folder or ``DatasetDict``; may be sliced
            (``train[:10%]``, ``train[100:200]``). For files and a ``Dataset`` only the slice counts.
        max_rows: keep only the first ``max_rows`` rows (for quick runs).
        data_dir: the hub dataset's (or folder's) data folder.
    Raises:
        ValueError / FileNotFoundError: naming ``key``, the source and the fix.
    """
    if as_sources(source, key) is not None:
        raise ValueError(f"{key}: a list of weighted sources is read by the data modules, not load_rows")
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        rows = from_memory(source, key, split)
    elif isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise ValueError(f"{key}: streaming (Iterable) datasets are not supported; load it without streaming=True")
    elif isinstance(source, (list, tuple)) and source and all(isinstance(r, dict) for r in source):
        rows = from_memory(rows_from_list(list(source), key), key, split)
    else:
        rows = from_names(source, key, config, split, data_dir)
    if len(rows) == 0:
        raise ValueError(f"{key}: {describe(source)} holds no rows (split {split!r}); give data with rows in it")
    return _limit(rows, max_rows)


def describe(source: Any) -> str:
    """A short name for a source in messages."""
    if isinstance(source, str):
        return repr(source)
    if isinstance(source, (list, tuple)) and all(isinstance(s, str) for s in source):
        return repr(list(source))
    return f"the in-memory {type(source).__name__}"


def from_names(source: Any, key: str, config: str | None, split: str, data_dir: str | None) -> datasets.Dataset:
    """A hub id, a folder, or local files."""
    sources = [source] if isinstance(source, str) else list(source) if isinstance(source, (list, tuple)) else None
    if sources is None or not all(isinstance(s, str) for s in sources):
        raise ValueError(
            f"{key}: expected a path, a hub dataset id, a list of files, a Dataset / DatasetDict or a list of row dicts; "
            f"got {type(source).__name__}"
        )
    if not sources:
        raise ValueError(f"{key} is empty; give a hub dataset name or local files")
    local = [looks_local(s) for s in sources]
    if all(local):
        if len(sources) == 1 and os.path.isdir(os.path.expanduser(sources[0])):
            return load_folder(os.path.expanduser(sources[0]), key, config, split, data_dir)
        return load_files(sources, key, split)
    if len(sources) == 1:
        return load_hub(sources[0], key, config, split, data_dir)
    raise ValueError(f"{key}: give one hub dataset name, or local files, not a mix: {sources}")


def split_slice(split: str) -> str:
    """``"[:10%]"`` of ``"train[:10%]"``; ``""`` for an unsliced split."""
    return split[split.index("[") :] if "[" in split else ""


def load_files(sources: list[str], key: str, split: str) -> datasets.Dataset:
    """Local files and globs of one kind, read as one split (sliced like ``split``)."""
    files: list[str] = []
    for s in sources:
        if os.path.isdir(os.path.expanduser(s)):
            raise ValueError(f"{key}: {s!r} is a folder; give it alone, or list the files in it")
        matched = sorted(glob.glob(os.path.expanduser(s)))
        if not matched:
            raise FileNotFoundError(f"{key}: no file matches {s!r} (relative to {os.getcwd()!r})")
        files.extend(m for m in matched if os.path.isfile(m))
    builder = one_builder(files, key)
    check_files(files, builder, key)
    where = repr(files[0]) if len(files) == 1 else f"the files {files}"
    with explain_errors(key, where=where):
        return load_checked(
            builder, split="train" + split_slice(split), sources=files, where=where, data_files=files,
            **(_CSV_KWARGS if builder == "csv" else {}),
        )


def one_builder(files: list[str], key: str) -> str:
    """The ``datasets`` builder of ``files`` (all of one kind), or an error naming the unknown or mixed kinds."""
    extensions = sorted({os.path.splitext(f)[1].lower() for f in files})
    unknown = [f for f in files if os.path.splitext(f)[1].lower() not in _BUILDERS]
    if unknown:
        ext = os.path.splitext(unknown[0])[1]
        raise ValueError(
            f"{key}: files must all be {_KINDS} (one kind); the file kind of {unknown[0]!r} is unknown "
            f"(extension {ext!r}): rename it with the extension of its format"
        )
    builders = {_BUILDERS[ext] for ext in extensions}
    if len(builders) != 1:
        raise ValueError(
            f"{key}: files must all be {_KINDS} (one kind), got {extensions}; convert them to one format, "
            "or give them as weighted sources (a list of {path: ...})"
        )
    return builders.pop()


def check_files(files: list[str], builder: str, key: str) -> None:
    """Every file has content, and text files are UTF-8."""
    for f in files:
        if is_empty(f):
            raise ValueError(f"{key}: {f} is empty; write rows to it or leave it out")
        if builder in ("json", "csv"):
            check_utf8(f, key)


def is_empty(path: str) -> bool:
    """True for a file of zero bytes or only whitespace."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def data_files_in(folder: str) -> list[str]:
    """Files of ``folder`` (recursively) that ``datasets`` would read as data; hidden ones skipped."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        for name in names:
            if name in _DATASETS_METADATA or name.startswith((".", "_")):
                continue
            if name.lower().endswith(tuple(_BUILDERS) + _OTHER_DATA_EXTENSIONS):
                out.append(os.path.join(root, name))
    return sorted(out)


def load_folder(folder: str, key: str, config: str | None, split: str, data_dir: str | None) -> datasets.Dataset:
    """A folder of data files of one kind (splits from the file names: ``train*``, ``test*``,
    ``validation*``; one split ``train`` otherwise), or one written by ``save_to_disk``."""
    if os.path.exists(os.path.join(folder, "dataset_dict.json")) or os.path.exists(os.path.join(folder, "state.json")):
        with explain_errors(key):
            saved = load_saved(folder)
        return from_memory(saved, key, split)
    files = data_files_in(os.path.join(folder, data_dir) if data_dir else folder)
    kinds = sorted({_BUILDERS.get(os.path.splitext(f)[1].lower(), os.path.splitext(f)[1].lower()) for f in files})
    if not files or not set(kinds) & set(_BUILDERS.values()):
        raise ValueError(f"{key}: folder {folder!r} holds no {_KINDS} files; put the data files in it, or name them directly")
    if len(kinds) > 1:
        extensions = sorted({os.path.splitext(f)[1].lower() for f in files})
        raise ValueError(
            f"{key}: folder {folder!r} holds data files of several kinds {extensions}, and datasets would read only "
            f"one kind; keep one kind in the folder, or list the files as weighted sources (a list of {{path: ...}})"
        )
    builder = kinds[0]
    check_files(files, builder, key)
    if config is None:
        check_every_file_has_a_split(os.path.join(folder, data_dir) if data_dir else folder, files, key)
    kwargs: dict[str, Any] = dict(_CSV_KWARGS) if builder == "csv" else {}
    if config is not None:
        kwargs["name"] = config
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    where = f"folder {folder!r}"
    with explain_errors(key, split=split, where=where):
        return load_checked(folder, split=split, sources=files, where=where, **kwargs)


def check_every_file_has_a_split(folder: str, files: list[str], key: str) -> None:
    """Refuse a folder some of whose data files ``datasets`` would read into no split.

    Once one file is named after a split (``train.jsonl``), ``datasets`` assigns the folder's
    files to splits by name (``train*``, ``test*``, ``validation*``, ``eval*`` ...) and leaves
    out any other (``extra_pairs.jsonl``) without a word. A folder whose ``README.md`` declares
    ``configs:`` says itself which files form which split, and is not checked here.
    """
    readme = os.path.join(folder, "README.md")
    if os.path.isfile(readme) and "configs:" in Path(readme).read_text(encoding="utf-8", errors="replace"):
        return
    found = DataFilesDict.from_patterns(get_data_patterns(folder), base_path=folder)
    splits = {str(name): sorted(os.path.relpath(f, folder) for f in matched) for name, matched in found.items()}
    assigned = {os.path.realpath(os.path.join(folder, f)) for names in splits.values() for f in names}
    left_out = [os.path.relpath(f, folder) for f in files if os.path.realpath(f) not in assigned]
    if left_out:
        listed = [os.path.join(folder, f) for f in sorted(splits.get("train", []) + left_out)]
        raise ValueError(
            f"{key}: folder {folder!r} holds {left_out}, which datasets would read into no split (a folder's "
            f"files are split by name once one is named after a split; here {splits}). Rename it after its "
            f"split (e.g. train-{os.path.basename(left_out[0])}), or list the files: {key}: {listed}"
        )


def load_hub(name: str, key: str, config: str | None, split: str, data_dir: str | None) -> datasets.Dataset:
    """A hub dataset: ``datasets.load_dataset(name, name=config, data_dir=..., split=...)``."""
    kwargs: dict[str, Any] = {}
    if config is not None:
        kwargs["name"] = config
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    kwargs["split"] = split
    with explain_errors(key, split=split, where=f"hub dataset {name!r}", hub=name):
        return datasets.load_dataset(name, **kwargs)


def from_memory(data: datasets.Dataset | datasets.DatasetDict, key: str, split: str) -> datasets.Dataset:
    """The split of a ``DatasetDict`` by name (sliced like ``train[:10%]``); a ``Dataset`` itself
    (only a slice in ``split`` applies to it)."""
    if isinstance(data, datasets.Dataset):
        if not split_slice(split):
            return data
        return take_slice(data, split, key)
    name = split.split("[", 1)[0]
    if name not in data:
        raise ValueError(
            f"{key}: the DatasetDict has splits {sorted(data)}, not {name!r}; set the split "
            "(data.init_args.train_split / val_split) to one of them"
        )
    return take_slice(data[name], split, key) if split_slice(split) else data[name]


def take_slice(rows: datasets.Dataset, split: str, key: str) -> datasets.Dataset:
    """``rows`` cut by the slice of ``split`` (``train[:10%]``, ``train[100:200]``, ``train[-50:]``)."""
    name = split.split("[", 1)[0] or "train"
    try:
        instructions = datasets.ReadInstruction.from_spec(name + split_slice(split)).to_absolute({name: len(rows)})
    except (ValueError, AssertionError) as err:
        raise ValueError(f"{key}: cannot read the split {split!r} ({err}); write it like train[:10%] or train[100:200]") from None
    if len(instructions) != 1:
        raise ValueError(f"{key}: split {split!r} joins several slices; give one, like train[:10%]")
    return rows.select(range(instructions[0].from_, instructions[0].to))


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
def explain_errors(key: str, split: str | None = None, where: str = "the data", hub: str | None = None) -> Iterator[None]:
    """Re-raise a ``datasets`` loading failure as one message naming the config key and the cause.

    Args:
        key: the config key.
        split: the split asked for (an unknown split is named with the ones that exist).
        where: what was read, for the message.
        hub: the hub id, when the source went to the hub (then a failure says it is not local either).
    """
    try:
        yield
    except (DatasetGenerationError, ValueError, TypeError, OSError, StopIteration) as err:
        cause = err.__cause__ or err
        text = str(cause).splitlines()[0][:300] if str(cause) else type(cause).__name__
        if "corresponds to no data" in str(err):
            raise ValueError(f"{key}: {where} holds no rows; give data with rows in it") from err
        if split is not None and "Unknown split" in str(err):
            raise ValueError(
                f"{key}: {where} has no split {split.split('[', 1)[0]!r} ({str(err).splitlines()[0]}). Set the split "
                "(data.init_args.train_split / val_split) to one that exists, or, for a folder, name a file "
                "after the split (train.jsonl, test.jsonl)"
            ) from err
        if hub is not None and isinstance(err, (OSError, FileNotFoundError)):
            raise ValueError(
                f"{key}: {hub!r} is not a local file or folder (relative to {os.getcwd()!r}) and the Hugging Face hub "
                f"did not provide it ({type(cause).__name__}: {text}). Give a local path (./{hub} for a folder here), "
                "or a hub dataset id reachable from this machine (or cached, with HF_DATASETS_OFFLINE=1)"
            ) from err
        raise ValueError(
            f"{key}: could not read {where} ({type(cause).__name__}: {text}). "
            "Check that every row has the same columns and types, and the file's format matches its extension"
        ) from err


def _limit(rows: datasets.Dataset, max_rows: int | None) -> datasets.Dataset:
    if max_rows is None or max_rows >= len(rows):
        return rows
    return rows.select(range(max_rows))
