"""What a user meets first: a mistyped recipe, flag or path gets one line naming it and the closest accepted
name, never a minute of hub retries; a short run logs a curve and prints before -> after."""

from __future__ import annotations

import sys

import pytest
import yaml

from conftest import ROOT, _printed
from dpo_lightning import cli, models
from dpo_lightning.models import ModelSpec, check_hub_source, load_tokenizer
from dpo_lightning.modules import IterativePreferenceModule, OnlinePreferenceModule, ReferenceUpdate


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
    ("--data.init_args.batch_sise", "did you mean --data.init_args.batch_size?"),
    ("--model.init_args.lossx", "did you mean --model.init_args.loss?"),
    ("--model.init_args.model.name_or_pth", "unrecognized arguments: --model.init_args.model.name_or_pth=3; "
                                            "did you mean --model.init_args.model.name_or_path?"),
    ("--model.init_args.los.init_args.beta", "unrecognized arguments: --model.init_args.los.init_args.beta=3; "
                                             "did you mean --model.init_args.loss.init_args.beta?"),
    ("--modle.init_args.loss.init_args.beta", "did you mean --model.init_args.loss.init_args.beta?"),  # not --mode.*
    ("--trainr.max_steps", "did you mean --trainer.max_steps?"),
])
def test_a_misspelled_flag_gets_the_closest_accepted_name(monkeypatch, capsys, flag: str, hint: str) -> None:
    """The message names the whole option as typed and the whole option meant, also where a
    class's own parser reports it relative to itself (``--los.init_args.beta`` under ``model``)."""
    status, line = console(monkeypatch, capsys, "fit", "--config", "recipes/quickstart.yaml", flag, "3")
    assert status == 2
    assert line.startswith("error: ") and hint in line


@pytest.mark.parametrize(("overlay", "hint"), [
    ({"trainer": {"max_epoch": 2}}, ["Group 'trainer' does not accept option 'max_epoch'; did you mean --trainer.max_epochs?"]),
    ({"model": {"init_args": {"loss": {"init_args": {"bta": 0.2}}}}},
     ["model.init_args.loss: Option 'bta' is not accepted", "did you mean --model.init_args.loss.init_args.beta?"]),
    ({"model": {"init_args": {"model": {"dtyp": "float32"}}}},  # was "did you mean --model.help?"
     ["Group 'model' does not accept option 'dtyp'", "did you mean --model.init_args.model.dtype?"]),
    ({"model": {"init_args": {"init_arg": {"loss": "x"}}}}, ["did you mean --model.init_args.loss?"]),
])
def test_a_misspelled_recipe_key_is_named_with_the_key_meant(monkeypatch, capsys, tmp_path, overlay: dict,
                                                            hint: list[str]) -> None:
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(overlay))
    status, line = console(monkeypatch, capsys, "fit", "--config", "recipes/quickstart.yaml",
                           "--config", str(tmp_path / "typo.yaml"), "--print_config")
    assert status == 2 and all(part in line for part in hint)


def test_a_missing_model_folder_under_fit_is_only_its_own_reason(monkeypatch, capsys) -> None:
    """The class's error reaches the user without jsonargparse's Union report around it (the
    reasons are read line by line, before the message is joined into one)."""
    status, line = console(monkeypatch, capsys, "fit", "--config", "recipes/base.yaml",
                           "--model.init_args.model.name_or_path", "outputs/no-such-model")
    assert status == 1
    assert line == (f"error: model.name_or_path: no folder at 'outputs/no-such-model' (relative paths resolve against "
                    f"the working directory, {ROOT}); give an existing folder written by save_pretrained, or a hub id "
                    "like 'org/name'  [--debug shows the traceback]")


def test_the_summary_of_a_missing_module_without_a_class_path_does_not_fail() -> None:
    assert cli.summarize_parse_error("Parser key \"trainer\":\n  No module named 'nomod'") == \
        "trainer: No module named 'nomod' (is the module on PYTHONPATH?)"


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_an_abbreviated_flag_is_refused_not_read_as_the_option_it_starts(monkeypatch, capsys, subcommand: str) -> None:
    """argparse would take ``--trainer.max_epoch 2`` for ``--trainer.max_epochs 2`` without a word."""
    status, line = console(monkeypatch, capsys, subcommand, "--config", "recipes/quickstart.yaml",
                           "--trainer.max_epoch", "2", "--print_config")
    assert status == 2
    assert line.startswith("error: unrecognized arguments: --trainer.max_epoch 2; did you mean --trainer.max_epochs?")
    assert yaml.safe_load(_printed("--config", str(ROOT / "recipes" / "quickstart.yaml"),
                                   "--trainer.max_epochs", "2"))["trainer"]["max_epochs"] == 2


