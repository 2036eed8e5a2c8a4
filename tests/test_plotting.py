"""``dpo-lightning-plot``: every version of a run's CSV logs stitched in step order, labelled
axes, validation as a line, and an empty, cut or missing log refused in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dpo_lightning import plotting
from dpo_lightning.plotting import main, plot_run

HEADER = "epoch,step,train/loss,train/rewards/margins,train_epoch/loss,val/loss,val/rewards/accuracy\n"


def write_log(folder: Path, rows: list[str], header: str = HEADER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.csv"
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


def train_row(step: int, loss: float) -> str:
    return f"0,{step},{loss},{loss / 10},,,"


def val_row(step: int, loss: float) -> str:
    return f"0,{step},,,,{loss},0.5"


def resumed_run(root: Path) -> Path:
    """version_0 logs steps 1-6 (killed after its step-3 checkpoint), version_1 resumes at step 4."""
    logs = root / "logs" / "lightning_logs"
    write_log(logs / "version_0", [train_row(s, 1.0) for s in (1, 2, 3)] + [val_row(3, 0.9)]
              + [train_row(s, 5.0) for s in (4, 5, 6)])
    write_log(logs / "version_1", [train_row(s, 0.5) for s in (4, 5, 6, 7)] + [val_row(7, 0.4)])
    return root


def read_run(run_dir: Path):
    from dpo_lightning.run_logs import read_run

    series, files, _ = read_run(run_dir)
    return series, files


def figure(series):
    return plotting.figure(series)


def run_main(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """``dpo-lightning-plot ARGS`` as the console script runs it: its status, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["dpo-lightning-plot", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_every_version_is_stitched_in_step_order(tmp_path) -> None:
    series, files = read_run(resumed_run(tmp_path))
    assert [f.parent.name for f in files] == ["version_0", "version_1"]
    # version_1 replaces what version_0 logged from step 4 on (the steps trained again)
    assert series["train/loss"] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.5), (5, 0.5), (6, 0.5), (7, 0.5)]
    assert series["val/loss"] == [(3, 0.9), (7, 0.4)]
    path = plot_run(str(tmp_path))
    assert path == tmp_path / "logs" / "lightning_logs" / "version_1" / "curves.png" and path.stat().st_size > 10_000


def test_axes_are_labelled_and_validation_is_a_line_over_the_run(tmp_path) -> None:
    series, _ = read_run(resumed_run(tmp_path))
    fig = figure(series)
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == [
        "loss", "reward margin (chosen - rejected)", "share of pairs with r_w > r_l", "mean implicit reward"]
    assert all(ax.get_xlabel() == "optimizer step" for ax in axes)
    (val,) = [line for line in axes[0].lines if line.get_label() == "val"]
    assert list(val.get_xdata()) == [3, 7] and list(val.get_ydata()) == [0.9, 0.4] and val.get_linestyle() == "-"
    (train,) = [line for line in axes[0].lines if line.get_label() == "train"]
    assert list(train.get_xdata()) == [1, 2, 3, 4, 5, 6, 7]


def test_one_validation_is_drawn_across_the_run(tmp_path) -> None:
    write_log(tmp_path / "version_0", [train_row(s, 1.0 / s) for s in (1, 2, 3, 4)] + [val_row(4, 0.6)])
    fig = figure(read_run(tmp_path)[0])
    (marker,) = [line for line in fig.axes[0].lines if line.get_label().startswith("val")]
    assert marker.get_label() == "val (one validation, step 4)"
    (across,) = fig.axes[0].collections  # the dotted line at its value from the first to the last step
    assert [list(p) for p in across.get_segments()[0]] == [[1, 0.6], [4, 0.6]]


def test_a_short_run_that_logged_only_its_epoch_means_is_drawn(tmp_path) -> None:
    write_log(tmp_path / "version_0", ["0,2,,,0.68,,", "0,2,,,,0.7,0.25"])
    fig = figure(read_run(tmp_path)[0])
    assert [line.get_label() for line in fig.axes[0].lines] == ["train (epoch mean)", "val (one validation, step 2)"]


def test_missing_folder_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    code, out, err = run_main(capsys, monkeypatch, str(tmp_path / "nothing"))
    assert code == 1 and out == "" and "Traceback" not in err
    assert err == f"error: {tmp_path / 'nothing'}: no such folder; give the run's folder (its trainer.default_root_dir, " \
                  "or the CSV logger's save_dir)  [--debug shows the traceback]\n"
    code, _, err = run_main(capsys, monkeypatch, str(tmp_path))
    assert code == 1 and err.startswith(f"error: {tmp_path}: no metrics.csv below it") and err.count("\n") == 1


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes): the run logged no metrics to it"),
    (b"\n\n", "is empty (2 bytes)"),
    (HEADER.encode(), "holds a header but no logged value"),
    ((HEADER + "0,1,0.6931,0.1,,,\n0,2,0.").encode(), "ends in the middle of line 3 (the file was cut"),
    ((HEADER + "0,1,0.6931\n").encode(), "line 2 has 3 values for the 7 columns of its header"),
    (b"loss\n0.5\n", "no 'step' column in its first line"),
    ((HEADER + "0,1,nan-ish,0.1,,,\n").encode(), "line 2: column 'train/loss' holds 'nan-ish', not a number"),
])
def test_empty_or_cut_log_is_refused_in_one_line(tmp_path, capsys, monkeypatch, content, message) -> None:
    (tmp_path / "version_0").mkdir()
    path = tmp_path / "version_0" / "metrics.csv"
    path.write_bytes(content)
    code, out, err = run_main(capsys, monkeypatch, str(tmp_path))
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(f"error: {path}") and message in err
    assert not (tmp_path / "version_0" / "curves.png").exists()


