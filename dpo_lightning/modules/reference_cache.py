"""Precomputed reference log-probs: one pass of the reference over a split, cached on disk.

The cache file is keyed by the tokenized split's ``datasets`` fingerprint (which covers the
data files' content, every tokenization setting and the tokenization code), the reference
model's identity, the tokenizer and the code that computes log-probs, so a changed input never
reads a stale file. Files are safetensors: ``(N, 2)`` float32 sums of the reference's log-probs
over the chosen and rejected completion tokens, in dataset row order; for a loss that reads
per-token reference log-probs (LD-DPO) ``(N, 4)``, with each response's sum beyond the pair's
shared length as well (:data:`BEYOND_SHARED_COLUMNS`), keyed apart from the two-column file.
The key, the row count and a checksum of the values are in the file's metadata; reading checks
all three (:func:`read`), so a file copied under another name (the train and val files
swapped), damaged or truncated is recomputed with one line naming it and why, never read.

The reference's identity is its spec (loading settings: dtype, attention, revision ...) plus
the *content* of what it is loaded from (:func:`reference_identity`): for a local folder or a
hub id (resolved to its snapshot in the local hub cache) a full sha256 of every weight file
(``*.safetensors``, ``*.bin``) and of ``config.json`` / ``adapter_config.json``, so new weights
saved into the same folder, or a hub branch that moved, are recomputed, and identical weights
written again are not. A model built from ``config`` is identified by its config and seed.
Hashing costs about 0.9 s per GB on one core (sha256 with SHA extensions, files in the page
cache, as they are right after loading), a small fraction of one reference pass over any real
split; each file is hashed once per process.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from ..digests import bytes_digest
from ..fingerprints import code_version, library_versions
from ..losses.length import beyond_shared_sums

#: the code that computes the cached values (part of the key)
LOGPROB_CODE_VERSION = code_version("modules.logprobs", "modules.reference_cache", "data.collator", "losses.length")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dpo_lightning", "reference_logps")
COLUMNS = ("reference_chosen", "reference_rejected")
#: LD-DPO: each response's reference log-prob beyond its pair's shared length (``SequenceLogProbs.beyond_shared``)
BEYOND_SHARED_COLUMNS = ("reference_chosen_beyond_shared", "reference_rejected_beyond_shared")


def columns(beyond_shared: bool) -> tuple[str, ...]:
    """The batch columns a cache file fills, in its column order."""
    return COLUMNS + BEYOND_SHARED_COLUMNS if beyond_shared else COLUMNS
#: libraries that compute the cached values (their versions are part of the key)
LIBRARIES = ("torch", "transformers", "peft")
#: metadata format of a cache file (its key, row count and checksum are stored in it)
FORMAT = "dpo_lightning.reference_logps/2"


#: files whose content makes a loaded model: weights (every shard) and architecture
WEIGHT_SUFFIXES = (".safetensors", ".bin")
CONFIG_FILES = ("config.json", "adapter_config.json")
_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime, ctime, inode) -> sha256, this process only


def file_digest(path: Path) -> str:
    """Full sha256 of a file, remembered in this process while its size and times are unchanged."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 23):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of ``folder``'s weight and config files (top level).

    Raises:
        FileNotFoundError: the folder holds no weight file.
    """
    files = sorted(
        f for f in folder.iterdir()
        if f.is_file() and (f.name.endswith(WEIGHT_SUFFIXES) or f.name in CONFIG_FILES)
    )
    if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in files):
        raise FileNotFoundError(f"no *.safetensors or *.bin weight file in {folder}")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{file_digest(f)}\0".encode())
    return digest.hexdigest()


def model_folder(spec: dict[str, Any]) -> Path | None:
    """The local folder a spec's ``name_or_path`` loads from: the folder itself, or for a hub id
    its snapshot in the local hub cache (the revision resolved as ``from_pretrained`` did), with
    ``extra.subfolder`` applied; ``None`` when a hub id has no cached snapshot."""
    name = spec["name_or_path"]
    extra = spec.get("extra") or {}
    subfolder = extra.get("subfolder") or ""
    local = Path(os.path.expanduser(name))
    if local.is_dir():
        return local / subfolder
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        name, str(Path(subfolder) / "config.json") if subfolder else "config.json",
        cache_dir=extra.get("cache_dir"), revision=spec.get("revision"),
    )
    return Path(found).parent if isinstance(found, str) else None


def reference_identity(reference_id: str) -> str:
    """What identifies the reference's log-probs: ``reference_id`` (a spec's JSON, see
    :func:`~dpo_lightning.fingerprints.spec_fingerprint`) plus, for a model loaded from a
    folder or the hub, the digest of its files (:func:`folder_digest`). Any other string
    is taken as it is.

    Raises:
        ValueError: a hub id whose snapshot is not in the local hub cache (its content cannot be
            checked, so no cache could be trusted).
    """
    try:
        spec = json.loads(reference_id)
    except ValueError:
        return reference_id
    if not isinstance(spec, dict) or not spec.get("name_or_path"):
        return reference_id  # built from config: config + seed are its identity
    folder = model_folder(spec)
    if folder is None:
        raise ValueError(
            f"model.init_args.reference.precompute: cannot find the files of {spec['name_or_path']!r} "
            f"(revision {spec.get('revision') or 'main'}) in the local hub cache to key the reference cache by "
            "their content; download the model to a folder and give that folder as name_or_path"
        )
    return json.dumps({"spec": spec, "files": folder_digest(folder)}, sort_keys=True)


def cache_key(dataset: datasets.Dataset, reference_id: str, tokenizer_id: str, beyond_shared: bool = False) -> str:
    """What the log-probs of ``dataset`` under the reference depend on, as JSON: the tokenized
    split's fingerprint (which follows the data files' content, see
    :mod:`~dpo_lightning.data.builder_cache`), the reference's identity (its spec and files'
    content, :func:`reference_identity`), the tokenizer, the code, the columns held
    (:func:`columns`) and the versions of the libraries that compute the values
    (:data:`LIBRARIES`: a new torch may initialise a model built from ``config`` differently, a
    new transformers compute other numerics). Stored in the cache file and checked when it is read."""
    return json.dumps(
        {"data": dataset._fingerprint, "reference": reference_identity(reference_id), "tokenizer": tokenizer_id,
         "code": LOGPROB_CODE_VERSION, "columns": list(columns(beyond_shared)), "libraries": library_versions(*LIBRARIES)},
        sort_keys=True,
    )


def cache_path(
    cache_dir: str, dataset: datasets.Dataset, reference_id: str, tokenizer_id: str, beyond_shared: bool = False
) -> Path:
    """Where the log-probs of ``dataset`` under the reference are (or will be) stored: named by
    the hash of :func:`cache_key`."""
    return cache_file(cache_dir, cache_key(dataset, reference_id, tokenizer_id, beyond_shared))


def cache_file(cache_dir: str, key: str) -> Path:
    """The file of the cache ``key`` (:func:`cache_key`) in ``cache_dir``."""
    return Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


@torch.no_grad()
def compute(logprobs_fn, loader: DataLoader, device: torch.device, beyond_shared: bool = False) -> torch.Tensor:
    """``(N, 2)`` reference sums in row order (``(N, 4)`` with ``beyond_shared``: then
    ``logprobs_fn`` must give per-token values); ``loader`` yields the split in row order and
    ``logprobs_fn(batch) -> SequenceLogProbs``."""
    out = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = logprobs_fn(batch)
        values = [logps.chosen, logps.rejected]
        if beyond_shared:
            tail = beyond_shared_sums(logps)
            b = logps.chosen.shape[0]
            values += [tail[:b], tail[b:]]
        out.append(torch.stack(values, dim=1).float().cpu())
    return torch.cat(out)


def checksum(values: torch.Tensor) -> str:
    """Digest of a tensor's dtype, shape and bytes."""
    values = values.detach().contiguous().cpu()
    header = f"{values.dtype}{tuple(values.shape)}".encode()
    return bytes_digest(header, values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")


def save(path: Path, values: torch.Tensor, key: str) -> None:
    """Write ``values`` ``(N, 2)`` or ``(N, 4)`` to ``path`` with their key, row count and checksum in the
    file's metadata; written beside it and renamed, so a kill never leaves half a file."""
    values = values.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "key": key, "rows": str(values.shape[0]), "checksum": checksum(values)}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({"logps": values}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read(path: Path, key: str, rows: int, width: int = 2) -> tuple[torch.Tensor | None, str]:
    """``(values (rows, width), "")`` from a cache file that passes every check, else ``(None, why)``:
    unreadable (truncated, not safetensors), no record of its key, another key (another split,
    data, reference or tokenizer: a file copied or swapped), another row count, or values that
    differ from the checksum written with them (damaged bytes)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            values = f.get_tensor("logps") if "logps" in f.keys() else None
    except Exception as err:  # noqa: BLE001 - whatever the reader says, the file is unusable
        first = str(err).splitlines()[0][:160] if str(err) else ""
        return None, f"unreadable ({type(err).__name__}: {first})"
    if metadata.get("format") != FORMAT or values is None:
        return None, "it holds no record of its key and checksum (not written by this version)"
    if metadata.get("key") != key:
        return None, "it holds the log-probs of another key (another split, data, reference or tokenizer)"
    if metadata.get("rows") != str(rows) or tuple(values.shape) != (rows, width):
        return None, f"it holds {tuple(values.shape)} values for {metadata.get('rows')} rows, the split has {rows} rows"
    if checksum(values) != metadata.get("checksum"):
        return None, "its values do not match the checksum written with them (damaged or altered bytes)"
    return values, ""


def load_or_compute(
    path: Path, key: str, rows: int, compute_fn: Callable[[], torch.Tensor], is_writer: bool, barrier: Callable[[], Any],
    width: int = 2,
) -> tuple[torch.Tensor, bool]:
    """Read ``path`` after checking it (:func:`read`), or compute and save it: the writer process
    computes while the others wait; a file that fails a check is recomputed with one line naming
    it and why.

    Returns ``(values (rows, width), computed_here)``.
    """
    values, computed = None, False
    if is_writer:
        values, reason = read(path, key, rows, width) if path.exists() else (None, "")
        if values is None:
            if reason:
                rank_zero_info(f"reference log-prob cache {path}: {reason}; recomputing it")
            values = compute_fn()
            save(path, values, key)
            computed = True
    barrier()
    if values is None:
        values, reason = read(path, key, rows, width)
        if values is None:  # the writer's file did not arrive intact here: compute, do not save
            print(f"reference log-prob cache {path}: {reason}; recomputing it in this process", flush=True)
            values, computed = compute_fn(), True
    return values, computed
