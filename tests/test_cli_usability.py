"""What a user meets first: a mistyped recipe, flag or path gets one line naming it and the closest accepted
name, never a minute of hub retries; a short run logs a curve and prints before -> after."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT
from dpo_lightning import cli, models
from dpo_lightning.models import ModelSpec, check_hub_source, load_tokenizer


def console(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the ``dpo-lightning`` entry point in this process: ``(exit status, last stderr line)``."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["dpo-lightning", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_a_missing_recipe_file_is_named_in_one_line(monkeypatch, capsys) -> None:
    status, line = console(monkeypatch, capsys, "fit", "--config", "recipes/dp.yaml")
    assert status == 2
    assert line.startswith(f"error: config: File does not exist: '{ROOT / 'recipes' / 'dp.yaml'}'")
    assert f"resolve against the working directory, {ROOT}" in line


@pytest.mark.parametrize(("flag", "hint"), [
    ("--trainer.max_stepz", "did you mean --trainer.max_steps?"),
    ("--data.init_args.batch_sise", "did you mean 'batch_size'?"),
    ("--model.init_args.lossx", "did you mean 'loss'?"),
    ("--model.init_args.model.name_or_pth", "did you mean 'name_or_path'?"),
])
def test_a_misspelled_flag_gets_the_closest_accepted_name(monkeypatch, capsys, flag: str, hint: str) -> None:
    status, line = console(monkeypatch, capsys, "fit", "--config", "recipes/quickstart.yaml", flag, "3")
    assert status == 2
    assert line.startswith("error: ") and hint in line


def test_a_flag_near_nothing_gets_no_guess(monkeypatch, capsys) -> None:
    status, line = console(monkeypatch, capsys, "fit", "--config", "recipes/quickstart.yaml", "--zzzzqqq", "3")
    assert status == 2 and "unrecognized arguments: --zzzzqqq" in line and "did you mean" not in line


def test_a_mistyped_local_path_fails_at_once_naming_the_nearest_folder(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: pytest.fail("the hub was asked"))
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(ModelSpec(name_or_path="data/tiny-lama"))
    message = str(info.value)
    assert message.startswith("model.name_or_path: no folder at 'data/tiny-lama'")
    assert f"working directory, {ROOT}" in message and "did you mean 'data/tiny-llama'?" in message


def test_an_unreachable_hub_fails_at_once_for_an_uncached_id(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(models, "hub_offline", lambda: False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError) as info:
        check_hub_source("model.name_or_path", "someorg/somemodel", None)
    assert str(info.value).startswith("model.name_or_path: 'someorg/somemodel' is no folder here")
    assert "hub cannot be reached" in str(info.value) and "\n" not in str(info.value)


def test_an_unreachable_hub_reads_a_cached_id_from_the_cache(monkeypatch, tmp_path) -> None:
    snapshot = tmp_path / "models--someorg--somemodel" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--someorg--somemodel" / "refs").mkdir()
    (tmp_path / "models--someorg--somemodel" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(models, "hub_offline", lambda: False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert check_hub_source("model.name_or_path", "someorg/somemodel", None) == {"local_files_only": True}
    assert check_hub_source("model.name_or_path", str(ROOT / "data" / "tiny-llama"), None) == {}


def test_a_run_shorter_than_an_epoch_logs_a_curve_and_prints_before_and_after(tmp_path, monkeypatch, capsys) -> None:
    """The shipped quickstart with max_steps 3 (under an epoch, under log_every_n_steps 10): each
    step is logged, and the summary ends on a validation of the trained policy."""
    import csv

    monkeypatch.chdir(ROOT)
    cli.run(["fit", "--config", "recipes/quickstart.yaml", "--trainer.max_steps", "3",
             "--trainer.default_root_dir", str(tmp_path), "--model.init_args.export_dir", str(tmp_path / "policy"),
             "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("val/reward_accuracy")]
    before, after = line.split(": ")[1].split(" -> ")
    assert before == "0.00" and 0.0 <= float(after) <= 1.0
    (log,) = list(tmp_path.rglob("metrics.csv"))
    rows = list(csv.DictReader(log.open()))
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss")) == [0, 1, 2]
    val_steps = [int(r["step"]) for r in rows if r.get("val/rewards/accuracy")]
    assert max(val_steps) == 3


def test_validate_of_an_exported_policy_measures_it_against_its_recorded_reference(tmp_path, pair_files) -> None:
    import json
    import math

    from conftest import tiny_recipe, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, *pair_files))
    cli.run(["fit", "--config", recipe])
    export = tmp_path / "export"
    recorded = json.loads((export / "reference.json").read_text())["reference_model"]
    assert recorded["config"]["hidden_size"] == 32 and recorded["seed"] == 0
    assert recorded["tokenizer"] == str((ROOT / "data" / "tokenizer").resolve())

    def validate(*extra: str) -> dict:
        validated = cli.run(["validate", "--config", recipe, "--model.init_args.model.name_or_path", str(export), *extra])
        return {k: float(v) for k, v in validated.trainer.callback_metrics.items()}

    by_record = validate()
    assert not math.isclose(by_record["val/loss"], math.log(2), abs_tol=1e-6)
    spelled_out = validate("--model.init_args.reference_model.config", json.dumps(recorded["config"]),
                           "--model.init_args.reference_model.tokenizer", recorded["tokenizer"],
                           "--model.init_args.reference_model.seed", "0")
    assert by_record == spelled_out


def test_validate_refuses_a_policy_measured_against_itself(tmp_path, pair_files) -> None:
    from conftest import tiny_recipe, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, *pair_files))
    with pytest.raises(ValueError, match=r"^validate: the reference is a copy of the policy .*reference_model"):
        cli.run(["validate", "--config", recipe, "--model.init_args.model.name_or_path", str(ROOT / "data" / "tiny-llama")])


def test_evaluate_defaults_to_the_recorded_reference_and_refuses_the_policy_itself(tmp_path) -> None:
    from dpo_lightning.export import REFERENCE_RECORD, reference_record
    from dpo_lightning.sampling import evaluation_reference

    policy = tmp_path / "policy"
    policy.mkdir()
    with pytest.raises(ValueError, match=r"^--reference: .* records no reference"):
        evaluation_reference(str(policy), None)
    (policy / REFERENCE_RECORD).write_text(reference_record(ModelSpec(name_or_path=str(ROOT / "data" / "tiny-llama"))))
    assert evaluation_reference(str(policy), None).name_or_path == str((ROOT / "data" / "tiny-llama").resolve())
    assert evaluation_reference(str(policy), "org/base").name_or_path == "org/base"
    with pytest.raises(ValueError, match=r"^--reference is the policy itself"):
        evaluation_reference(str(policy), str(policy) + "/")
