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

from conftest import PLUGINS, cli, quickstart_rows, resume_recipe, tiny_recipe, write_jsonl, write_recipe
from dpo_lightning.cli import run

@pytest.mark.slow
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
    with pytest.raises(ValueError, match=r"different run.*train_data.*data.init_args.train_data"):
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


# -- the shape a user runs: max_epochs, the default logger, step and epoch-end checkpoints ------
def shipped_shape(tmp_path: Path, name: str, train: str, val: str, faults: list[dict] = (), **data) -> str:
    """Like the resume recipe of docs/resuming-and-failures.md: 2 epochs of 8 batches, checkpoints every 3 steps with
    last.ckpt and at every epoch end, the default logger (versioned folders)."""
    recipe = tiny_recipe(tmp_path, train, val, export_dir=str(tmp_path / name / "export"))
    trainer = recipe["trainer"]
    for key in ("max_steps", "logger"):
        trainer.pop(key)
    trainer.update(
        max_epochs=2, limit_val_batches=1, default_root_dir=str(tmp_path / name), enable_checkpointing=True,
        callbacks=[
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"every_n_train_steps": 3, "save_last": True, "save_top_k": -1}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"every_n_epochs": 1, "save_top_k": -1, "filename": "{epoch}-end"}},
            *faults,
        ],
    )
    recipe["data"]["init_args"].update(batch_size=4, **data)
    return write_recipe(tmp_path / f"{name}-{len(faults)}.yaml", recipe)


