"""``RewardModule``: a scalar reward model trained with the Bradley-Terry loss."""

from __future__ import annotations

import functools
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from ..contract import DataRequirements
from ..losses import BradleyTerryLoss, mean_rows
from ..metrics import PreferenceMetrics
from ..models import ModelSpec, load_reward_model, load_tokenizer, set_dropout
from .base import AlignmentModule, batch_values


class RewardModule(AlignmentModule):
    """Train ``AutoModelForSequenceClassification(num_labels=1)`` on preference pairs.

    The reward of a sequence is the head's output at its last non-padding token (the EOS
    that ends every completion). Logs ``rewards/accuracy`` (strict ``r_w > r_l``),
    ``rewards/margins`` and the mean rewards with the same metric classes as DPO. The
    exported folder loads with ``AutoModelForSequenceClassification.from_pretrained`` and is
    what ``dpo-lightning-score`` reads.

    Args:
        model: base model (hub id / folder, or a config); a causal-LM checkpoint gets a new head.
        loss: default ``BradleyTerryLoss()``.
        optimizer, scheduler, export_dir, overwrite_export, on_nonfinite: see :class:`AlignmentModule`.
        disable_dropout: switch every dropout off (default True, as TRL's reward trainer).
    """

    def __init__(
        self,
        model: ModelSpec,
        loss: BradleyTerryLoss | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
        overwrite_export: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        disable_dropout: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler", "export_dir", "overwrite_export"])
        self.loss = loss if loss is not None else BradleyTerryLoss()
        self.tokenizer = load_tokenizer(model)
        self.reward_model = set_dropout(load_reward_model(model, self.tokenizer), disable_dropout)
        self.model_spec = model
        self.init_training(
            optimizer, scheduler, export_dir, overwrite_export, on_nonfinite,
            metrics=functools.partial(PreferenceMetrics, logps=False),  # a reward model has no log-probs
        )

    @property
    def data_requirements(self) -> DataRequirements:
        """Pairs, with ``margin`` when the loss uses it, and the model's position limit."""
        return self.loss.data_requirements.with_model_limit(self.reward_model)

    def trained_model(self) -> torch.nn.Module:
        return self.reward_model

    def objective(self) -> BradleyTerryLoss:
        return self.loss

    def summary_metrics(self) -> dict[str, str]:
        """Held-out accuracy of the reward model on pairs (``r_w > r_l``)."""
        return {"rewards/accuracy": "val/rewards/accuracy"}

    def rewards(self, batch: dict[str, Tensor]) -> Tensor:
        """``(N,)`` scalar rewards for ``input_ids`` ``(N, T)``."""
        out = self.reward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits[:, 0].float()

    def step(self, batch: dict[str, Tensor], metrics: PreferenceMetrics) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.loss(self.rewards(batch), batch)
        if self.training:  # a mean over pairs: under DDP weighed by this process's share of them
            self.count_batch(mean_rows(out, paired=True))
        metrics.update(out.loss, out.chosen_rewards, out.rejected_rewards)
        return out.loss, batch_values(out.chosen_rewards, out.rejected_rewards)
