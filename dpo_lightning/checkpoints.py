"""Checkpoint files: written atomically, found for ``--ckpt_path last``, read safely.

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the target folder,
  fsyncs it and renames it into place, so a kill at any moment leaves either the previous file
  or the new one, never a truncated one (Lightning's own writer stages the file in ``TMPDIR``
  and moves it, which is a copy, not a rename, when ``TMPDIR`` is on another filesystem).
* :func:`find_resumable_checkpoint` resolves ``last``: the newest readable checkpoint under the
  run's folders (every logger version included), skipping unreadable files with a message.
* :func:`check_checkpoint_file` reads a checkpoint with ``weights_only=True`` whatever the
  environment says, so a planted pickle is refused, and checks every record against the CRC-32
  stored with it, so changed bytes (which ``torch.load`` reads without a word) are refused.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

PARTIAL_MARK = ".partial-"
#: the environment switch that makes ``torch.load`` ignore ``weights_only=True``
UNSAFE_LOAD_ENV = ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")


def partial_path(path: Path) -> Path:
    """The temporary file a checkpoint is written to before it is renamed to ``path``."""
    return path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")


def remove_partials(folder: Path) -> list[Path]:
    """Delete temporary files that killed writers left in ``folder`` (not this process's)."""
    removed = []
    for stale in folder.glob(f".*.ckpt{PARTIAL_MARK}*"):
        if stale.name.endswith(f"{PARTIAL_MARK}{os.getpid()}"):
            continue
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes beside the target, fsyncs and renames (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote filesystems: Lightning's fsspec writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_path(target)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            folder = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        finally:
            tmp.unlink(missing_ok=True)
        remove_partials(target.parent)


@contextmanager
def safe_loading():
    """``torch.load(weights_only=True)`` means it inside: the environment overrides are lifted."""
    saved = {name: os.environ.pop(name) for name in UNSAFE_LOAD_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain values only)."""
    with safe_loading():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def check_checkpoint_file(path: str | Path, key: str = "--ckpt_path") -> None:
    """Raise ``ValueError`` naming ``path`` when it is not a readable Lightning checkpoint."""
    try:
        checkpoint = read_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - any failure here means the file is unusable
        raise ValueError(
            f"{key} {str(path)!r} is not a readable checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). Point it at a .ckpt written by this trainer, or use "
            "--ckpt_path last to pick the newest one. Checkpoints are read with weights_only=True: "
            "a file holding pickled objects is refused"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{key} {str(path)!r} has no state_dict; it is not a Lightning checkpoint")
    damaged = damaged_record(path)
    if damaged:
        raise ValueError(
            f"{key} {str(path)!r} is damaged: its record {damaged} does not match the CRC-32 written with it "
            "(bytes changed after it was saved; torch.load would read them without a word). Resume from another "
            "checkpoint; --ckpt_path last skips damaged files"
        )


def damaged_record(path: str | Path) -> str | None:
    """The first record of a checkpoint whose bytes differ from the CRC-32 ``torch.save`` wrote
    for it in the zip archive, or ``None``. Reads the whole file (zlib's CRC-32, about a second
    per GB); a file in the legacy, non-zip format has no CRC and is not checked."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"(the archive: {type(err).__name__}: {err})"


def find_resumable_checkpoint(roots: Iterable[str | Path]) -> Path:
    """The newest readable ``*.ckpt`` under ``roots`` (searched recursively).

    Unreadable files (truncated by a kill, say) are skipped with a message, so a resume falls
    back to the previous good checkpoint; stale temporary files are removed.

    Raises:
        FileNotFoundError: no readable checkpoint; the message lists where it looked.
    """
    folders = sorted({Path(r).expanduser().resolve() for r in roots if r})
    found: dict[Path, float] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for stale in {p.parent for p in folder.rglob(f".*.ckpt{PARTIAL_MARK}*")}:
            for removed in remove_partials(stale):
                rank_zero_info(f"removed {removed}, a checkpoint a killed run did not finish writing")
        for path in folder.rglob("*.ckpt"):
            if path.is_file():
                found[path.resolve()] = path.stat().st_mtime
    for path in sorted(found, key=found.get, reverse=True):
        try:
            check_checkpoint_file(path)
        except ValueError as err:
            rank_zero_info(f"skipping {path}: {str(err).split(' (')[0]} ({str(err).split('(', 1)[-1][:120]}")
            continue
        return path
    where = ", ".join(str(f) for f in folders) or "(no folder)"
    raise FileNotFoundError(
        f"--ckpt_path last: no readable checkpoint under {where}. Nothing was trained; start a new run "
        "without --ckpt_path, or give the checkpoint's path"
    )
