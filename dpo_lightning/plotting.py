"""``dpo-lightning-plot RUN_DIR``: training curves of a run as a PNG, from its CSV logs.

Reads the newest ``metrics.csv`` under ``RUN_DIR`` (Lightning's ``CSVLogger``, the default
logger when TensorBoard is not installed) and draws, against the optimizer step: the loss, the
reward margin, the reward accuracy, and a KL proxy, ``(rewards/chosen + rewards/rejected) / 2``
= the mean of ``beta * (log pi - log pi_ref)`` over the data's responses (how far the policy
has moved from the reference on them; not the KL of its own samples, which
``dpo-lightning-evaluate`` estimates). Training values per logged step, validation values per
validation. Needs matplotlib (``pip install 'dpo-lightning[plot]'``).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

PANELS = (
    ("loss", "loss"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracy", "reward accuracy"),
    ("kl_proxy", "KL proxy: mean beta * log(pi / pi_ref)"),
)


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, value), ...]}`` from a CSVLogger ``metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in (None, ""):
                    series[name].append((step, float(value)))
    for prefix in ("train/", "val/"):
        chosen, rejected = dict(series.get(f"{prefix}rewards/chosen", [])), dict(series.get(f"{prefix}rewards/rejected", []))
        series[f"{prefix}kl_proxy"] = [(s, (chosen[s] + rejected[s]) / 2) for s in sorted(chosen) if s in rejected]
    return series


def plot_run(run_dir: str, output: str | None = None) -> Path:
    """Draw the curves of the newest ``metrics.csv`` under ``run_dir``; returns the PNG's path
    (default ``<folder of metrics.csv>/curves.png``).

    Raises:
        FileNotFoundError: no ``metrics.csv`` under ``run_dir`` (the run logged with another
            logger, or ``logger: false``).
    """
    files = sorted(Path(run_dir).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(
            f"{run_dir}: no metrics.csv below it; plot a run logged with the CSV logger "
            "(the default without TensorBoard), e.g. its trainer.default_root_dir"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(files[-1])
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (name, title) in zip(axes.flat, PANELS):
        for split, style in (("train", "-"), ("val", "o-")):
            points = series.get(f"{split}/{name}", [])
            if points:
                ax.plot(*zip(*points), style, label=split, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    target = Path(output) if output else files[-1].parent / "curves.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    print(f"wrote {target}")
    return target


def main() -> None:
    """Console-script entry point ``dpo-lightning-plot``."""
    from jsonargparse import auto_cli

    auto_cli(plot_run, as_positional=True)
