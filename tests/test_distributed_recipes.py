"""Multi-GPU and QLoRA recipes (overlays on base.yaml): they parse, and what can be built on CPU is built."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry

from conftest import print_config
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.lora import LoraSpec
from dpo_lightning.losses import DPOLoss
from dpo_lightning.models import ModelSpec, quantization_config


def model_args(config: dict) -> dict:
    return config["model"]["init_args"]


@pytest.mark.parametrize("recipe", ["ddp", "fsdp", "deepspeed", "qlora", "lora"])
def test_recipe_parses_and_its_parts_build_on_cpu(recipe: str) -> None:
    config = print_config(recipe)
    args = model_args(config)
    spec = ModelSpec(**{k: v for k, v in args["model"].items() if v is not None or k in ("name_or_path", "config")})
    spec.validate()
    loss = args["loss"]
    assert loss["class_path"] == "dpo_lightning.losses.DPOLoss" and DPOLoss(**loss["init_args"]).beta == 0.1
    data = config["data"]["init_args"]
    PreferenceDataModule(**{k: v for k, v in data.items() if v is not None or k == "tokenizer"})
    if args.get("lora"):
        LoraSpec(**args["lora"]).validate()


def test_ddp_recipe_settings() -> None:
    trainer = print_config("ddp")["trainer"]
    assert trainer["strategy"] == "ddp" and trainer["devices"] == 8 and trainer["num_nodes"] == 1


def test_fsdp_strategy_instantiates_and_shards_decoder_layers() -> None:
    trainer = print_config("fsdp")["trainer"]
    init = trainer["strategy"]["init_args"]
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert init["auto_wrap_policy"] == ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]
    strategy = FSDPStrategy(
        sharding_strategy=init["sharding_strategy"], state_dict_type=init["state_dict_type"],
        auto_wrap_policy={LlamaDecoderLayer}, activation_checkpointing_policy={LlamaDecoderLayer},
    )
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy.kwargs["use_orig_params"] is True  # frozen reference parameters need it
    assert trainer["precision"] == "bf16-true"


def test_deepspeed_strategies_are_registered() -> None:
    assert print_config("deepspeed")["trainer"]["strategy"] == "deepspeed_stage_2"
    assert "deepspeed_stage_2" in StrategyRegistry and "deepspeed_stage_3" in StrategyRegistry
    assert model_args(print_config("deepspeed"))["reference"]["precompute"] is True


def test_qlora_asks_for_nf4_double_quantization() -> None:
    args = model_args(print_config("qlora"))
    spec = ModelSpec(**{k: v for k, v in args["model"].items() if v is not None or k in ("name_or_path", "config")})
    q = quantization_config(spec)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert args["optimizer"]["class_path"] == "bitsandbytes.optim.PagedAdamW8bit"
    with pytest.raises(ValueError, match="needs name_or_path"):
        ModelSpec(config={"model_type": "llama"}, tokenizer="t", load_in_4bit=True).validate()


@pytest.mark.parametrize("recipe", ["ddp", "fsdp", "deepspeed", "qlora"])
def test_gpu_overlays_replace_what_base_sets_for_the_tiny_model(recipe: str) -> None:
    config = print_config(recipe)
    args, data = model_args(config), config["data"]["init_args"]
    assert args["model"]["name_or_path"] != "data/tiny-llama" and args["model"]["dtype"] == "bfloat16"
    assert args["optimizer"]["init_args"]["lr"] <= 5e-6 and args["overwrite_export"] is False
    assert config["trainer"]["accelerator"] == "gpu" and config["trainer"]["precision"].startswith("bf16")
    assert "quickstart" not in str(data["train_data"]) and "quickstart" not in str(data["val_data"])
    assert (data["val_data"] is None) == (data["val_fraction"] is not None)
    assert data["max_length"] >= 1024 and data["max_prompt_length"] in (None, data["max_length"] // 2)
