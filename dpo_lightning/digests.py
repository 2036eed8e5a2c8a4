"""Content digests: what data fingerprints and cache checks rest on.

A file is known by its bytes, never by its path, size or modification time: a file rewritten
with other rows but its time kept (``cp -p``, ``touch -r``, an archive with fixed timestamps)
gets another digest. The hash is xxHash's XXH3-128 (not cryptographic: it guards against stale
and damaged files, not against an adversary who forges collisions), about 0.08 s per GB on one
core when the file is in the page cache (reading it costs 0.06 s of that), so every file is
hashed again on every run; a file read from disk is bounded by the disk instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import xxhash

#: bytes read at a time
BLOCK = 1 << 23


def file_digest(path: str | os.PathLike) -> str:
    """XXH3-128 of a file's bytes, as 32 hex digits."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def files_digest(paths: Iterable[str | os.PathLike]) -> str:
    """One digest over ``paths`` in the order given: each file's name (as given) and bytes."""
    digest = xxhash.xxh3_128()
    for path in paths:
        digest.update(f"{os.fspath(path)}\0{file_digest(path)}\0".encode())
    return digest.hexdigest()


def bytes_digest(*parts: bytes | memoryview) -> str:
    """XXH3-128 over ``parts`` (e.g. a tensor's bytes), as 32 hex digits."""
    digest = xxhash.xxh3_128()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def folder_files(folder: str | os.PathLike) -> list[Path]:
    """Every file below ``folder`` (recursively), sorted; hidden files and folders skipped."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return sorted(out)
