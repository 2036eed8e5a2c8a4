"""``dpo_lightning.train``: the one-call Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
    with pytest.raises(TypeError, match=r"PreTrainedModel, got object"):
        train(object(), "unused.jsonl", output_dir=tmp_path)


def test_a_loaded_model_object_trains_from_its_saved_copy(tmp_path: Path, pair_files) -> None:
    from safetensors.torch import load_file

    from dpo_lightning.models import load_causal_lm

    spec = ModelSpec(name_or_path=TINY)
    model = load_causal_lm(spec, load_tokenizer(spec))
    run = train(model, pair_files[0], output_dir=tmp_path, batch_size=4, **QUICK)
    start = load_file(str(tmp_path / "start_model" / "model.safetensors"))
    assert start and all(torch.equal(model.state_dict()[k], v) for k, v in start.items())
    assert run.module.model_spec.name_or_path == str(tmp_path / "start_model") and run.trainer.global_step == 2
    recorded = json.loads((tmp_path / "policy" / "reference.json").read_text())["reference_model"]
    assert recorded["name_or_path"] == str((tmp_path / "start_model").resolve())


def test_a_loaded_model_with_a_tokenizer_object_trains(tmp_path: Path, pair_files) -> None:
    """Both given as objects (found by a new user: the module looked for a tokenizer in the saved
    start model, which had none): the tokenizer is saved beside the model and loaded with it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(TINY), AutoTokenizer.from_pretrained(TINY)
    run = train(model, pair_files[0], tokenizer=tokenizer, output_dir=tmp_path, batch_size=4, **QUICK)
    assert (tmp_path / "start_model" / "tokenizer.json").is_file() and run.trainer.global_step == 2
    assert run.module.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_a_triple_loss_gets_the_data_module_that_produces_triples(tmp_path: Path) -> None:
    from dpo_lightning.data import TripleDataModule
    from dpo_lightning.losses import TPOLoss

    run = train(TINY, str(ROOT / "data" / "triples" / "train.jsonl"), loss=TPOLoss(), output_dir=tmp_path,
                batch_size=2, **QUICK)
    assert isinstance(run.datamodule, TripleDataModule) and run.trainer.global_step == 2


def test_a_standalone_data_module_takes_a_tokenizer_object(pair_files) -> None:
    tokenizer = load_tokenizer(ModelSpec(name_or_path=TINY))
    tokenizer.pad_token = None
    data = PreferenceDataModule(train_data=pair_files[0], tokenizer=tokenizer, max_length=64, batch_size=4)
    data.setup("fit")
    assert data.tokenizer is tokenizer and tokenizer.pad_token == tokenizer.eos_token
    assert data.reports["train"].rows_kept == 32
