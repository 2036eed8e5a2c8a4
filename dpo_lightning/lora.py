"""LoRA adapters (peft) on the policy; with them the reference is the same network with its
adapters switched off, so no second copy of the weights is held."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class LoraSpec:
    """The ``lora`` section of a recipe.

    Attributes:
        r: adapter rank. Default 16.
        alpha: scaling numerator (``alpha / r`` multiplies the update). Default 32.
        dropout: dropout on the adapter input. Default 0.05.
        target_modules: module names, or ``"all-linear"`` (every linear layer but the LM head).
        modules_to_save: extra modules trained in full and saved with the adapter.
        separate_reference: keep a separate frozen reference model instead of the adapter-free
            policy (costs a second copy of the base weights). Default False.
        merge_on_export: also write the merged model (base + adapter) to ``<export_dir>/merged``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    separate_reference: bool = False
    merge_on_export: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.init_args.lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.init_args.lora.dropout must be in [0, 1), got {self.dropout}")


def add_adapters(model: torch.nn.Module, spec: LoraSpec, gradient_checkpointing: bool = False) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only they require grad.

    peft is imported here, not at the top: it imports bitsandbytes, which costs a second of
    start-up and a console notice in every run that uses no adapters."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    spec.validate()
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    config = LoraConfig(
        task_type="CAUSAL_LM", r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=spec.target_modules, modules_to_save=spec.modules_to_save, **spec.extra,
    )
    return get_peft_model(model, config)


def save_merged(model: PeftModel, path: Path) -> None:
    """Write base + adapter as one plain model (a copy is merged; ``model`` keeps its adapters)."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(path)
