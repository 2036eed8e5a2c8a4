"""``dpo-lightning-plot RUN_DIR``: training curves of a run as a PNG, from its CSV logs.

Reads every ``metrics.csv`` of the newest run under ``RUN_DIR`` (Lightning's ``CSVLogger``, the
default logger when TensorBoard is not installed), stitched in step order across the
``version_*`` folders a resume writes, a ``validate`` run's version left out (:mod:`.run_logs`),
and draws, against the optimizer
step: the loss, the reward margin, the reward accuracy, and a KL proxy,
``(rewards/chosen + rewards/rejected) / 2`` = the mean of ``beta * (log pi - log pi_ref)`` over
the data's responses (how far the policy has moved from the reference on them; not the KL of
its own samples, which ``dpo-lightning-evaluate`` estimates). Training values per logged step
(the epoch means where no step was logged), validation values as a line through every
validation of the run. An empty, cut or missing log is an error in one line, never an empty
figure. Needs matplotlib (``pip install 'dpo-lightning[plot]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .console import run_tool
from .run_logs import Series, read_run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: ``(metric, title, y-axis label)`` of each panel
PANELS = (
    ("loss", "loss", "loss"),
    ("rewards/margins", "reward margin", "reward margin (chosen - rejected)"),
    ("rewards/accuracy", "reward accuracy", "share of pairs with r_w > r_l"),
    ("kl_proxy", "KL proxy: mean beta * log(pi / pi_ref)", "mean implicit reward"),
)


def training_points(series: Series, name: str) -> tuple[str, list[tuple[int, float]]]:
    """The training curve of ``name``: per logged step, or the epoch means where no step was logged."""
    if series.get(f"train/{name}"):
        return "train", series[f"train/{name}"]
    return "train (epoch mean)", series.get(f"train_epoch/{name}", [])


def check_something_to_plot(series: Series, files: list[Path]) -> None:
    """Refuse logs that hold none of the plotted metrics (a figure of empty axes says nothing)."""
    if any(training_points(series, name)[1] or series.get(f"val/{name}") for name, _, _ in PANELS):
        return
    raise ValueError(
        f"{', '.join(str(f) for f in files)}: no training or validation loss, reward margin, accuracy or reward "
        f"logged (found {sorted(series) or 'no metric'}). A run logs every trainer.log_every_n_steps steps (10 in "
        "the shipped recipes): lower it for a short run, and validate (a val split) to see validation"
    )


def figure(series: Series) -> Figure:
    """The four panels of ``series``: per panel the training curve, the validation line and
    labelled axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for points in series.values() for s, _ in points]
    span = (min(steps), max(steps))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (name, title, ylabel) in zip(axes.flat, PANELS):
        label, points = training_points(series, name)
        if points:
            ax.plot(*zip(*points), "-" if label == "train" else "s-", label=label, markersize=4)
        val = series.get(f"val/{name}", [])
        if len(val) > 1:
            ax.plot(*zip(*val), "o-", label="val", markersize=4, linewidth=1.5)
        elif val:  # one validation: its value across the run, marked where it was taken
            (step, value), = val
            ax.hlines(value, *span, linestyles="dotted", colors="C1")
            ax.plot([step], [value], "o", color="C1", label=f"val (one validation, step {step})", markersize=5)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return fig


def draw(series: Series, target: Path) -> None:
    """The panels of ``series`` (:func:`figure`) saved as the PNG ``target``."""
    import matplotlib.pyplot as plt

    fig = figure(series)
    fig.savefig(target, dpi=100)
    plt.close(fig)


def plot_run(run_dir: str, output: str | None = None) -> Path:
    """Draw the curves of the newest run under ``run_dir`` (every version of its CSV logs);
    returns the PNG's path (default ``curves.png`` beside the newest ``metrics.csv``).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no ``metrics.csv``.
        ValueError: a log is empty or cut (naming the file and line), or none holds a plotted metric.
    """
    series, files, skipped = read_run(run_dir)
    check_something_to_plot(series, files)
    target = Path(output) if output else files[-1].parent / "curves.png"
    draw(series, target)
    print(f"wrote {target} from {len(files)} log file(s)")
    for path in skipped:
        print(f"skipped {path}: validation or test values at step 0 only (a validate or test run in the same folder)")
    return target


def main(args: list[str] | None = None) -> None:
    """Console-script entry point ``dpo-lightning-plot``: a failure is one line on stderr and
    exit status 1."""
    run_tool(plot_run, args, as_positional=True, missing_module_hint="pip install 'dpo-lightning[plot]'")


if __name__ == "__main__":
    main()
