"""What a run prints: the run, not the libraries.

Importing :mod:`dpo_lightning` calls :func:`quiet_libraries`, so the CLI and the Python API alike
show no library notice, tip, deprecation warning or progress bar that the user did not ask for:

- Lightning's hardware banner (``GPU available: ...``) and its ``Tip:`` advertisements;
- library deprecations raised inside Lightning (``LeafSpec``) and its ``tensorboardX`` notice;
- bitsandbytes' ``Failed to load CPU gemm_4bit_forward from kernels-community`` (it tries the
  hub for an optional kernel when it is imported; nothing in the run asked for it);
- transformers' weight-loading and shard-writing bars; datasets' tokenizing bars unless stderr
  is a terminal.

Warnings about the user's run (a Lightning ``rank_zero_warn``, a ``UserWarning`` from a loss)
still show, once per place, as Python shows them. ``DPO_LIGHTNING_VERBOSE=1``, ``--verbose`` on
the command line or :func:`verbose_libraries` brings everything back; ``TRANSFORMERS_VERBOSITY``
and ``HF_DATASETS_DISABLE_PROGRESS_BARS``, when set, are left to rule their libraries.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

#: environment variable that keeps every library message (``1``)
VERBOSE_ENV = "DPO_LIGHTNING_VERBOSE"

#: Lightning's start-up lines that say nothing about this run (its rank-zero logger's)
NOISE_LINES = ("GPU available:", "TPU available:", "HPU available:", "\N{ELECTRIC LIGHT BULB} Tip:")
#: loggers whose records are checked against :data:`NOISE_LINES`
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
#: library warnings that are not the user's to act on in a dpo-lightning run
NOISE_WARNINGS = (
    r".*`tensorboardX` has been removed as a dependency.*",  # the CSV logger is the default
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's own pytree call
    r".*is smaller than the logging interval.*",  # small quick runs
    r".*The dirpath has changed from.*",  # every resume with the default logger
)
#: bitsandbytes' hub-kernel notices, logged while it is imported (by it, and by the `kernels`
#: package it asks): ``(logger, message start)``
HUB_KERNEL_NOTICES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/"),
)


class _DropLines(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


_FILTERS: list[tuple[str, _DropLines]] = [
    *((name, _DropLines(NOISE_LINES)) for name in LIGHTNING_LOGGERS),
    *((name, _DropLines((start,))) for name, start in HUB_KERNEL_NOTICES),
]
_quiet = False


def verbose_requested() -> bool:
    """``DPO_LIGHTNING_VERBOSE`` is set to anything but ``""`` / ``"0"``."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_libraries() -> None:
    """Silence the library noise listed in the module docstring (idempotent; a no-op when
    ``DPO_LIGHTNING_VERBOSE`` is set)."""
    global _quiet
    if _quiet or verbose_requested():
        return
    for name, log_filter in _FILTERS:
        logging.getLogger(name).addFilter(log_filter)
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    _quiet = True
    if "transformers" in sys.modules:
        quiet_transformers()
    if "datasets" in sys.modules:
        quiet_datasets()


def quiet_transformers() -> None:
    """transformers' weight-loading and shard-writing bars off (unless ``TRANSFORMERS_VERBOSITY``
    rules). Called when :mod:`dpo_lightning.models` imports transformers, so ``import
    dpo_lightning`` alone (the plot command) does not import it."""
    if _quiet and "TRANSFORMERS_VERBOSITY" not in os.environ:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def quiet_datasets() -> None:
    """datasets' map/filter bars off unless stderr is a terminal (tokenizing a large set is long
    enough to want one there). Called when :mod:`dpo_lightning.data` imports datasets, so
    ``import dpo_lightning`` alone does not import it."""
    if _quiet and "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ and not _stderr_is_terminal():
        import datasets

        datasets.disable_progress_bars()


def verbose_libraries() -> None:
    """Undo :func:`quiet_libraries`: every library prints as it would without dpo-lightning."""
    global _quiet
    for name, log_filter in _FILTERS:
        logging.getLogger(name).removeFilter(log_filter)
    quieted = set(NOISE_WARNINGS)
    warnings.filters[:] = [f for f in warnings.filters
                           if not (f[0] == "ignore" and f[1] is not None and f[1].pattern in quieted)]
    if "transformers" in sys.modules and "TRANSFORMERS_VERBOSITY" not in os.environ:
        from transformers.utils import logging as transformers_logging

        transformers_logging.enable_progress_bar()
    if "datasets" in sys.modules and "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ:
        sys.modules["datasets"].enable_progress_bars()
    _quiet = False


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


