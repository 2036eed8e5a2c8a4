"""``PreferenceModule``: a policy, a frozen reference and a pluggable preference loss."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor

from ..export import check_export_target, save_pretrained_atomic
from ..losses import DPOLoss, LossOutput, PreferenceLoss, SequenceLogProbs
from ..metrics import PreferenceMetrics
from ..models import ModelSpec, freeze, load_causal_lm, load_tokenizer
from ..optim import WarmupDecayLR
from .logprobs import model_logprobs

REFERENCE_PREFIX = "reference."
# The frozen reference is in eval mode on purpose; Lightning's generic warning about it is noise.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


class PreferenceModule(L.LightningModule):
    """Train a causal LM policy on preference pairs with any :class:`PreferenceLoss`.

    The reference model is built only when ``loss.needs_reference``: a frozen copy of the
    initial policy by default, or the model at ``reference_model``. It stays in eval mode,
    requires no grad, is not in the optimizer, and is left out of checkpoints (it is rebuilt
    from the recipe on resume).

    Args:
        model: where the policy comes from (hub id / folder, or a config to build).
        loss: the preference loss; default ``DPOLoss(beta=0.1)``.
        reference_model: a separate reference; ``None`` copies the initial policy.
        optimizer: optimizer factory; default ``AdamW(lr=1e-6, weight_decay=0)``.
        scheduler: lr-scheduler factory; default :class:`WarmupDecayLR` (10% warmup, linear
            decay), stepped every optimizer step.
        export_dir: after fit, save the policy and tokenizer here with ``save_pretrained``.
        overwrite_export: allow replacing an existing ``export_dir``.
        gradient_checkpointing: recompute activations in backward to save memory.
    """

    def __init__(
        self,
        model: ModelSpec,
        loss: PreferenceLoss | None = None,
        reference_model: ModelSpec | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
        overwrite_export: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler", "export_dir", "overwrite_export"])
        self.loss = loss if loss is not None else DPOLoss()
        self.model_spec = model
        self.tokenizer = load_tokenizer(model)
        self.policy = load_causal_lm(model, self.tokenizer)
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.reference = self.build_reference(reference_model) if self.loss.needs_reference else None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.export_dir = export_dir
        self.overwrite_export = overwrite_export
        self.train_metrics = PreferenceMetrics(paired=self.loss.paired)
        self.val_metrics = PreferenceMetrics(paired=self.loss.paired)
        self.validation_history: list[dict[str, Any]] = []

    # -- models ---------------------------------------------------------------------------
    def build_reference(self, spec: ModelSpec | None) -> torch.nn.Module:
        """Frozen reference: a copy of the initial policy, or loaded from ``spec``."""
        if spec is None:
            reference = copy.deepcopy(self.policy)
        else:
            spec.validate("model.reference_model")
            reference = load_causal_lm(spec, self.tokenizer)
            if reference.config.vocab_size != self.policy.config.vocab_size:
                raise ValueError(
                    f"reference_model vocab size {reference.config.vocab_size} != policy's "
                    f"{self.policy.config.vocab_size}; both must share the tokenizer"
                )
        return freeze(reference)

    def train(self, mode: bool = True) -> PreferenceModule:
        """Switch the policy's mode; the reference always stays in eval mode."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def reference_logprobs(self, batch: dict[str, Tensor]) -> SequenceLogProbs | None:
        """``(2B,)`` reference log-probs, or ``None`` when the loss needs no reference."""
        if not self.loss.needs_reference:
            return None
        if "reference_sums" in batch:
            return SequenceLogProbs(batch["reference_sums"], batch["reference_counts"])
        with torch.no_grad():
            return model_logprobs(self.reference, batch)

    # -- steps ----------------------------------------------------------------------------
    def shared_step(self, batch: dict[str, Tensor], metrics: PreferenceMetrics) -> tuple[Tensor, LossOutput]:
        policy = model_logprobs(self.policy, batch)
        reference = self.reference_logprobs(batch)
        out = self.loss(policy, reference, batch)
        chosen_logps = out.chosen_logps if out.chosen_logps is not None else policy.chosen.detach()
        rejected_logps = out.rejected_logps if out.rejected_logps is not None else policy.rejected.detach()
        metrics.update(out.loss, out.chosen_rewards, out.rejected_rewards, chosen_logps, rejected_logps, out.metrics)
        return out.loss, out

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, out = self.shared_step(batch, self.train_metrics)
        batch_size = batch["row_id"].numel()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        if out.chosen_rewards.shape == out.rejected_rewards.shape:
            accuracy = (out.chosen_rewards > out.rejected_rewards).float().mean()
            self.log("train/rewards/accuracy_step", accuracy, prog_bar=True, batch_size=batch_size)
        return loss

    def on_train_epoch_end(self) -> None:
        values = self.train_metrics.compute()
        self.log_dict({f"train/{k}": v for k, v in values.items() if k != "loss"} | {"train/loss_epoch": values["loss"]})
        self.train_metrics.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.shared_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict({f"val/{k}": v for k, v in values.items()}, prog_bar=False)
        self.validation_history.append(
            {"step": self.global_step, "sanity_check": bool(self.trainer.sanity_checking), **values}
        )

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            scheduler = WarmupDecayLR(optimizer)
        else:
            scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupDecayLR) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: never store the reference --------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(REFERENCE_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference is not None:
            state = checkpoint["state_dict"]
            for key, value in self.reference.state_dict(prefix=REFERENCE_PREFIX).items():
                state.setdefault(key, value)

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
        """Save the policy and tokenizer (safetensors) so ``from_pretrained(path)`` loads them."""
        target = save_pretrained_atomic(self.policy, self.tokenizer, path, overwrite=self.overwrite_export)
        rank_zero_info(f"exported policy and tokenizer to {target.resolve()}")


