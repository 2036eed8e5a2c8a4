"""Resume after SIGKILL gives the uninterrupted run's weights; non-finite guard; run fingerprints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, quickstart_rows, tiny_recipe, write_jsonl, write_recipe
from dpo_lightning.cli import run

PLUGINS = str(ROOT / "tests" / "plugins")


def resume_recipe(tmp_path: Path, name: str, train: str, val: str, kill_at: int | None) -> str:
    recipe = tiny_recipe(tmp_path, train, val, export_dir=str(tmp_path / name / "export"))
    recipe["trainer"].update(
        max_steps=11, limit_val_batches=1, default_root_dir=str(tmp_path / name), enable_checkpointing=True,
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 3, "save_last": True, "save_top_k": -1}}],
    )
    recipe["data"]["init_args"]["batch_size"] = 4  # 32 rows: 8 batches an epoch, so step 5 is mid-epoch
    if kill_at is not None:
        recipe["trainer"]["callbacks"].append({"class_path": "faults.KillAtStep", "init_args": {"step": kill_at}})
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PLUGINS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dpo_lightning.cli", *args], env=env, capture_output=True, text=True)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, pair_files) -> None:
    straight = cli("fit", "--config", resume_recipe(tmp_path, "straight", *pair_files, kill_at=None))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed_recipe = resume_recipe(tmp_path, "killed", *pair_files, kill_at=5)
    killed = cli("fit", "--config", killed_recipe)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "export").exists()
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any("step=3" in c for c in ckpts)
    resume = resume_recipe(tmp_path, "killed", *pair_files, kill_at=None)
    resumed = cli("fit", "--config", resume, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after its first 3 batches" in resumed.stderr + resumed.stdout
    a = load_file(str(tmp_path / "straight" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # stated tolerance: 1e-6 absolute (CPU runs are in practice bit-identical)
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resume_with_other_data_or_model_names_what_differs(tmp_path, pair_files) -> None:
    recipe = tiny_recipe(tmp_path, *pair_files)
    recipe["trainer"]["enable_checkpointing"] = True
    run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    (ckpt,) = list((tmp_path / "run").rglob("*.ckpt"))
    other = write_jsonl(tmp_path / "other.jsonl", quickstart_rows(40)[8:])
    changed = tiny_recipe(tmp_path, other, pair_files[1], overwrite_export=True)
    changed["trainer"]["max_steps"] = 4
    with pytest.raises(ValueError, match=r"different run.*train_data.*data.train_data"):
        run(["fit", "--config", write_recipe(tmp_path / "c.yaml", changed), "--ckpt_path", str(ckpt)])
    bigger = tiny_recipe(tmp_path, *pair_files, overwrite_export=True)
    bigger["model"]["init_args"]["model"]["config"]["intermediate_size"] = 48
    bigger["trainer"]["max_steps"] = 4
    with pytest.raises(ValueError, match=r"different run.*model: checkpoint"):
        run(["fit", "--config", write_recipe(tmp_path / "b.yaml", bigger), "--ckpt_path", str(ckpt)])


def nan_recipe(tmp_path: Path, pair_files, mode: str) -> list[str]:
    recipe = tiny_recipe(tmp_path, *pair_files, on_nonfinite=mode,
                         loss={"class_path": "faults.NaNAtSteps", "init_args": {"steps": [1]}})
    recipe["trainer"]["max_steps"] = 3
    return ["fit", "--config", write_recipe(tmp_path / f"{mode}.yaml", recipe)]


def test_nonfinite_gradient_stops_with_row_ids(tmp_path, pair_files, monkeypatch) -> None:
    monkeypatch.syspath_prepend(PLUGINS)
    with pytest.raises(FloatingPointError, match=r"step 1 from dataset rows \[\d+, \d+, \d+, \d+\].*on_nonfinite: skip"):
        run(nan_recipe(tmp_path, pair_files, "stop"))
    assert not (tmp_path / "export").exists()


def test_nonfinite_gradient_skip_leaves_the_step_out(tmp_path, pair_files, monkeypatch) -> None:
    monkeypatch.syspath_prepend(PLUGINS)
    snapshots = []

    from lightning.pytorch.callbacks import Callback

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append([p.detach().clone() for p in pl_module.policy.parameters()])

    from dpo_lightning.cli import DPOLightningCLI

    monkeypatch.setattr(DPOLightningCLI, "after_instantiate_classes", lambda self: self.trainer.callbacks.append(Snapshot()))
    cli_ = run(nan_recipe(tmp_path, pair_files, "skip"))
    assert cli_.model.nonfinite_skipped == 1 and cli_.trainer.global_step == 3
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # step 1 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_checkpoint_restores_the_rng_stream(tmp_path) -> None:
    import random

    from dpo_lightning.modules.base import rng_state, set_rng_state

    torch.manual_seed(3), random.seed(3)
    saved = rng_state()
    expected = (torch.rand(3), random.random())
    path = tmp_path / "rng.pt"
    torch.save({"rng_state": saved}, path)
    torch.manual_seed(99), random.seed(99)
    set_rng_state(torch.load(path, weights_only=True)["rng_state"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
