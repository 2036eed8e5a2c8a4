"""The `dpo-lightning` CLI end to end on a tiny model: fit, validate, print_config, reference path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ROOT, tiny_recipe, tiny_spec, write_recipe
from dpo_lightning.cli import run as main
from dpo_lightning.models import load_causal_lm, load_tokenizer


def test_fit_two_steps_freezes_reference_and_keeps_it_out_of_checkpoints(tmp_path, pair_files) -> None:
    constant = {"class_path": "dpo_lightning.optim.WarmupDecayLR", "init_args": {"warmup": 0, "decay": "constant"}}
    recipe = tiny_recipe(tmp_path, *pair_files, scheduler=constant)  # a schedule that can be extended
    recipe["trainer"]["enable_checkpointing"] = True
    cli = main(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    module = cli.model
    assert cli.trainer.global_step == 2
    initial = load_causal_lm(tiny_spec(), module.tokenizer)
    for (name, ref), (_, init) in zip(module.reference.named_parameters(), initial.named_parameters()):
        assert torch.equal(ref, init), name
        assert not ref.requires_grad
    moved = any(not torch.equal(p, q) for p, q in zip(module.policy.parameters(), initial.parameters()))
    assert moved, "the policy did not train"
    assert not module.reference.training
    optimizer_params = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimizer_params & {id(p) for p in module.reference.parameters()}
    ckpts = list((tmp_path / "run").rglob("*.ckpt"))
    assert ckpts
    state = torch.load(ckpts[0], map_location="cpu", weights_only=True)["state_dict"]
    assert state and not [k for k in state if k.startswith("reference.")]
    assert any(k.startswith("policy.") for k in state)
    # resume builds the reference from the recipe and loads the policy
    resumed = tiny_recipe(tmp_path, *pair_files, scheduler=constant)
    resumed["trainer"]["max_steps"] = 3
    resumed["model"]["init_args"]["overwrite_export"] = True
    cli2 = main(["fit", "--config", write_recipe(tmp_path / "r2.yaml", resumed), "--ckpt_path", str(ckpts[0])])
    assert cli2.trainer.global_step == 3
    for ref, init in zip(cli2.model.reference.parameters(), initial.parameters()):
        assert torch.equal(ref, init)


def test_export_reloads_with_identical_logits(tmp_path, pair_files) -> None:
    cli = main(["fit", "--config", write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, *pair_files))])
    export = tmp_path / "export"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    policy = cli.model.policy.eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 2]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=0, atol=0)
    weights = load_file(str(export / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_existing_export_dir_is_not_overwritten_unless_asked(tmp_path, pair_files) -> None:
    (tmp_path / "export").mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, *pair_files))
    with pytest.raises(FileExistsError, match="overwrite_export: true"):
        main(["fit", "--config", recipe])


def test_separate_reference_by_path(tmp_path, pair_files) -> None:
    tokenizer = load_tokenizer(tiny_spec())
    other = load_causal_lm(tiny_spec(seed=5), tokenizer)
    other.save_pretrained(tmp_path / "ref")
    tokenizer.save_pretrained(tmp_path / "ref")
    recipe = tiny_recipe(tmp_path, *pair_files, reference={"model": {"name_or_path": str(tmp_path / "ref")}})
    cli = main(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    for ref, saved in zip(cli.model.reference.parameters(), other.parameters()):
        assert torch.equal(ref, saved)
    assert cli.trainer.global_step == 2


def test_validate_subcommand_and_accuracy_summary(tmp_path, pair_files, capsys) -> None:
    recipe = tiny_recipe(tmp_path, *pair_files)
    recipe["trainer"]["num_sanity_val_steps"] = -1
    recipe["trainer"]["limit_val_batches"] = 1.0
    recipe["trainer"]["val_check_interval"] = 2
    fitted = main(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    out = capsys.readouterr().out
    assert "val/rewards/accuracy: 0.00 -> " in out  # policy == reference before training: all ties
    # the printed label is the key it is logged under (a ModelCheckpoint monitor, a metrics.csv column)
    assert "val/rewards/accuracy" in fitted.trainer.callback_metrics
    export = recipe["model"]["init_args"].pop("export_dir")
    # the exported policy against the reference recorded beside it: fit's last validation again
    cli = main(["validate", "--config", write_recipe(tmp_path / "v.yaml", recipe),
                "--model.init_args.model.name_or_path", export])
    assert len(cli.model.validation_history) == 1
    assert cli.model.validation_history[-1]["rewards/accuracy"] == fitted.model.validation_history[-1]["rewards/accuracy"]
    assert cli.model.validation_history[-1]["loss"] == pytest.approx(float(fitted.model.validation_history[-1]["loss"]), abs=1e-6)


def test_print_config_round_trips(tmp_path, pair_files) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, *pair_files))
    cmd = [sys.executable, "-m", "dpo_lightning.cli", "fit", "--config"]
    first = subprocess.run(cmd + [recipe, "--print_config"], capture_output=True, text=True, check=True).stdout
    (tmp_path / "printed.yaml").write_text(first)
    second = subprocess.run(cmd + [str(tmp_path / "printed.yaml"), "--print_config"], capture_output=True,
                            text=True, check=True).stdout
    assert first == second
    parsed = yaml.safe_load(first)
    assert parsed["model"]["init_args"]["loss"]["class_path"] == "dpo_lightning.losses.DPOLoss"
    assert parsed["model"]["init_args"]["loss"]["init_args"]["beta"] == 0.1


def test_console_script_is_installed() -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "dpo-lightning"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "fit" in out.stdout


def test_data_report_is_logged_as_hyperparameters(tmp_path, pair_files) -> None:
    recipe = tiny_recipe(tmp_path, *pair_files)
    recipe["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}}
    main(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    (hparams,) = list((tmp_path / "logs").rglob("hparams.yaml"))
    logged = yaml.safe_load(hparams.read_text())
    assert logged["data/train/rows_read"] == 32 and logged["data/train/rows_kept"] == 32
    assert logged["data/val/rows_read"] == 16
    assert logged["data/train/prompt_tokens/max"] >= logged["data/train/prompt_tokens/min"] > 0


def test_a_recipe_key_written_twice_is_refused(tmp_path, pair_files) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, *pair_files))
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  init_args:\n    optimizer:\n      init_args:\n        lr: 0.1\n        lr: 0.2\n")
    with pytest.raises(ValueError, match=r"recipe key 'lr' is written twice in one mapping \(lines 5 and 6\)"):
        main(["fit", "--config", recipe, "--config", str(twice)])


def test_console_parse_errors_are_one_line_naming_the_key(tmp_path) -> None:
    (tmp_path / "broken_loss.py").write_text("import a_dependency_that_is_missing\n")
    env = dict(__import__("os").environ, PYTHONPATH=str(tmp_path))
    for args, expected in (
        (["--model.init_args.loss", "broken_loss.MyLoss"],
         "error: model.init_args.loss: 'broken_loss.MyLoss': No module named 'a_dependency_that_is_missing'"),
        (["--trainer.max_epochs", "abc"], "error: trainer.max_epochs: Expected a <class 'int'> (Given value: abc)"),
    ):
        out = subprocess.run([sys.executable, "-m", "dpo_lightning.cli", "fit", "--config", "recipes/dpo.yaml", *args],
                             capture_output=True, text=True, cwd=ROOT, env=env)
        assert out.returncode == 2
        assert out.stderr.strip().splitlines()[-1].startswith(expected), out.stderr[-1500:]
        assert "usage:" not in out.stderr and "Traceback" not in out.stderr


def test_errors_raised_while_building_a_class_end_in_their_own_message(tmp_path) -> None:
    for args, expected in (
        (["--trainer.accumulate_grad_batches", "0"], "error: trainer.accumulate_grad_batches must be >= 1, got 0"),
        (["--model.init_args.optimizer.init_args.lr", "-1"], "error: Invalid learning rate: -1"),
    ):
        out = subprocess.run([sys.executable, "-m", "dpo_lightning.cli", "fit", "--config", "recipes/dpo.yaml", *args],
                             capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 1
        assert out.stderr.strip().splitlines()[-1].startswith(expected), out.stderr[-1500:]
        assert "Traceback" not in out.stderr and "Union subtypes" not in out.stderr
