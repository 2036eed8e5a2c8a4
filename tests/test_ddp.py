"""DDP with 2 CPU processes (gloo): same result as one process on the same global batch."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import quickstart_rows, tiny_recipe, write_jsonl, write_recipe


def launch(tmp_path: Path, name: str, train: str, val: str, devices: int, batch_size: int) -> Path:
    # SGD: an update linear in the gradient, so float32 summation order cannot be amplified the
    # way Adam's m / sqrt(v) amplifies it for near-zero gradients
    recipe = tiny_recipe(tmp_path / name, train, val, export_dir=str(tmp_path / name / "export"),
                         optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}})
    recipe["trainer"].update(
        devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=4, limit_val_batches=1.0,
        num_sanity_val_steps=0, val_check_interval=4,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / name)}},
    )
    recipe["data"]["init_args"].update(batch_size=batch_size, eval_batch_size=4)
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "dpo_lightning.cli", "fit", "--config", path],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path / name


def val_metrics(run_dir: Path) -> dict[str, float]:
    (metrics,) = list(run_dir.rglob("metrics.csv"))
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/rewards/accuracy")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", quickstart_rows(64))
    val = write_jsonl(tmp_path / "val.jsonl", quickstart_rows(16, "val"))
    single = launch(tmp_path, "single", train, val, devices=1, batch_size=8)
    ddp = launch(tmp_path, "ddp", train, val, devices=2, batch_size=4)  # 2 x 4 = the same 8 pairs a step
    a = load_file(str(single / "export" / "model.safetensors"))
    b = load_file(str(ddp / "export" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    m1, m2 = val_metrics(single), val_metrics(ddp)
    assert m1.keys() == m2.keys() and "val/rewards/accuracy" in m1
    for key in m1:  # the val set is split across ranks and synced by torchmetrics
        assert abs(m1[key] - m2[key]) < 1e-3 * max(1.0, abs(m1[key])), (key, m1[key], m2[key])
