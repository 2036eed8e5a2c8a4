"""What a run shows: per-step metrics, a loss's own metric names, a quiet terminal, the training
curves PNG and the model card."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import yaml
import torch

from conftest import ROOT, tiny_recipe, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.losses import DPOLoss, LossOutput
from dpo_lightning.plotting import plot_run
from dpo_lightning.run_logs import read_run

STEP_METRICS = ["train/loss", "train/lr", "train/grad_norm", "train/rewards/chosen", "train/rewards/rejected",
                "train/rewards/margins", "train/rewards/accuracy", "train/logps/chosen", "train/logps/rejected"]


class LogsItsOwn(DPOLoss):
    """DPO that logs an extra value under a name with a slash."""

    def forward(self, policy, reference, batch) -> LossOutput:
        out = super().forward(policy, reference, batch)
        out.metrics["apo/chosen_prob"] = policy.chosen_means.exp().detach()
        return out


def logged_run(tmp_path, pair_files, **model_args):
    recipe = tiny_recipe(tmp_path, *pair_files, **model_args)
    recipe["trainer"].update(max_steps=8, log_every_n_steps=1, limit_val_batches=1.0, val_check_interval=4,
                             logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": str(tmp_path / "logs")}})
    cli = run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    (metrics,) = list((tmp_path / "logs").rglob("metrics.csv"))
    return cli, list(csv.DictReader(metrics.open()))


def test_every_metric_is_logged_per_step_and_a_loss_keeps_its_names(tmp_path, pair_files, monkeypatch) -> None:
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    cli, rows = logged_run(tmp_path, pair_files, loss={"class_path": "test_run_output.LogsItsOwn", "init_args": {"beta": 0.1}})
    steps = [r for r in rows if r.get("train/loss")]
    assert len(steps) == 8  # one row per optimizer step
    for name in STEP_METRICS + ["train/apo/chosen_prob"]:
        assert all(r.get(name) not in (None, "") for r in steps), name
    assert all(0 < float(r["train/apo/chosen_prob"]) < 1 for r in steps)
    assert all(float(r["train/grad_norm"]) > 0 for r in steps)
    vals = [r for r in rows if r.get("val/loss")]
    assert len(vals) == 2 and all(r.get("val/apo/chosen_prob") for r in vals)
    assert "val/apo_chosen_prob" not in rows[0]


def test_plot_writes_a_png_that_loads(tmp_path, pair_files) -> None:
    import matplotlib.image

    logged_run(tmp_path, pair_files)
    path = plot_run(str(tmp_path / "logs"))
    image = matplotlib.image.imread(path)
    assert path.name == "curves.png" and image.shape[0] > 300 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # not blank: four panels with curves
    # `validate` with the same recipe logs into the same folder (version_1, at step 0): the plot
    # keeps the fit's curves and leaves the validate run out
    recipe = yaml.safe_load((tmp_path / "r.yaml").read_text())
    recipe["model"]["init_args"]["reference"] = {"model": recipe["model"]["init_args"]["model"]}
    run(["validate", "--config", write_recipe(tmp_path / "validate.yaml", recipe)])
    assert sorted(p.parent.name for p in (tmp_path / "logs").rglob("metrics.csv")) == ["version_0", "version_1"]
    series, files, skipped = read_run(tmp_path / "logs")
    assert [f.parent.name for f in files] == ["version_0"] and [f.parent.name for f in skipped] == ["version_1"]
    assert [step for step, _ in series["train/loss"]] == list(range(8))
    assert plot_run(str(tmp_path / "logs")) == path
    with pytest.raises(FileNotFoundError, match="nothing: no such folder"):
        plot_run(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no metrics.csv below it"):
        plot_run(str(tmp_path / "export"))


def test_export_has_a_model_card(tmp_path, pair_files) -> None:
    cli, _ = logged_run(tmp_path, pair_files)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "# LlamaForCausalLM trained with dpo-lightning" in card
    assert '`DPOLoss` {"beta": 0.1, "label_smoothing": 0.0, "divergence": "reverse_kl", "divergence_alpha": 0.5}' in card
    assert "8 optimizer steps" in card and "train: 32 rows read, 32 kept" in card
    assert cli.datamodule.data_fingerprint in card
    val = cli.model.validation_history[-1]
    assert f"| `val/rewards/accuracy` | {val['rewards/accuracy']:.6g} |" in card
    assert "## Recipe" in card and "class_path: dpo_lightning.losses.DPOLoss" in card


def test_console_output_is_quiet_and_short_class_names_resolve(tmp_path, pair_files) -> None:
    recipe = tiny_recipe(tmp_path, *pair_files)
    recipe["trainer"]["enable_progress_bar"] = True
    path = write_recipe(tmp_path / "r.yaml", recipe)
    out = subprocess.run([sys.executable, "-m", "dpo_lightning.cli", "fit", "--config", path],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    for noise in ("GPU available", "TPU available", "Tip:", "tensorboardX", "LeafSpec", "Loading weights", "┏━"):
        assert noise not in text, noise
    assert "model: " in text and "trainable" in text
    helped = subprocess.run([sys.executable, "-m", "dpo_lightning.cli", "fit", "--model.help", "PreferenceModule"],
                            capture_output=True, text=True, cwd=ROOT)
    assert helped.returncode == 0 and "--model.reference REFERENCE" in helped.stdout and "disable_dropout" in helped.stdout


def test_export_target_is_checked_before_training(tmp_path, pair_files) -> None:
    (tmp_path / "a-file").write_text("x")
    recipe = tiny_recipe(tmp_path, *pair_files, export_dir=str(tmp_path / "a-file" / "model"))
    with pytest.raises(NotADirectoryError, match=r"model.init_args.export_dir: .*a-file' is a file"):
        run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    torch.manual_seed(0)
