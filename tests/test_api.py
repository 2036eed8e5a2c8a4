"""``dpo_lightning.train``: the one-call Python API."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from dpo_lightning import train
from dpo_lightning.data import PreferenceDataModule, UnpairedDataModule
from dpo_lightning.losses import BradleyTerryLoss, KTOLoss
from dpo_lightning.models import ModelSpec, load_tokenizer

TINY = str(ROOT / "data" / "tiny-llama")
QUICK = {"max_steps": 2, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


def test_a_tokenizer_object_is_used_and_made_able_to_pad(tmp_path: Path, pair_files) -> None:
    tokenizer = load_tokenizer(ModelSpec(name_or_path=TINY))
    tokenizer.pad_token = None
    run = train(TINY, pair_files[0], tokenizer=tokenizer, output_dir=tmp_path, batch_size=4, **QUICK)
    assert run.module.tokenizer is tokenizer and tokenizer.pad_token == tokenizer.eos_token
    assert isinstance(run.datamodule, PreferenceDataModule) and run.trainer.global_step == 2
    assert (tmp_path / "policy" / "tokenizer.json").is_file()
    assert run.metrics["train/loss"] > 0


def test_an_unpaired_loss_gets_the_unpaired_data_module(tmp_path: Path, pair_files) -> None:
    run = train(TINY, pair_files[0], loss=KTOLoss(), output_dir=tmp_path, batch_size=4, **QUICK)
    assert isinstance(run.datamodule, UnpairedDataModule) and run.trainer.global_step == 2


def test_a_reward_loss_or_a_model_object_is_refused_naming_what_to_use(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="RewardModule"):
        train(TINY, "unused.jsonl", loss=BradleyTerryLoss(), output_dir=tmp_path)
    with pytest.raises(TypeError, match=r"save_pretrained\(DIR\)"):
        train(object(), "unused.jsonl", output_dir=tmp_path)
