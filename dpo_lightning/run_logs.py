"""A run's CSV logs, read whole: every ``version_*`` folder of it stitched in step order, each
file checked before a value is taken from it.

Lightning's ``CSVLogger`` writes ``<save_dir>/<name>/version_<n>/metrics.csv``, and a resumed
run (``--ckpt_path``) writes a new version that goes on from the checkpoint's step. A run's
curves are therefore every version's rows, where a later version replaces what an earlier one
logged from its first step on (the steps a killed run logged after its last checkpoint were
trained again). A version that logged only ``val/`` or ``test/`` values, all at step 0, is a
``validate`` or ``test`` run in the same folder: it is left out of a run that trained, or it would
replace the whole run from step 0 on (a resumed fit that validated before it was killed logged
at its resume step, and stays). A file that is empty, cut in the middle of a row (a copy cut short, a run killed
while writing) or not a ``metrics.csv`` at all is an error naming the file and the line: a cut
value such as ``0.`` of ``0.6931`` would otherwise be drawn as 0.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

#: ``{name: [(step, value), ...]}``, each list in step order
Series = dict[str, list[tuple[int, float]]]

_VERSION = re.compile(r"version_(\d+)$")


def find_logs(run_dir: str | Path) -> list[Path]:
    """The ``metrics.csv`` files of the newest run logged under ``run_dir``, oldest version first.

    Every ``version_*`` folder beside the newest file's counts (a resume writes a new one);
    ``run_dir`` may be the trainer's ``default_root_dir``, the logger's ``save_dir`` or one
    version's folder (then that version alone).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist, or holds no ``metrics.csv``.
    """
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{run_dir}: no such folder{' (it is a file)' if root.exists() else ''}; give the run's folder "
            "(its trainer.default_root_dir, or the CSV logger's save_dir)"
        )
    files = sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(
            f"{run_dir}: no metrics.csv below it; plot a run logged with the CSV logger "
            "(the default without TensorBoard), e.g. its trainer.default_root_dir"
        )
    newest = files[-1]
    if not _VERSION.match(newest.parent.name) or newest.parent == root:
        return [newest]
    versions = [p for p in newest.parent.parent.glob("version_*/metrics.csv") if _VERSION.match(p.parent.name)]
    return sorted(versions, key=lambda p: int(_VERSION.match(p.parent.name).group(1)))


def read_log(path: Path) -> Series:
    """``{name: [(step, value), ...]}`` of one ``metrics.csv`` (rows without a value skipped).

    Raises:
        ValueError: naming ``path`` (and the line) when the file is empty, cut in the middle of
            a row, has no ``step`` column, or holds a value that is no number.
    """
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{path} is empty ({len(data)} bytes): the run logged no metrics to it. {_LOG_HINT}")
    if not data.endswith(b"\n"):
        line = data.count(b"\n") + 1
        raise ValueError(
            f"{path} ends in the middle of line {line} (the file was cut: a copy cut short, or a run killed "
            f"while writing); its last value cannot be trusted. Delete the cut line {line} to plot the rest"
        )
    rows = list(csv.reader(data.decode("utf-8", errors="replace").splitlines()))
    header = rows[0]
    if "step" not in header:
        raise ValueError(f"{path}: no 'step' column in its first line; it is not a Lightning CSVLogger metrics.csv")
    series: Series = defaultdict(list)
    step_at = header.index("step")
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path} line {number} has {len(row)} values for the {len(header)} columns of its header")
        step = _number(path, number, "step", row[step_at])
        for name, value in zip(header, row):
            if name not in ("step", "epoch") and value != "":
                series[name].append((int(step), _number(path, number, name, value)))
    if not series:
        raise ValueError(f"{path} holds a header but no logged value. {_LOG_HINT}")
    return dict(series)


_LOG_HINT = (
    "A run logs every trainer.log_every_n_steps steps (10 in the shipped recipes): a shorter run logs no "
    "training step; set it lower"
)


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path} line {line}: column {column!r} holds {text!r}, not a number") from None
    return value


def stitch(versions: list[Series]) -> Series:
    """One run's series from its versions, oldest first: each version replaces the points of the
    earlier ones from its own first step on; the result is in step order."""
    out: Series = {}
    for series in versions:
        steps = [step for points in series.values() for step, _ in points]
        if not steps:
            continue
        start = min(steps)
        out = {name: [(s, v) for s, v in points if s < start] for name, points in out.items()}
        for name, points in series.items():
            out.setdefault(name, []).extend(points)
    return {name: sorted(points, key=lambda p: p[0]) for name, points in out.items() if points}


class RunLogs(NamedTuple):
    """What :func:`read_run` read: the stitched ``series``, the ``files`` it came from (oldest
    version first), and the ``skipped`` files of validate or test runs in the same folder."""

    series: Series
    files: list[Path]
    skipped: list[Path]


def evaluation_only(series: Series) -> bool:
    """``series`` is a ``validate`` or ``test`` run's log: only ``val/`` or ``test/`` values, all
    at step 0."""
    return all(name.startswith(("val/", "test/")) and all(step == 0 for step, _ in points)
               for name, points in series.items())


def read_run(run_dir: str | Path) -> RunLogs:
    """The stitched series of the newest run under ``run_dir`` (:func:`find_logs`,
    :func:`read_log`, :func:`stitch`), with the KL proxy added (:func:`add_kl_proxy`).

    The versions of ``dpo-lightning validate`` or ``test`` runs written into the run's folder
    (:func:`evaluation_only`) are skipped when another version is not one; else every version
    is read."""
    logs = [(path, read_log(path)) for path in find_logs(run_dir)]
    fits = [(path, series) for path, series in logs if not evaluation_only(series)] or logs
    series = stitch([series for _, series in fits])
    add_kl_proxy(series)
    kept = [path for path, _ in fits]
    return RunLogs(series, kept, [path for path, _ in logs if path not in kept])


def add_kl_proxy(series: Series) -> None:
    """``<split>/kl_proxy = (rewards/chosen + rewards/rejected) / 2`` at the steps logging both,
    for ``train/``, ``train_epoch/`` and ``val/``."""
    for prefix in ("train/", "train_epoch/", "val/"):
        chosen = dict(series.get(f"{prefix}rewards/chosen", []))
        rejected = dict(series.get(f"{prefix}rewards/rejected", []))
        points = [(s, (chosen[s] + rejected[s]) / 2) for s in sorted(chosen) if s in rejected]
        if points:
            series[f"{prefix}kl_proxy"] = points
