"""The ``dpo-lightning`` console entry: ``--help`` served from a cache, everything else to the CLI.

Building the ``fit --help`` text imports Lightning, torch and torchmetrics and walks every
class signature: about 5 s on a 2-core machine, almost all of it imports this module cannot
avoid once the CLI runs. The text itself depends only on what is installed and on the command
line, so the first ``dpo-lightning [SUBCOMMAND] --help`` saves what it printed and later ones
print it back in well under a second, without importing Lightning.

The cache key holds everything the text is made from: the program name and command line, the terminal width,
Python's version, the version of every library the CLI's signatures come from, jsonargparse's
``JSONARGPARSE_*`` settings, and the path,
size and modification time of every source file of this package (an edit, a ``git checkout``
or an upgrade makes a new key). Files live in ``$DPO_LIGHTNING_CACHE_DIR/help`` (default
``$XDG_CACHE_HOME/dpo-lightning`` or ``~/.cache/dpo-lightning``); ``DPO_LIGHTNING_HELP_CACHE=0``
turns the cache off, and ``--verbose`` / ``--debug`` / ``DPO_LIGHTNING_VERBOSE=1`` bypass it.
A cache that cannot be written (a read-only home) is skipped silently: help still prints.

Standard library only: nothing here may import Lightning, torch or this package's heavy modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

#: the flags that ask for help
HELP_FLAGS = ("-h", "--help")
#: libraries whose signatures, docstrings or formatting make up the help text
HELP_SOURCES = ("lightning", "jsonargparse", "torch", "torchmetrics", "transformers", "datasets", "peft",
                "bitsandbytes", "docstring-parser", "typeshed-client", "pyyaml")
#: environment variables that change the text or ask for the full run
PASS_THROUGH_ENV = ("DPO_LIGHTNING_VERBOSE", "DPO_LIGHTNING_DEBUG")
PACKAGE_DIR = Path(__file__).resolve().parent
SUBCOMMAND = re.compile(r"^[a-z][a-z_]*$")


def cacheable(args: Sequence[str]) -> bool:
    """A plain help request: ``--help`` alone or after one subcommand (``fit --help``); anything
    else (a ``--config``, an option, ``--verbose``) runs the CLI."""
    if not args or args[-1] not in HELP_FLAGS or len(args) > 2:
        return False
    if any(os.environ.get(name, "") not in ("", "0") for name in PASS_THROUGH_ENV):
        return False
    if os.environ.get("DPO_LIGHTNING_HELP_CACHE", "1") == "0":
        return False
    return all(SUBCOMMAND.match(a) for a in args[:-1])


def cache_dir() -> Path:
    """Where help texts are kept (see the module docstring)."""
    if os.environ.get("DPO_LIGHTNING_CACHE_DIR"):
        return Path(os.environ["DPO_LIGHTNING_CACHE_DIR"]) / "help"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dpo-lightning" / "help"


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def help_key(args: Sequence[str]) -> str:
    """A digest of everything ``args``' help text is made from (see the module docstring)."""
    digest = hashlib.sha256()
    parts = [Path(sys.argv[0]).name, "\0".join(args), str(shutil.get_terminal_size().columns), sys.version, sys.executable]
    parts += [f"{name}={_installed(name)}" for name in HELP_SOURCES]
    parts += sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("JSONARGPARSE_"))
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        stat = path.stat()
        parts.append(f"{path.relative_to(PACKAGE_DIR)}:{stat.st_size}:{stat.st_mtime_ns}")
    digest.update("\n".join(parts).encode())
    return digest.hexdigest()[:32]


def cached_help(args: Sequence[str]) -> str | None:
    """The saved text for ``args``, or ``None``."""
    try:
        return (cache_dir() / f"{help_key(args)}.txt").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def store_help(args: Sequence[str], text: str) -> None:
    """Save ``text`` for ``args`` atomically; a folder that cannot be written is skipped."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, delete=False, suffix=".part") as f:
            f.write(text)
        os.replace(f.name, folder / f"{help_key(args)}.txt")
    except OSError:
        with contextlib.suppress(OSError, NameError):
            os.unlink(f.name)


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def main() -> None:
    """Console-script entry point ``dpo-lightning`` (see :func:`dpo_lightning.cli.main`)."""
    args = sys.argv[1:]
    if not cacheable(args):
        from .cli import main as cli_main  # the whole CLI: Lightning and torch load here

        cli_main()
        return
    text = cached_help(args)
    if text is not None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from .cli import main as cli_main

    tee = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(tee):
            cli_main()
    except SystemExit as stop:
        if stop.code in (0, None) and tee.copy.getvalue():
            store_help(args, tee.copy.getvalue())
        raise
