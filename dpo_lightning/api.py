"""One call from data to a trained policy, for Python users: :func:`train`.

    from dpo_lightning import train
    from dpo_lightning.losses import DPOLoss

    run = train("Qwen/Qwen2.5-0.5B-Instruct", "pairs.jsonl", val_data="val.jsonl", loss=DPOLoss(beta=0.1))
    print(run.metrics["val/rewards/accuracy"], run.export_dir)

It builds what a recipe builds (a :class:`~dpo_lightning.modules.PreferenceModule`, the data
module of the loss's batch layout, a Lightning ``Trainer``), makes the one ``connect`` call
between model and data, and fits. The objects stay on the returned :class:`TrainedRun` for
anything further (``run.trainer.validate(run.module, run.datamodule)``); users who want them
from the start build them directly (docs/python.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import TokenizedDataModule
from .data.base import datamodule_class
from .losses import BradleyTerryLoss, DPOLoss, PreferenceLoss
from .models import ModelSpec, ready_tokenizer
from .modules import PreferenceModule

@dataclass
class TrainedRun:
    """What :func:`train` built and ran: the module (policy, reference, loss), the data module,
    the trainer, and where the trained policy was written."""

    module: PreferenceModule
    datamodule: TokenizedDataModule
    trainer: L.Trainer
    export_dir: Path

    @property
    def metrics(self) -> dict[str, float]:
        """The last logged value of each metric (``val/rewards/accuracy``, ``train/loss``...)."""
        return {name: float(value) for name, value in self.trainer.callback_metrics.items()}


def train(
    model: str | os.PathLike | ModelSpec | PreTrainedModel,
    train_data: Any,
    *,
    val_data: Any = None,
    loss: PreferenceLoss | None = None,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    lr: float = 1e-6,
    batch_size: int = 8,
    max_length: int | None = None,
    max_epochs: int = 1,
    output_dir: str | os.PathLike = "outputs/dpo-lightning",
    overwrite: bool = False,
    module_args: dict[str, Any] | None = None,
    data_args: dict[str, Any] | None = None,
    **trainer_args: Any,
) -> TrainedRun:
    """Train a policy on preference data and export it; returns the :class:`TrainedRun`.

    Args:
        model: a hub id, a folder written by ``save_pretrained``, a :class:`ModelSpec`, or a
            loaded ``PreTrainedModel`` (saved to ``<output_dir>/start_model`` first, so that the
            reference, the checkpoints' run fingerprint and ``reference.json`` can name it).
        train_data / val_data: what a recipe's ``train_data`` takes: a file or folder path
            (JSONL, JSON, Parquet, CSV), a hub dataset id, or a ``datasets.Dataset`` /
            ``DatasetDict`` / list of rows, in any layout docs/data.md lists.
        loss: a policy loss object (``DPOLoss(beta=0.1)`` when ``None``); its batch layout picks
            the data module that produces it (pairs; unpaired rows for KTO / BCO; triples for TPO).
        tokenizer: a tokenizer id or folder, or a loaded tokenizer, when not the model's own.
        lr: AdamW's learning rate (TRL's DPOConfig default, 1e-6).
        batch_size / max_length: pairs per batch and the token limit of prompt + completion
            (TRL's defaults, 8 and 1024; ``None``: 1024, or the model's position limit when shorter).
        max_epochs: passes over ``train_data``.
        output_dir: the trainer's folder (CSV logs, checkpoints); the policy is exported to
            ``<output_dir>/policy``, which must not exist unless ``overwrite``.
        module_args / data_args: further ``PreferenceModule`` / data module arguments
            (``{"lora": LoraSpec()}``, ``{"val_fraction": 0.1}``...).
        **trainer_args: further ``lightning.Trainer`` arguments (``precision="bf16-mixed"``,
            ``max_steps=100``...).
    """
    loss = loss if loss is not None else DPOLoss()
    if isinstance(loss, BradleyTerryLoss) or not isinstance(loss, PreferenceLoss):
        raise TypeError(
            f"train(loss=...) takes a policy loss (a PreferenceLoss such as DPOLoss), got {type(loss).__name__}; "
            "a reward model trains with dpo_lightning.modules.RewardModule (docs/losses.md, 'Reward model')"
        )
    data_class = datamodule_class(loss.batch_layout)
    if data_class is None:
        raise ValueError(f"train() has no data module for {type(loss).__name__}'s batch layout "
                         f"{loss.batch_layout.value!r}")
    output = Path(output_dir)
    if isinstance(model, PreTrainedModel):
        model, tokenizer = save_start_model(model, tokenizer, output / "start_model")
    spec = model_spec(model, tokenizer)
    module = PreferenceModule(
        model=spec, loss=loss, optimizer=partial(torch.optim.AdamW, lr=lr),
        export_dir=str(output / "policy"), overwrite_export=overwrite, **(module_args or {}),
    )
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        module.tokenizer = ready_tokenizer(tokenizer, type(tokenizer).__name__)
    requirements = module.data_requirements
    if max_length is None:
        max_length = min(1024, requirements.max_positions or 1024)
    datamodule = data_class(
        train_data=train_data, val_data=val_data, batch_size=batch_size, max_length=max_length, **(data_args or {}),
    )
    datamodule.connect(module.tokenizer, requirements)
    trainer_args = {"max_epochs": max_epochs, "default_root_dir": str(output),
                    "logger": CSVLogger(str(output), name="logs"), "num_sanity_val_steps": 0, **trainer_args}
    trainer = L.Trainer(**trainer_args)
    trainer.fit(module, datamodule)
    return TrainedRun(module, datamodule, trainer, output / "policy")


def save_start_model(
    model: PreTrainedModel, tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None, folder: Path,
) -> tuple[str, str | os.PathLike | PreTrainedTokenizerBase]:
    """Save a loaded model (safetensors) to ``folder`` and return ``(folder, tokenizer)``; the
    tokenizer defaults to the one the model was loaded from (``config._name_or_path``); a
    tokenizer object is saved beside the model, which is then loaded with it."""
    if tokenizer is None:
        tokenizer = getattr(model.config, "_name_or_path", "") or None
        if tokenizer is None:
            raise ValueError("train(model=<a loaded model>) needs tokenizer=: the model does not say where it was loaded from")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if isinstance(tokenizer, PreTrainedTokenizerBase):  # the folder is the module's model: its tokenizer beside it
        tokenizer.save_pretrained(folder)
    return str(folder), tokenizer


def model_spec(model: str | os.PathLike | ModelSpec, tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None) -> ModelSpec:
    """``model`` as a :class:`ModelSpec` (a path or hub id becomes ``name_or_path``); a tokenizer
    given by name becomes its ``tokenizer``."""
    if isinstance(model, ModelSpec):
        spec = model
    elif isinstance(model, (str, os.PathLike)):
        spec = ModelSpec(name_or_path=os.fspath(model))
    else:
        raise TypeError(
            f"train(model=...) takes a hub id, a folder, a ModelSpec or a PreTrainedModel, got {type(model).__name__}"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        spec.tokenizer = os.fspath(tokenizer)
    return spec
