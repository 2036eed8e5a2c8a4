"""Every recipe in recipes/ fits 2 steps through the CLI, and the reward-model -> score -> ODPO pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import ROOT
from dpo_lightning.cli import run
from dpo_lightning.losses import KTOLoss, ODPOLoss
from dpo_lightning.modules import NoReference
from dpo_lightning.scoring import score_pairs

GPU_ONLY = {"ddp", "fsdp", "deepspeed", "qlora"}  # parsed and checked in test_distributed_recipes.py
SINGLE_DEVICE = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml") if p.stem not in GPU_ONLY)


def quick(recipe: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml"),
        "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", str(tmp_path), "--model.init_args.export_dir", str(tmp_path / "model"),
        *extra,
    ]


@pytest.mark.parametrize("recipe", SINGLE_DEVICE)
def test_recipe_fits_two_steps(recipe: str, tmp_path: Path) -> None:
    cli = run(quick(recipe, tmp_path))
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