def test_log_without_a_plotted_metric_is_refused(tmp_path, capsys, monkeypatch) -> None:
    write_log(tmp_path / "version_0", ["0,1,0.001"], header="epoch,step,train/lr\n")
    code, _, err = run_main(capsys, monkeypatch, str(tmp_path))
    assert code == 1 and "no training or validation loss, reward margin, accuracy or reward logged (found ['train/lr'])" in err
    assert "trainer.log_every_n_steps" in err


def test_a_good_run_exits_0(tmp_path, capsys, monkeypatch) -> None:
    resumed_run(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dpo-lightning-plot", str(tmp_path)])
    main()
    assert capsys.readouterr().out == f"wrote {tmp_path / 'logs/lightning_logs/version_1/curves.png'} from 2 log file(s)\n"


def test_without_matplotlib_the_error_names_the_extra(tmp_path, capsys, monkeypatch) -> None:
    resumed_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ModuleNotFoundError
    code, out, err = run_main(capsys, monkeypatch, str(tmp_path))
    assert code == 1 and "Traceback" not in err
    assert err == "error: this command needs matplotlib: pip install 'dpo-lightning[plot]'\n"


def test_debug_shows_the_traceback(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["dpo-lightning-plot", str(tmp_path / "nothing"), "--debug"])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main()


def test_a_validate_run_in_the_same_folder_is_left_out_not_stitched_over_the_fit(tmp_path, capsys, monkeypatch) -> None:
    """``dpo-lightning validate`` with the recipe's folder writes version_2 at step 0: stitched, it
    replaced the whole fit from step 0 on and the figure showed one validation point."""
    resumed_run(tmp_path)
    logs = tmp_path / "logs" / "lightning_logs"
    write_log(logs / "version_2", [val_row(0, 0.3)])
    from dpo_lightning.run_logs import read_run as read_logs

    series, files, skipped = read_logs(tmp_path)
    assert [f.parent.name for f in files] == ["version_0", "version_1"] and skipped == [logs / "version_2" / "metrics.csv"]
    assert series["train/loss"][-1] == (7, 0.5) and series["val/loss"] == [(3, 0.9), (7, 0.4)]
    monkeypatch.setattr(sys, "argv", ["dpo-lightning-plot", str(tmp_path)])
    main()
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {logs / 'version_1' / 'curves.png'} from 2 log file(s)",
        f"skipped {logs / 'version_2' / 'metrics.csv'}: validation or test values at step 0 only (a validate or test "
        "run in the same folder)"]


def test_a_resumed_fit_that_only_validated_before_it_was_killed_is_kept(tmp_path) -> None:
    """version_1 resumed at step 4 and logged one validation (step 5) before a kill: it replaces
    version_0 from step 5 on, as any resume does."""
    logs = tmp_path / "lightning_logs"
    write_log(logs / "version_0", [train_row(s, 1.0) for s in range(1, 8)] + [val_row(3, 0.9)])
    write_log(logs / "version_1", [val_row(5, 0.6)])
    from dpo_lightning.run_logs import read_run as read_logs

    series, files, skipped = read_logs(tmp_path)
    assert len(files) == 2 and skipped == []
    assert series["val/loss"] == [(3, 0.9), (5, 0.6)] and series["train/loss"][-1] == (4, 1.0)


def test_validate_runs_alone_are_plotted(tmp_path) -> None:
    logs = tmp_path / "lightning_logs"
    write_log(logs / "version_0", [val_row(0, 0.7)])
    write_log(logs / "version_1", [val_row(0, 0.3)])
    from dpo_lightning.run_logs import read_run as read_logs

    series, files, skipped = read_logs(tmp_path)
    assert len(files) == 2 and skipped == [] and series["val/loss"] == [(0, 0.3)]


def test_verbose_brings_the_library_messages_back(tmp_path, monkeypatch, capsys) -> None:
    from dpo_lightning import console

    calls = []
    monkeypatch.setattr(console, "verbose_libraries", lambda: calls.append(True))
    resumed_run(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dpo-lightning-plot", "--verbose", str(tmp_path)])
    main()
    assert calls == [True] and capsys.readouterr().out.startswith("wrote ")
