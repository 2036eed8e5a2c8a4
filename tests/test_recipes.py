"""The shipped recipes: every overlay composed with base.yaml (and the standalone dpo.yaml and
quickstart.yaml) fits 2 steps through the CLI; what composition merges; the shipped tiny model;
and the reward-model -> score -> ODPO pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from conftest import RECIPES, ROOT, STANDALONE, _printed, determined_content, print_config, quick, tiny_recipe, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.losses import KTOLoss, ODPOLoss
from dpo_lightning.models import ModelSpec
from dpo_lightning.modules import NoReference
from dpo_lightning.scoring import score_pairs

TINY_MODEL = ROOT / "data" / "tiny-llama"
GPU_ONLY = {"ddp", "fsdp", "deepspeed", "qlora"}  # parsed and checked in test_distributed_recipes.py
OVERLAYS = sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem not in STANDALONE)
MODEL_OVERLAYS = sorted(f"models/{p.stem}" for p in (RECIPES / "models").glob("*.yaml"))  # need the hub: parsed only
SINGLE_DEVICE = sorted(r for r in OVERLAYS if r not in GPU_ONLY) + list(STANDALONE)


#: recipes whose data module samples a whole prompt set before the first step: 16 rows keep the 2-step test short
SAMPLES_ITS_DATA = {"iterative_dpo": ("--data.init_args.max_rows", "16")}


@pytest.mark.parametrize("recipe", SINGLE_DEVICE)
def test_recipe_fits_two_steps(recipe: str, tmp_path: Path) -> None:
    cli = run(quick(recipe, tmp_path, *SAMPLES_ITS_DATA.get(recipe, ())))
    assert cli.trainer.global_step == 2
    weights = "adapter_model.safetensors" if getattr(cli.model, "lora", None) else "model.safetensors"
    assert (tmp_path / "model" / weights).exists()
    loss = getattr(cli.model, "loss", None)  # SFT has none
    if loss is not None and not loss.needs_reference:  # no reference network at all (a reward model has no slot)
        reference = getattr(cli.model, "reference", None)
        assert reference is None or (isinstance(reference, NoReference) and not list(reference.parameters()))


def test_reference_free_losses_build_no_reference(tmp_path: Path) -> None:
    for recipe in ("simpo", "orpo"):
        cli = run(quick(recipe, tmp_path / recipe))
        assert isinstance(cli.model.reference, NoReference) and not list(cli.model.reference.parameters())
        assert not any(name.startswith("reference") for name, _ in cli.model.named_parameters())


def test_reward_model_then_score_then_odpo(tmp_path: Path) -> None:
    rm = run(quick("reward_model", tmp_path / "rm"))
    assert rm.trainer.global_step == 2
    exported = tmp_path / "rm" / "model"
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(exported))
    assert reloaded.config.num_labels == 1
    rows = [json.loads(line) for line in (ROOT / "data/quickstart/val.jsonl").read_text().splitlines()[:6]]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    out = score_pairs(str(exported), str(source), str(tmp_path / "scored.jsonl"), batch_size=4)
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == 6 and all({"score_chosen", "score_rejected"} <= r.keys() for r in scored)
    # the scores are the reward model's outputs on the training tokenization
    tok = rm.model.tokenizer
    prompt = tok(rows[0]["prompt"])["input_ids"]
    completion = tok(rows[0]["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        expected = reloaded(input_ids=torch.tensor([prompt + completion])).logits[0, 0].item()
    assert scored[0]["score_chosen"] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(FileExistsError, match="--overwrite"):
        score_pairs(str(exported), str(source), str(out))
    odpo = run(quick("odpo", tmp_path / "odpo", "--data.init_args.train_data", str(out), "--data.init_args.val_data", str(out), "--trainer.max_epochs", "5"))
    assert isinstance(odpo.model.loss, ODPOLoss) and odpo.trainer.global_step == 2


def test_odpo_without_scores_fails_at_setup(tmp_path: Path) -> None:
    source = tmp_path / "noscore.jsonl"
    source.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
    with pytest.raises(ValueError, match=r"\['score_chosen', 'score_rejected'\] missing"):
        run(quick("odpo", tmp_path, "--data.init_args.train_data", str(source), "--data.init_args.val_data", str(source)))


def test_kto_with_paired_data_module_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="UnpairedDataModule"):
        run(quick("kto", tmp_path, "--data.class_path", "dpo_lightning.data.PreferenceDataModule"))
    cli = run(quick("kto", tmp_path / "ok"))
    assert isinstance(cli.model.loss, KTOLoss)



def test_simpo_trl_recipe_is_trls_simpo(tmp_path: Path) -> None:
    """recipes/simpo_trl.yaml, as trained, computes TRL 1.16's ``CPOTrainer`` with
    ``loss_type="simpo"``, ``simpo_gamma=0.5``, ``cpo_alpha=1.0`` (beta 2.0)::

        logits = policy_chosen_logps - policy_rejected_logps      # per-token means for simpo
        gamma_logratios = self.simpo_gamma / self.beta
        logits = logits - gamma_logratios
        losses = (-F.logsigmoid(self.beta * logits) * (1 - self.label_smoothing)
                  - F.logsigmoid(-self.beta * logits) * self.label_smoothing)
        loss = losses.mean() + self.cpo_alpha * policy_nll_loss  # nn.CrossEntropyLoss over chosen tokens
    """
    from dpo_lightning.losses import SequenceLogProbs

    cli = run(quick("simpo_trl", tmp_path))
    assert cli.trainer.global_step == 2 and isinstance(cli.model.reference, NoReference)
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 30, (12,), generator=g)
    policy = SequenceLogProbs(-torch.rand(12, generator=g, dtype=torch.float64) * counts, counts)
    beta, gamma, cpo_alpha = 2.0, 0.5, 1.0
    chosen, rejected = policy.means.chunk(2)
    logits = chosen - rejected - gamma / beta
    nll = -policy.sums[:6].sum() / counts[:6].sum()
    expected = -torch.nn.functional.logsigmoid(beta * logits).mean() + cpo_alpha * nll
    assert cli.model.loss(policy, None, {}).loss.item() == pytest.approx(expected.item(), rel=1e-13)

# -- composition: base.yaml + an overlay ---------------------------------------------------------
MISSING = object()


def leaves(tree, prefix: tuple = ()):
    """``(path, value)`` of every leaf of a nested dict; lists and empty dicts are leaves."""
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaves(value, (*prefix, key))
    else:
        yield prefix, tree


def lookup(tree, path: tuple):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return MISSING
        tree = tree[key]
    return tree


def same(given, parsed) -> bool:
    """A value as an overlay writes it against the parsed one: PyYAML reads ``1e-3`` as a string,
    and a ``class_path`` dict (or a list of them) is compared on the keys it gives."""
    if isinstance(given, dict):
        return isinstance(parsed, dict) and all(same(v, parsed.get(k, MISSING)) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(parsed, list) and len(given) == len(parsed) and all(map(same, given, parsed))
    if isinstance(given, str) and isinstance(parsed, float):
        return float(given) == parsed
    return given == parsed


def under(path: tuple, prefixes) -> bool:
    return any(path[: len(p)] == p for p in prefixes)


def test_every_overlay_names_its_command_and_its_own_output_folders() -> None:
    roots, exports = {}, {}
    for recipe in OVERLAYS + MODEL_OVERLAYS:
        text = (RECIPES / f"{recipe}.yaml").read_text()
        assert f"dpo-lightning fit --config recipes/base.yaml --config recipes/{recipe}.yaml" in text, recipe
        assert "seed_everything" not in (yaml.safe_load(text) or {}), f"{recipe}: an overlay holds only what differs from base.yaml"
    for recipe in OVERLAYS + MODEL_OVERLAYS + list(STANDALONE):
        config = print_config(recipe)
        roots[recipe] = config["trainer"]["default_root_dir"]
        exports[recipe] = config["model"]["init_args"]["export_dir"]
        assert exports[recipe].startswith(roots[recipe] + "/"), recipe
    assert len(set(roots.values())) == len(roots) and len(set(exports.values())) == len(exports)


@pytest.mark.parametrize("recipe", OVERLAYS + MODEL_OVERLAYS)
def test_composed_config_is_base_plus_the_overlay(recipe: str) -> None:
    """base.yaml + overlay, as parsed, holds the overlay's values and base.yaml's everywhere else.

    Where the overlay changes a ``class_path`` (loss, module, data module, strategy, optimizer),
    an init_arg that base.yaml writes and the new class also takes keeps base.yaml's value (even
    over the new class's own default); one the new class does not take is dropped (nothing stale
    leaks); everything else is the new class's default.
    """
    base = print_config("base")
    base_written = dict(leaves(yaml.safe_load((RECIPES / "base.yaml").read_text())))
    composed = print_config(recipe)
    written = dict(leaves(yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())))
    changed = [p[:-1] for p, v in written.items() if p[-1] == "class_path" and lookup(base, p) != v]
    changed += [p for p, _ in leaves(base) if any(len(w) > len(p) and w[: len(p)] == p for w in written)]  # e.g. lora: null -> {...}
    for path, value in written.items():
        assert same(value, lookup(composed, path)), f"{recipe}: {'.'.join(path)} is not the overlay's {value!r}"
    for path, value in leaves(base):
        if under(path, written) or path in changed:
            continue
        got = lookup(composed, path)
        if under(path, changed):  # the overlay switched the class here
            if path in base_written and got is not MISSING:
                assert same(base_written[path], got), f"{recipe}: {'.'.join(path)} = {got!r}, base.yaml writes {value!r}"
            continue
        assert got == value, f"{recipe}: {'.'.join(path)} = {got!r}, base.yaml has {value!r}"
    for path, _ in leaves(composed):  # anything else is a default of a class the overlay chose
        assert lookup(base, path) is not MISSING or under(path, written) or under(path, changed), path


def test_class_path_changes_leak_nothing_and_carry_shared_init_args(tmp_path: Path) -> None:
    ipo = print_config("ipo")["model"]["init_args"]["loss"]
    assert ipo == {"class_path": "dpo_lightning.losses.IPOLoss", "init_args": {
        "beta": 0.1, "length_normalize": True, "divergence": "reverse_kl", "divergence_alpha": 0.5}}
    sft = print_config("sft")
    assert sft["model"]["class_path"] == "dpo_lightning.modules.SFTModule"
    assert "loss" not in sft["model"]["init_args"] and "reference" not in sft["model"]["init_args"]
    assert sft["model"]["init_args"]["scheduler"] is None and sft["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.003
    assert sft["data"]["class_path"] == "dpo_lightning.data.SFTDataModule"
    assert sft["data"]["init_args"]["max_prompt_length"] is None and sft["data"]["init_args"]["max_length"] == 128
    reward = print_config("reward_model")["model"]
    assert reward["class_path"] == "dpo_lightning.modules.RewardModule" and "reference" not in reward["init_args"]
    assert reward["init_args"]["model"]["name_or_path"] == "data/tiny-llama"
    kto = print_config("kto")["data"]
    assert kto["class_path"] == "dpo_lightning.data.UnpairedDataModule" and kto["init_args"]["batch_size"] == 16
    # why robust_dpo.yaml writes label_smoothing: a shared init_arg keeps base.yaml's DPOLoss value
    # (0.0), not RobustDPOLoss's own default (0.1)
    assert print_config("robust_dpo")["model"]["init_args"]["loss"]["init_args"]["label_smoothing"] == 0.1
    bare = write_recipe(tmp_path / "bare.yaml", {"model": {"init_args": {"loss": {"class_path": "dpo_lightning.losses.RobustDPOLoss"}}}})
    loss = yaml.safe_load(_printed("--config", str(RECIPES / "base.yaml"), "--config", bare))["model"]["init_args"]["loss"]
    assert loss["init_args"] == {"beta": 0.1, "label_smoothing": 0.0, "divergence": "reverse_kl", "divergence_alpha": 0.5}


def test_real_model_overlay_parses() -> None:
    config = print_config("models/qwen2.5-0.5b")
    args = config["model"]["init_args"]
    assert args["model"]["name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert args["model"]["config"] is None and args["model"]["tokenizer"] is None
    ModelSpec(**{k: v for k, v in args["model"].items() if v is not None or k in ("name_or_path", "config")}).validate()
    assert config["trainer"]["precision"] == "bf16-mixed" and args["optimizer"]["init_args"]["lr"] == 5e-7
    assert args["loss"]["class_path"] == "dpo_lightning.losses.DPOLoss"  # base.yaml's
    data = config["data"]["init_args"]
    assert data["train_data"] == data["val_data"] == "trl-lib/ultrafeedback_binarized"
    assert (data["train_split"], data["val_split"], data["max_length"], data["max_prompt_length"]) == ("train", "test", 1024, 512)
    PreferenceDataModule(**{k: v for k, v in data.items() if v is not None or k == "tokenizer"})
    # after a loss overlay: that loss on the real model
    stacked = ("--config", str(RECIPES / "base.yaml"), "--config", str(RECIPES / "ipo.yaml"),
               "--config", str(RECIPES / "models" / "qwen2.5-0.5b.yaml"))
    args = yaml.safe_load(_printed(*stacked))["model"]["init_args"]
    assert args["loss"]["class_path"] == "dpo_lightning.losses.IPOLoss"
    assert args["model"]["name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"


# -- the shipped tiny model ------------------------------------------------------------------------
def test_make_tiny_model_rewrites_the_shipped_files(tmp_path: Path) -> None:
    """The script rewrites the shipped weights, tokenizer and config exactly (JSON compared without
    the installed transformers' version stamp: a release must not fail this test)."""
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--output", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    shipped = determined_content(TINY_MODEL)
    assert "model.safetensors" in shipped and "config.json" in shipped
    rewritten = determined_content(out)
    assert sorted(rewritten) == sorted(shipped)
    for name in shipped:
        assert rewritten[name] == shipped[name], name
    assert sum((TINY_MODEL / name).stat().st_size for name in shipped) < 600_000


def test_tiny_model_check_ignores_the_version_stamp_but_not_the_config(tmp_path: Path) -> None:
    copy = tmp_path / "tiny"
    shutil.copytree(TINY_MODEL, copy)
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "99.0.0"
    (copy / "config.json").write_text(json.dumps(config))
    assert determined_content(copy) == determined_content(TINY_MODEL)
    config["hidden_size"] += 1
    (copy / "config.json").write_text(json.dumps(config))
    assert determined_content(copy)["config.json"] != determined_content(TINY_MODEL)["config.json"]


def test_command_line_name_or_path_replaces_the_recipes_config(tmp_path: Path, pair_files, monkeypatch) -> None:
    """A ``config:`` recipe + ``--model.init_args.model.name_or_path data/tiny-llama`` trains the shipped
    model: the recipe's config (hidden_size 32) and tokenizer are dropped."""
    from lightning.pytorch.callbacks import Callback

    from dpo_lightning.cli import DPOLightningCLI

    start = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            start.update({k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()})

    monkeypatch.setattr(DPOLightningCLI, "after_instantiate_classes", lambda self: self.trainer.callbacks.append(AtStart()))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, *pair_files))
    cli = run(["fit", "--config", recipe, "--model.init_args.model.name_or_path", str(TINY_MODEL)])
    assert cli.trainer.global_step == 2
    assert cli.model.policy.config.hidden_size == 64 and len(cli.model.tokenizer) == 512
    shipped = load_file(str(TINY_MODEL / "model.safetensors"))
    assert shipped and all(torch.equal(start[k], w) for k, w in shipped.items())
    trained = cli.model.policy.state_dict()
    assert not all(torch.equal(trained[k], w) for k, w in shipped.items())


def test_shipped_tiny_model_is_the_from_scratch_build() -> None:
    """data/tiny-llama holds the weights the recipes built from `config:` with seed 0."""
    from dpo_lightning.models import load_causal_lm, load_tokenizer

    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": True}
    spec = ModelSpec(config=config, tokenizer=str(ROOT / "data" / "tokenizer"), seed=0)
    built = load_causal_lm(spec, load_tokenizer(spec)).state_dict()
    shipped = load_file(str(TINY_MODEL / "model.safetensors"))
    assert all(torch.equal(built[k], w) for k, w in shipped.items())
    pretrained = load_tokenizer(ModelSpec(name_or_path=str(TINY_MODEL)))
    rows = [json.loads(line) for line in (ROOT / "data/quickstart/val.jsonl").read_text().splitlines()[:4]]
    for row in rows:
        assert pretrained(row["prompt"] + row["chosen"])["input_ids"] == load_tokenizer(spec)(row["prompt"] + row["chosen"])["input_ids"]
