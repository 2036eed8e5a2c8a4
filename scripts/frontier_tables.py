"""The tables of the sentiment experiment, written from its CSV files into docs/frontier.md and
README.md, so that ``make experiment`` regenerates every table it reports (and ``--plot-only``
rewrites them from the CSV files alone).

Each table lives between two marker lines in the Markdown file::

    <!-- generated: results (scripts/sentiment_frontier.py) -->
    ... replaced on every run ...
    <!-- end: results -->

* ``results`` (docs/frontier.md): every run of ``docs/frontier.csv`` with reward, KL, regret,
  KL efficiency, where DPO's optimum lies on Bradley-Terry labels, and the KL that lands off
  the sentiment words (``docs/frontier_kl_split.csv``, seed 0), after the SFT model and
  best-of-n (``docs/frontier_best_of_n.csv``);
* ``regret`` (README.md): the same for best-of-8 and the runs named in :data:`README_RUNS`;
* ``timing`` (docs/frontier.md and README.md): the wall and CPU time of the run that wrote them
  (``docs/frontier_timing.json``).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

#: the runs of README.md's table (labels of docs/frontier.csv); a label the run did not have is left out
README_RUNS = [
    "DPO beta=1.0",
    "DPO beta=0.5",
    "DPO, Bradley-Terry labels beta=1.0",
    "online DPO beta=1.0",
    "iterative DPO, all pairs beta=1.0",
    "online DPO, 8 samples, all pairs, lr 3e-4, 3 epochs beta=1.0",
    "online DPO, 8 samples, all pairs, lr 3e-4, 3 epochs beta=0.5",
]
#: best-of-n rows shown (n of docs/frontier_best_of_n.csv)
BEST_OF_SHOWN = (4, 8, 16)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A CSV file's rows, numbers as floats and empty cells as ``None``; ``[]`` if it is missing."""
    if not path.exists():
        return []

    def value(cell: str) -> Any:
        if cell == "":
            return None
        try:
            return float(cell)
        except ValueError:
            return cell

    with path.open(newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def number(value: Any, digits: int, se: Any = None) -> str:
    """``value`` with ``digits`` decimals, ``± se`` when a standard error is given; ``""`` for none."""
    if value is None:
        return ""
    text = f"{value:.{digits}f}"
    return text + (f" ± {se:.{digits}f}" if isinstance(se, float) and se == se else "")


def results_table(summary: list[dict[str, Any]], best_of: list[dict[str, Any]],
                  kl_split: list[dict[str, Any]]) -> str:
    """docs/frontier.md's table: SFT and best-of-n, then every run of ``summary``.

    Args:
        summary: rows of docs/frontier.csv (mean across seeds and ``*_se``; ``regret``,
            ``kl_efficiency``; ``optimum_*`` for runs on Bradley-Terry labels).
        best_of: rows of docs/frontier_best_of_n.csv (``n``, ``reward``, exact ``kl``).
        kl_split: rows of docs/frontier_kl_split.csv (seed 0: ``kl_other`` + ``kl_eos`` is the
            KL off the sentiment words).
    """
    off_sentiment = {r["label"]: r["kl_other"] + r["kl_eos"] for r in kl_split
                     if r.get("kl_other") is not None and r.get("kl_eos") is not None}
    seeds = max((int(r["seeds"]) for r in summary if r.get("seeds")), default=0)
    lines = [f"| run ({seeds} seeds) | reward | KL (nats) | regret | KL efficiency | DPO's optimum here: π\\* at βτ "
             "(reward, KL) | KL off the sentiment words: EOS and other tokens (seed 0) |",
             "|---|---|---|---:|---:|---|---:|"]
    for r in summary:
        if r["series"] != "SFT":
            continue
        lines.append(f"| SFT | {number(r['reward'], 3, r.get('reward_se'))} | 0 | | | | |")
    for r in best_of:
        if int(r["n"]) in BEST_OF_SHOWN:
            lines.append(f"| best-of-{int(r['n'])} from SFT (exact KL) | {number(r['reward'], 3)} | {number(r['kl'], 2)} "
                         "| | | | |")
    for r in summary:
        if r["series"] == "SFT":
            continue
        optimum = ""
        if r.get("optimum_beta") is not None:
            optimum = f"βτ {r['optimum_beta']:g}: {r['optimum_reward']:.3f}, {r['optimum_kl']:.2f}"
        off = off_sentiment.get(r["label"])
        fewer = int(r["seeds"]) if r.get("seeds") and int(r["seeds"]) < seeds else None  # a series run on fewer seeds
        name = pretty(r["label"]) + (" (1 seed; ± the evaluation's)" if fewer == 1 else
                                     f" ({fewer} seeds)" if fewer else "")
        lines.append(f"| {name} | {number(r['reward'], 3, r.get('reward_se'))} | "
                     f"{number(r['kl'], 2, r.get('kl_se'))} | {number(r.get('regret'), 3)} | "
                     f"{number(r.get('kl_efficiency'), 2)} | {optimum} | {number(off, 2)} |")
    return "\n".join(lines)


def regret_table(summary: list[dict[str, Any]], best_of: list[dict[str, Any]], runs: list[str] = README_RUNS) -> str:
    """README.md's table: best-of-8 and the runs labelled ``runs`` (in that order), reward, KL
    and regret; a label ``summary`` lacks is left out."""
    seeds = max((int(r["seeds"]) for r in summary if r.get("seeds")), default=0)
    lines = [f"| run ({seeds} seeds) | reward | KL (nats) | regret |", "|---|---|---|---:|"]
    by_label = {r["label"]: r for r in summary}
    for r in best_of:
        if int(r["n"]) == 8:
            lines.append(f"| best-of-8 from the SFT model (exact KL) | {r['reward']:.3f} | {r['kl']:.2f} | |")
    for label in runs:
        r = by_label.get(label)
        if r is not None:
            lines.append(f"| {pretty(label)} | {number(r['reward'], 3)} | {number(r['kl'], 2)} | "
                         f"{number(r.get('regret'), 3)} |")
    return "\n".join(lines)


def pretty(label: str) -> str:
    """A run label as the tables write it: ``beta=0.5 alpha=1.0`` as ``β 0.5, α 1.0`` (``gamma=``
    as ``γ``); the
    online recipe's own settings (``online DPO beta=1.0``) as ``online DPO as shipped, β 1.0``."""
    if label.startswith("online DPO beta="):
        label = label.replace("online DPO ", "online DPO as shipped, ", 1)
    return label.replace(" alpha=", ", α ").replace(" gamma=", ", γ ").replace("beta=", "β ")


def timing_line(timing: dict[str, Any]) -> str:
    """One sentence: the wall and CPU time of the run that wrote the tables
    (docs/frontier_timing.json, a copy of ``outputs/frontier/timing.json``)."""
    total = timing["total"]
    line = (f"The `make experiment` run that wrote these tables took {total['wall_s'] / 60:.1f} minutes of wall time "
            f"with {timing.get('jobs', 2)} workers ({total['cpu_s']:.0f} CPU seconds in all processes")
    if "quiet_estimate_s" in timing:
        line += (f"; on {timing.get('jobs', 2)} free cores: SFT's CPU time, then the rest shared by the workers, "
                 f"{timing['quiet_estimate_s'] / 60:.1f} minutes")
    return line + ")."


def replace_region(path: Path, name: str, body: str) -> None:
    """Replace what stands between ``path``'s markers of region ``name`` by ``body``.

    Raises:
        ValueError: ``path`` lacks the pair of marker lines (naming both lines to add).
    """
    text = path.read_text()
    pattern = re.compile(rf"(<!-- generated: {re.escape(name)} [^\n]*-->\n)(.*?)(<!-- end: {re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{path}: no region {name!r}; add the lines '<!-- generated: {name} "
                         f"(scripts/sentiment_frontier.py) -->' and '<!-- end: {name} -->' where the table goes")
    path.write_text(pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text, count=1))


def write_tables(docs: Path, frontier_md: Path, readme: Path) -> None:
    """Write the ``results`` and ``regret`` regions from the CSV files in ``docs``, and the
    ``timing`` regions from ``docs/frontier_timing.json`` where it exists."""
    summary = read_rows(docs / "frontier.csv")
    best_of = read_rows(docs / "frontier_best_of_n.csv")
    kl_split = read_rows(docs / "frontier_kl_split.csv")
    replace_region(frontier_md, "results", results_table(summary, best_of, kl_split))
    replace_region(readme, "regret", regret_table(summary, best_of))
    timing_file = docs / "frontier_timing.json"
    if timing_file.exists():
        line = timing_line(json.loads(timing_file.read_text()))
        for path in (frontier_md, readme):
            replace_region(path, "timing", line)