@pytest.mark.parametrize(("recipe", "flags", "message"), [
    ({"precompute_reference": True}, [],
     "model.init_args.precompute_reference moved into the reference section: write `reference: {precompute: true}`"),
    ({"reference_update": {"alpha": 0.5, "every_n_steps": 2}}, [], "model.init_args.reference_update moved into the "
     "reference section: write `reference: {update: {alpha: 0.5, every_n_steps: 2}}`"),
    ({"reference_cache_dir": "/tmp/cache"}, [],
     "model.init_args.reference_cache_dir moved into the reference section: write `reference: {cache_dir: /tmp/cache}`"),
    ({}, ["--model.init_args.reference_model.name_or_path", "my/sft"],
     "model.init_args.reference_model moved into the reference section: write `reference: {model: {name_or_path: my/sft}}`"),
    ({}, ["--model.init_args.precompute_reference", "false"],
     "model.init_args.precompute_reference moved into the reference section: write `reference: {precompute: false}`"),
])
def test_a_flat_reference_setting_of_earlier_releases_points_to_the_reference_section(
        monkeypatch, capsys, tmp_path, recipe: dict, flags: list[str], message: str) -> None:
    """Recipes written before the ``reference`` section (``precompute_reference: true``) fail at parse
    time with one line that writes the setting, with its value, where it lives now."""
    overlay = tmp_path / "old.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": recipe}}))
    status, line = console(monkeypatch, capsys, "fit", "--config", "recipes/base.yaml", "--config", str(overlay),
                           *flags, "--print_config")
    assert status == 2 and line == f"error: {message}  [--debug shows the whole report]"


def test_the_iterative_recipe_of_earlier_releases_and_python_keywords_are_pointed_to_the_reference_section(
        monkeypatch, capsys) -> None:
    status, line = console(monkeypatch, capsys, "fit", "--config", "recipes/base.yaml", "--config",
                           "recipes/iterative_dpo.yaml", "--model.init_args.reference_reset", "never", "--print_config")
    assert status == 2 and "model.init_args.reference_reset moved into the reference section: write " \
        "`reference: {reset: never}`" in line
    with pytest.raises(TypeError, match=r"^model\.init_args\.precompute_reference moved into the reference section: "
                                        r"write `reference: \{precompute: true\}` \(reference=ReferenceSpec"):
        IterativePreferenceModule(model=ModelSpec(name_or_path="unused"), precompute_reference=True)
    with pytest.raises(TypeError, match=r"reference_update moved .* `reference: \{update: \{alpha: 0.5, "):
        OnlinePreferenceModule(model=ModelSpec(name_or_path="unused"), judge=None,
                               reference_update=ReferenceUpdate(alpha=0.5))


def test_the_reference_section_prints_readably(tmp_path) -> None:
    """``--print_config`` shows the section as one nested block, every field named."""
    overlay = tmp_path / "new.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"reference": {
        "precompute": True, "model": {"name_or_path": "my/sft"}}}}}))
    printed = _printed("--config", str(ROOT / "recipes" / "base.yaml"), "--config", str(overlay))
    section = yaml.safe_load(printed)["model"]["init_args"]["reference"]
    assert list(section) == ["model", "precompute", "cache_dir", "update", "reset", "bema"]
    assert section["precompute"] is True and section["model"]["name_or_path"] == "my/sft" and section["update"] is None
    assert "    reference:\n      model:\n        name_or_path: my/sft\n" in printed


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
    (line,) = [line for line in out.splitlines() if line.startswith("val/rewards/accuracy")]
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
    spelled_out = validate("--model.init_args.reference.model.config", json.dumps(recorded["config"]),
                           "--model.init_args.reference.model.tokenizer", recorded["tokenizer"],
                           "--model.init_args.reference.model.seed", "0")
    assert by_record == spelled_out
    # a reference section without a model gets the recorded one too, its other settings kept
    with_section = validate("--model.init_args.reference.cache_dir", str(tmp_path / "unused"))
    assert by_record == with_section


def test_validate_refuses_a_policy_measured_against_itself(tmp_path, pair_files) -> None:
    from conftest import tiny_recipe, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, *pair_files))
    with pytest.raises(ValueError, match=r"^validate: the reference is a copy of the policy .*reference\.model"):
        cli.run(["validate", "--config", recipe, "--model.init_args.model.name_or_path", str(ROOT / "data" / "tiny-llama")])


def test_evaluate_defaults_to_the_recorded_reference_and_refuses_the_policy_itself(tmp_path, capsys) -> None:
    from dpo_lightning.export import REFERENCE_RECORD, reference_record
    from dpo_lightning.sampling import evaluation_reference

    policy = tmp_path / "policy"
    policy.mkdir()
    with pytest.raises(ValueError, match=r"^--reference: .* records no reference"):
        evaluation_reference(str(policy), None)
    (policy / REFERENCE_RECORD).write_text(reference_record(ModelSpec(name_or_path=str(ROOT / "data" / "tiny-llama"))))
    assert evaluation_reference(str(policy), None).name_or_path == str((ROOT / "data" / "tiny-llama").resolve())
    assert capsys.readouterr().out == (f"reference: {(ROOT / 'data' / 'tiny-llama').resolve()}, as recorded in "
                                       f"{policy / REFERENCE_RECORD}\n")
    assert evaluation_reference(str(policy), "org/base").name_or_path == "org/base"
    with pytest.raises(ValueError, match=r"^--reference is the policy itself"):
        evaluation_reference(str(policy), str(policy) + "/")
