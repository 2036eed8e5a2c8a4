"""What every training module here shares: optimiser and schedule, metrics per stage,
validation history, and export of the trained model in Hugging Face format."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from transformers import PreTrainedTokenizerBase

from ..export import check_export_target, save_pretrained_atomic
from ..metrics import PreferenceMetrics
from ..optim import WarmupDecayLR


class AlignmentModule(L.LightningModule):
    """Base of :class:`PreferenceModule`, :class:`RewardModule` and :class:`SFTModule`.

    Subclasses set ``self.tokenizer``, implement :meth:`trained_model` (the network that is
    optimised and exported) and :meth:`step` and call :meth:`init_training` in ``__init__``.

    Args (shared by all subclasses):
        optimizer: optimizer factory; default ``AdamW(lr=1e-6, weight_decay=0)``.
        scheduler: lr-scheduler factory; default :class:`WarmupDecayLR` (10% warmup, linear
            decay), stepped every optimizer step.
        export_dir: after fit, ``save_pretrained`` the trained model and tokenizer here.
        overwrite_export: allow replacing an existing ``export_dir``.
    """

    tokenizer: PreTrainedTokenizerBase

    def init_training(
        self,
        optimizer: OptimizerCallable | None,
        scheduler: LRSchedulerCallable | None,
        export_dir: str | None,
        overwrite_export: bool,
        paired_metrics: bool = True,
        logps_metrics: bool = True,
    ) -> None:
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.export_dir = export_dir
        self.overwrite_export = overwrite_export
        self.train_metrics = PreferenceMetrics(paired=paired_metrics, logps=logps_metrics)
        self.val_metrics = PreferenceMetrics(paired=paired_metrics, logps=logps_metrics)
        self.validation_history: list[dict[str, Any]] = []

    def trained_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def step(self, batch: dict[str, torch.Tensor], metrics: PreferenceMetrics) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the loss on ``batch``, update ``metrics``; return the loss and step values to log."""
        raise NotImplementedError

    # -- loops ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, values = self.step(batch, self.train_metrics)
        batch_size = batch["row_id"].numel()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        for name, value in values.items():
            self.log(f"train/{name}_step", value, prog_bar=True, batch_size=batch_size)
        return loss

    def on_train_epoch_end(self) -> None:
        values = self.train_metrics.compute()
        values["loss_epoch"] = values.pop("loss")
        self.log_dict({f"train/{k}": v for k, v in values.items()})
        self.train_metrics.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict({f"val/{k}": v for k, v in values.items()})
        self.validation_history.append(
            {"step": self.global_step, "sanity_check": bool(self.trainer.sanity_checking), **values}
        )

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.trained_model().parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(params)
        scheduler = WarmupDecayLR(optimizer) if self.scheduler_factory is None else self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupDecayLR) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- export ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.export_dir is not None:
            check_export_target(self.export_dir, self.overwrite_export)

    def on_fit_end(self) -> None:
        if self.export_dir is not None:
            self.export(self.export_dir)
            self.trainer.strategy.barrier("export")

    @rank_zero_only
    def export(self, path: str) -> None:
        """Save the trained model and tokenizer (safetensors); ``from_pretrained(path)`` loads them."""
        target = save_pretrained_atomic(self.trained_model(), self.tokenizer, path, overwrite=self.overwrite_export)
        rank_zero_info(f"exported {type(self.trained_model()).__name__} and tokenizer to {target.resolve()}")
