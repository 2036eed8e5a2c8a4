"""``SFTModule``: supervised fine-tuning (token-mean NLL on completion tokens)."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ..contract import BatchLayout, DataRequirements
from ..models import ModelSpec, load_causal_lm, load_tokenizer, set_dropout
from .base import AlignmentModule
from .logprobs import LogProbMode, LogProbSelector


class SFTMetrics(nn.Module):
    """Token-weighted mean NLL (``loss``); the same update / compute / reset API as
    :class:`~dpo_lightning.metrics.PreferenceMetrics`."""

    def __init__(self) -> None:
        super().__init__()
        self.nll = MeanMetric()

    def update(self, nll_per_token: Tensor, tokens: Tensor) -> None:
        self.nll.update(nll_per_token.detach().float(), weight=tokens.float())

    def compute(self) -> dict[str, float]:
        value = float(self.nll.compute())
        return {"loss": value, "perplexity": float(torch.exp(torch.tensor(value)))}

    def reset(self) -> None:
        self.nll.reset()


class SFTModule(AlignmentModule):
    """Fine-tune a causal LM on prompt / completion rows; prompt and padding are not scored.

    ``L = -sum(log pi(y_t | x, y_<t)) / (number of completion tokens in the batch)``. Under DDP
    the batch is the global one: each rank's token mean is weighed by its share of the global
    tokens (:meth:`~.base.AlignmentModule.global_batch_share`), so the gradient DDP averages is
    the global token mean's, as in one process on the same global batch (not the mean of each
    rank's token mean). Micro-batches of gradient accumulation are still each divided by their
    own count. The per-step ``train/loss`` is rank 0's token mean under DDP; ``train_epoch/loss``
    and ``val/loss`` are exact token means over every rank. Pairs with
    :class:`~dpo_lightning.data.SFTDataModule`; the export is the reference policy of a later
    preference run (``reference.model`` / ``model.name_or_path``).

    Args:
        model: hub id / folder, or a config to build.
        optimizer, scheduler, export_dir, overwrite_export, on_nonfinite: see :class:`AlignmentModule`.
        disable_dropout: switch every dropout off; default False (SFT trains with the model's
            dropout, whether it is loaded or built).
        logprobs / logprob_chunk_size: the log-prob path, as for
            :class:`~dpo_lightning.modules.PreferenceModule` (:class:`~.logprobs.LogProbSelector`).
    """

    def __init__(
        self,
        model: ModelSpec,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
        overwrite_export: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        logprobs: LogProbMode = "auto",
        logprob_chunk_size: int | Literal["auto"] = "auto",
        disable_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "export_dir", "overwrite_export"])
        self.model_spec = model
        self.tokenizer = load_tokenizer(model)
        self.policy = set_dropout(load_causal_lm(model, self.tokenizer), disable_dropout)
        self.logprob_selector = LogProbSelector(logprobs, logprob_chunk_size)
        self.logprob_selector.check(self.policy, pairwise=False)
        self.init_training(optimizer, scheduler, export_dir, overwrite_export, on_nonfinite, metrics=SFTMetrics)

    @property
    def data_requirements(self) -> DataRequirements:
        """One completion per row (:class:`~dpo_lightning.data.SFTDataModule`), within the
        model's position limit."""
        return DataRequirements(BatchLayout.COMPLETIONS).with_model_limit(self.policy)

    def trained_model(self) -> torch.nn.Module:
        return self.policy

    def step(self, batch: dict[str, Tensor], metrics: SFTMetrics) -> tuple[Tensor, dict[str, Tensor]]:
        trainer = self.attached_trainer
        strategy = trainer.strategy if trainer is not None else None
        logps = self.logprob_selector(self.policy, batch, strategy)
        tokens = logps.counts.sum().clamp(min=1)
        nll = -logps.sums.sum()
        loss = nll / tokens
        metrics.update(loss, tokens)
        if self.training:  # all of it a mean over tokens: under DDP weighed by this process's share of them
            self.count_batch(torch.zeros((), device=loss.device), token_part=loss, tokens=tokens.detach())
        return loss, {}