#: errors that carry a message meant for the user: printed as one line, without a traceback
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, FloatingPointError, ImportError, RuntimeError)
#: environment variable that shows the traceback of such an error (``1``)
DEBUG_ENV = "DPO_LIGHTNING_DEBUG"


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` among ``argv``, or ``DPO_LIGHTNING_DEBUG`` set to anything but ``""`` / ``"0"``."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_text(err: BaseException) -> str:
    """The message of ``err`` as raised (a ``KeyError``'s own text, not its repr)."""
    return str(err.args[0] if isinstance(err, KeyError) and err.args else err)


def user_error_line(err: BaseException) -> str:
    """The message of ``err`` on one line (:func:`error_text`, whitespace joined)."""
    return " ".join(error_text(err).split())


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate nearest to ``word`` (difflib ratio >= 0.7), or ``None``."""
    import difflib

    matches = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.7)
    return matches[0] if matches else None


def run_tool(component: object, args: list[str] | None = None, *, as_positional: bool = False,
             missing_module_hint: str | None = None) -> object:
    """Run a console tool, a function whose arguments are its options (jsonargparse's ``auto_cli``).

    As in ``dpo-lightning``: an option is taken only by its whole name (``--polic`` is refused,
    not read as ``--policy``); a command line the parser refuses ends with one ``error:`` line
    (the closest option for a misspelled one) and exit status 2; an error meant for the user
    (:data:`USER_ERRORS`) ends the run with ``error: <message>`` on stderr and exit status 1;
    ``--debug`` or ``DPO_LIGHTNING_DEBUG=1`` shows the traceback instead, and ``--verbose`` (as
    ``--debug``) brings the libraries' messages back. ``missing_module_hint`` follows a missing optional module's name
    (``pip install 'dpo-lightning[plot]'``).

    Args:
        component: the function (or class) to run.
        args: the command line after the program name; ``None``: ``sys.argv[1:]``.
    Returns:
        what ``component`` returned.
    """
    import argparse

    from jsonargparse import auto_cli, auto_parser

    argv = list(sys.argv[1:] if args is None else args)
    debug = debug_requested(argv)
    if debug or "--verbose" in argv:
        verbose_libraries()
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    try:
        return auto_cli(component, args=argv, as_positional=as_positional, allow_abbrev=False, exit_on_error=debug)
    except argparse.ArgumentError as err:
        accepted = [s for action in auto_parser(component, as_positional=as_positional)._actions
                    for s in action.option_strings]
        unknown = [t.split("=", 1)[0] for t in argv if t.startswith("--") and t.split("=", 1)[0] not in accepted]
        near = [m for t in unknown if (m := closest(t, accepted)) is not None]
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        print(f"error: {user_error_line(err)}{hint}  [--help lists the options]", file=sys.stderr)
        raise SystemExit(2) from None
    except USER_ERRORS as err:
        if debug:
            raise
        if isinstance(err, ModuleNotFoundError) and missing_module_hint:
            print(f"error: this command needs {err.name}: {missing_module_hint}", file=sys.stderr)
        else:
            print(f"error: {user_error_line(err)}  [--debug shows the traceback]", file=sys.stderr)
        raise SystemExit(1) from None


@contextmanager
def named_as_options(options: dict[str, str]) -> Iterator[None]:
    """Re-raise a user error (:data:`~.console.USER_ERRORS`) of the code inside with each recipe
    key of ``options`` replaced by the console tool's option that sets it (the data module names
    ``data.init_args.train_data``; ``dpo-lightning-score`` calls it ``--data``). The error keeps
    its class (and its further arguments, e.g. a judge error's row)."""
    try:
        yield
    except USER_ERRORS as err:
        message = user_error_line(err)
        for key in sorted(options, key=len, reverse=True):
            message = message.replace(key, options[key])
        if message == user_error_line(err):
            raise
        try:
            renamed = type(err)(message, *err.args[1:])
        except TypeError:
            renamed = ValueError(message)
        raise renamed from err