def cli_on_tmpfs(*args: str) -> subprocess.CompletedProcess:
    """``cli`` with TMPDIR on another filesystem than the checkpoints (tmpfs), where a staged
    write followed by a move is a copy, not an atomic rename."""
    tmpfs = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    env = dict(os.environ, PYTHONPATH=PLUGINS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if tmpfs is not None:
        folder = tmpfs / f"dpo-lightning-test-{os.getpid()}"
        folder.mkdir(exist_ok=True)
        env["TMPDIR"] = str(folder)
    return subprocess.run([sys.executable, "-m", "dpo_lightning.cli", *args], env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_shipped_shape_killed_at_random_steps_and_while_writing_resumes_to_the_same_weights(tmp_path, pair_files) -> None:
    import random

    straight = cli_on_tmpfs("fit", "--config", shipped_shape(tmp_path, "straight", *pair_files))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # 16 steps in all (8 an epoch); one kill at a random step of epoch 0 that is not a checkpoint
    # step, then one while last.ckpt of a later checkpoint step (every 3) is being written
    rng = random.Random(int(os.environ.get("RESUME_TEST_SEED", "11")))
    first, second = rng.choice([2, 4, 5, 7]), rng.choice([9, 12, 15])
    runs = [
        [{"class_path": "faults.KillAtStep", "init_args": {"step": first}}],
        [{"class_path": "faults.KillWhileSaving", "init_args": {"step": second, "nth": 2}}],  # 2nd file: last.ckpt
        [],
    ]
    for i, faults in enumerate(runs):
        args = ["fit", "--config", shipped_shape(tmp_path, "killed", *pair_files, faults=faults)]
        result = cli_on_tmpfs(*args, *(["--ckpt_path", "last"] if i else []))
        if faults:
            assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        else:
            assert result.returncode == 0, result.stderr[-3000:]
        if i == 2:
            assert "resuming from" in result.stderr + result.stdout
    versions = sorted(p.name for p in (tmp_path / "killed" / "lightning_logs").iterdir())
    assert versions == ["version_0", "version_1", "version_2"]  # the default logger's folders
    assert not list((tmp_path / "killed").rglob("*.partial-*"))  # no temporary file left behind
    a = load_file(str(tmp_path / "straight" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "export" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_last_with_no_checkpoint_is_an_error_naming_where_it_looked(tmp_path, pair_files) -> None:
    result = cli("fit", "--config", shipped_shape(tmp_path, "fresh", *pair_files), "--ckpt_path", "last")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --ckpt_path last: no readable checkpoint under") and str(tmp_path / "fresh") in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "fresh" / "export").exists()


@pytest.mark.slow
def test_unreadable_last_falls_back_and_planted_pickles_are_refused(tmp_path, pair_files, monkeypatch) -> None:
    from dpo_lightning.checkpoints import find_resumable_checkpoint

    recipe = shipped_shape(tmp_path, "run", *pair_files)
    assert cli("fit", "--config", recipe, "--trainer.max_epochs", "1").returncode == 0
    folder = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    (folder / ".last.ckpt.partial-999999").write_bytes(b"partial")
    found = find_resumable_checkpoint([tmp_path / "run"])
    assert found.name == "epoch=0-end.ckpt" and not (folder / ".last.ckpt.partial-999999").exists()

    class Planted:
        def __reduce__(self):
            return (print, ("planted code ran",))

    torch.save({"state_dict": {}, "x": Planted()}, folder / "zz-planted.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert find_resumable_checkpoint([tmp_path / "run"]).name == "epoch=0-end.ckpt"  # planted one skipped
    with pytest.raises(ValueError, match="weights_only=True"):
        run(["fit", "--config", recipe, "--ckpt_path", str(folder / "zz-planted.ckpt"), "--weights_only", "false"])


CHANGES = [
    (["--data.init_args.batch_size", "8"], r"data.init_args.batch_size: checkpoint 4, now 8"),
    (["--data.init_args.shuffle_seed", "3"], r"data.init_args.shuffle_seed: checkpoint 0, now 3"),
    # on a CPU the shipped recipe runs each pair as one row and groups batches by its width
    (["--model.init_args.share_prompt", "false"],
     r"share_prompt .*: checkpoint 'prompt \+ both completions', now 'prompt \+ longest completion'"),
    (["--model.init_args.optimizer.init_args.lr", "0.5"],
     r"optimizer: checkpoint -> now: lr 0.01 -> 0.5 \(resume with the same model.init_args.optimizer"),
    (["--trainer.max_epochs", "5"], r"schedule spans 16 optimizer steps, this run 40"),
]


@pytest.mark.slow
def test_resume_with_a_changed_run_setting_is_refused(tmp_path, pair_files) -> None:
    """Batch order, optimizer and schedule are resumed exactly or refused, never mixed."""
    recipe = shipped_shape(tmp_path, "run", *pair_files)
    killed = shipped_shape(tmp_path, "run", *pair_files, faults=[{"class_path": "faults.KillAtStep", "init_args": {"step": 4}}])
    assert cli("fit", "--config", killed).returncode == -signal.SIGKILL
    for change, message in CHANGES:
        with pytest.raises(ValueError, match=message):
            run(["fit", "--config", recipe, "--ckpt_path", "last", *change])
    assert not (tmp_path / "run" / "export").exists()


def test_resume_from_a_checkpoint_saved_after_validation(tmp_path, pair_files) -> None:
    """A checkpoint written at the end of a validation (the module in eval mode) resumes: the
    loss's train/eval mode is no setting of the run."""
    recipe = tiny_recipe(tmp_path, *pair_files, overwrite_export=True)
    recipe["trainer"].update(max_steps=4, val_check_interval=2, enable_checkpointing=True)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    first = run(["fit", "--config", path])
    (ckpt,) = list((tmp_path / "run").rglob("*.ckpt"))
    assert first.trainer.global_step == 4
    resumed = run(["fit", "--config", path, "--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == 4
    for a, b in zip(first.model.policy.parameters(), resumed.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_with_changed_bytes_is_refused_naming_the_record(tmp_path, pair_files) -> None:
    """Zeroed tensor bytes in a checkpoint load without a word through torch.load; the CRC-32 the
    zip archive keeps for each record tells."""
    import struct
    import zipfile

    from dpo_lightning.checkpoints import check_checkpoint_file, find_resumable_checkpoint

    recipe = tiny_recipe(tmp_path, *pair_files, overwrite_export=True)
    recipe["trainer"]["enable_checkpointing"] = True
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run(["fit", "--config", path])
    (ckpt,) = list((tmp_path / "run").rglob("*.ckpt"))
    data = bytearray(ckpt.read_bytes())
    with zipfile.ZipFile(ckpt) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)  # the largest tensor
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26: record.header_offset + 30])
    start = record.header_offset + 30 + name_length + extra_length
    data[start: start + 64] = bytes(64)
    ckpt.write_bytes(bytes(data))
    assert torch.load(ckpt, weights_only=True)["state_dict"]  # torch reads it as it is
    with pytest.raises(ValueError, match=rf"is damaged: its record {record.filename} does not match the CRC-32"):
        check_checkpoint_file(ckpt)
    with pytest.raises(ValueError, match=r"--ckpt_path .* is damaged"):
        run(["fit", "--config", path, "--ckpt_path", str(ckpt)])
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        find_resumable_checkpoint([tmp_path / "run"])
