"""What every training module here shares: optimiser and schedule, metrics per stage,
validation history, and export of the trained model in Hugging Face format."""

from __future__ import annotations

import math
import random as _py_random
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from transformers import PreTrainedTokenizerBase

from ..checkpoints import AtomicCheckpointIO
from ..contract import DataRequirements
from ..data.base import TokenizedDataModule
from ..losses import global_batch_loss
from ..export import REFERENCE_RECORD, alias_tied_weights, check_export_target, reference_record, save_pretrained_atomic
from ..fingerprints import (
    CHECKPOINT_KEY, Fingerprinted, check_same_run, loss_fingerprint, optimizer_fingerprint, run_fingerprint,
    spec_fingerprint, tokenizer_fingerprint,
)
from ..metrics import PreferenceMetrics
from ..models import ModelSpec
from ..model_card import model_card
from ..optim import WarmupDecayLR, gradient_norm_and_finite, with_fused_kernel
from .attention import attention_kernels


def batch_values(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor | None = None,
    rejected_logps: torch.Tensor | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    paired: bool = True,
) -> dict[str, torch.Tensor]:
    """One batch's means under the metric names (``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracy``, ``logps/chosen``, ``logps/rejected``, the loss's
    extras); a side with no rows (an all-desirable KTO batch) is left out."""
    values: dict[str, torch.Tensor] = {}
    for name, tensor in (("rewards/chosen", chosen_rewards), ("rewards/rejected", rejected_rewards),
                         ("logps/chosen", chosen_logps), ("logps/rejected", rejected_logps)):
        if tensor is not None and tensor.numel():
            values[name] = tensor.detach().float().mean()
    if paired:
        values["rewards/margins"] = (chosen_rewards - rejected_rewards).detach().float().mean()
        values["rewards/accuracy"] = (chosen_rewards > rejected_rewards).float().mean()
    for name, value in (extra or {}).items():
        values[name] = value.detach().float().mean()
    return values


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over every process of the default process group (a copy, all-reduced);
    ``value`` itself in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and current CUDA device) and Python RNG states, as tensors and
    plain values so the checkpoint still loads with ``weights_only=True``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(_py_random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (dropout masks then continue the saved stream)."""
    torch.set_rng_state(state["torch"])
    _py_random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class AlignmentModule(L.LightningModule):
    """Base of :class:`PreferenceModule`, :class:`RewardModule` and :class:`SFTModule`.

    Subclasses set ``self.tokenizer`` and ``self.model_spec``, implement :meth:`trained_model`
    (the network that is optimised and exported), :meth:`step` and :attr:`data_requirements`
    (what the data module must produce; the CLI hands it over with
    ``datamodule.connect(module.tokenizer, module.data_requirements)``) and call
    :meth:`init_training` in ``__init__``. A subclass with a loss returns it from
    :meth:`objective`; one whose run depends on more (the online module's judge) adds it to
    :meth:`fingerprint`; one whose validation reports other figures overrides
    :meth:`summary_metrics`.

    Args (shared by all subclasses):
        optimizer: optimizer factory; default ``AdamW(lr=1e-6, weight_decay=0)``.
        scheduler: lr-scheduler factory; default :class:`WarmupDecayLR` (10% warmup, linear
            decay), stepped every optimizer step.
        export_dir: after fit, ``save_pretrained`` the trained model and tokenizer here.
        overwrite_export: allow replacing an existing ``export_dir``.
        on_nonfinite: what a NaN/inf gradient does: ``"stop"`` (default) raises an error naming
            the batch's row ids; ``"skip"`` drops that optimizer step (no parameter or optimizer
            state changes) and counts it in ``train/nonfinite_skipped``.

    Checkpoints record the model, tokenizer, loss, optimizer, scheduler and training-data
    fingerprints (:meth:`run_record`: this module's :meth:`fingerprint` and the data module's);
    resuming with any of them changed is an error naming what differs. They are written
    atomically (:class:`~dpo_lightning.checkpoints.AtomicCheckpointIO`).
    """

    tokenizer: PreTrainedTokenizerBase
    #: where the trained model came from (set by subclasses; fingerprinted, named in the model card)
    model_spec: ModelSpec | None = None
    #: the run's resolved recipe (YAML), written into the exported model card; see :meth:`record_recipe`
    recipe: str | None = None

    def init_training(
        self,
        optimizer: OptimizerCallable | None,
        scheduler: LRSchedulerCallable | None,
        export_dir: str | None,
        overwrite_export: bool,
        on_nonfinite: str = "stop",
        metrics: Callable[[], torch.nn.Module] = PreferenceMetrics,
    ) -> None:
        """Store the shared settings; ``metrics`` builds one stage's metric collection
        (``update`` / ``compute`` / ``reset``), called once for train and once for val."""
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"model.init_args.on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.nonfinite_skipped = 0
        self._rows_since_step: list[int] = []
        self._batch_counts: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.export_dir = export_dir
        self.overwrite_export = overwrite_export
        self.train_metrics = metrics()
        self.val_metrics = metrics()
        self.validation_history: list[dict[str, Any]] = []
        self.optimizer_id: dict[str, str] = {}  # what configure_optimizers built (fingerprinted)
        self.saved_run: dict[str, str] | None = None  # a resumed checkpoint's fingerprints

    def trained_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def objective(self) -> torch.nn.Module | None:
        """The loss this module trains with (fingerprinted, named in the model card), or
        ``None`` when it has no configurable one (SFT's token-mean NLL)."""
        return None

    @property
    def attached_trainer(self) -> L.Trainer | None:
        """The trainer this module is attached to, or ``None`` (Lightning's ``trainer`` raises
        then): for code that also runs on a module used alone."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    # -- what the run is ------------------------------------------------------------------
    def fingerprint(self) -> dict[str, str]:
        """``{"model", "tokenizer", "loss", "optimizer", "scheduler"}`` of this module: the model
        spec, the tokenizer's vocabulary and template, the loss's class and plain settings
        (:meth:`objective`; none for SFT) and, once :meth:`configure_optimizers` has run, the
        optimizer's and scheduler's classes and settings. See :class:`~dpo_lightning.fingerprints.Fingerprinted`."""
        out: dict[str, str] = {}
        if self.model_spec is not None:
            out["model"] = spec_fingerprint(self.model_spec)
        if self.tokenizer is not None:
            out["tokenizer"] = tokenizer_fingerprint(self.tokenizer)
        loss = self.objective()
        if loss is not None:
            out["loss"] = loss_fingerprint(loss)
        out.update(self.optimizer_id)
        return out

    def run_record(self) -> dict[str, str]:
        """What a checkpoint stores and a resume compares: this module's :meth:`fingerprint`
        merged with the trainer's data module's (``trainer.datamodule``, when attached and
        :class:`~dpo_lightning.fingerprints.Fingerprinted`)."""
        trainer = self.attached_trainer
        datamodule = trainer.datamodule if trainer is not None else None
        parts: list[Fingerprinted] = [self] + ([datamodule] if isinstance(datamodule, Fingerprinted) else [])
        return run_fingerprint(*parts)

    def record_recipe(self, text: str) -> None:
        """Keep the run's resolved recipe (YAML) for the model card of the export (the CLI
        calls this before ``fit``)."""
        self.recipe = text

    def summary_metrics(self) -> dict[str, str]:
        """``{validation-history key: printed label}`` of the figures the CLI prints after
        ``fit`` (``label: before -> after``): the validation loss here; subclasses name their
        headline figures. Each label starts with the key the figure is logged under
        (``val/loss``). A key the last validation lacks is not printed."""
        return {"loss": "val/loss"}

    def note_rows(self, row_ids: torch.Tensor) -> None:
        """Record a batch's ``(B,)`` dataset row ids as part of the coming optimizer step (named
        if its gradient turns out non-finite; read only then: no host sync)."""
        self._rows_since_step.append(row_ids)

    def count_batch(self, rows: torch.Tensor, token_part: torch.Tensor | None = None,
                    tokens: torch.Tensor | None = None) -> None:
        """Record what this training batch's loss averages over (``rows``; and the part of it
        that is a mean over ``tokens``), for :meth:`global_batch_share`. ``step`` calls it in
        training mode; scalars."""
        self._batch_counts = (rows, token_part, tokens)

    def global_batch_share(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to run backward on: under DDP this process's batch mean scaled by its share
        of the global batch's rows (and tokens), so that DDP's gradient average equals one
        process on the global batch (:func:`~dpo_lightning.losses.base.global_batch_loss`; one
        ``all_reduce`` of two numbers); ``loss`` unchanged in one process or when the batch was
        not counted (:meth:`count_batch`)."""
        counts, self._batch_counts = self._batch_counts, None
        world = self.trainer.world_size if self._trainer is not None else 1
        if counts is None or world == 1:
            return loss
        rows, token_part, tokens = counts
        return global_batch_loss(loss, rows, sum_over_ranks, world, token_part=token_part, tokens=tokens)

    @property
    def data_requirements(self) -> DataRequirements:
        """The batch layout and extra columns this module trains on."""
        raise NotImplementedError

    def step(self, batch: dict[str, torch.Tensor], metrics: PreferenceMetrics) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the loss on ``batch``, update ``metrics``; return the loss and this batch's
        values to log per training step (``train/<name>``; see :func:`batch_values`)."""
        raise NotImplementedError

    # -- loops ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, values = self.step(batch, self.train_metrics)
        self.note_rows(batch["row_id"])
        batch_size = batch["row_id"].numel()
        self.log("train/loss", loss.detach(), batch_size=batch_size)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)  # short, for the bar
        trainer = self.attached_trainer
        if trainer is not None and trainer.optimizers:
            lr = float(trainer.optimizers[0].param_groups[0]["lr"])
            # a fill on the device: Lightning copies a Python float from the host, a sync on CUDA
            self.log("train/lr", torch.full((), lr, device=self.device), batch_size=batch_size)
        for name, value in values.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        if "rewards/accuracy" in values:
            self.log("acc", values["rewards/accuracy"], prog_bar=True, logger=False, batch_size=batch_size)
        return self.global_batch_share(loss)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward under the attention kernels chosen for the loss's device
        (:func:`.attention.sdpa_backends`), so forwards recomputed in backward (gradient
        checkpointing) choose as the first pass did."""
        with attention_kernels(loss.device):
            super().backward(loss, *args, **kwargs)

    def on_train_epoch_end(self) -> None:
        values = self.train_metrics.compute()
        self.log_dict({f"train_epoch/{k}": v for k, v in values.items()})
        with torch.inference_mode(False):  # fresh states must not be inference tensors (see below)
            self.train_metrics.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        # trainer.validate runs this under inference mode: states reset there would be inference
        # tensors, and a later trainer.fit on the same module could not update them in place
        with torch.inference_mode(False):
            self.val_metrics.reset()
        self.log_dict({f"val/{k}": v for k, v in values.items()})
        self.validation_history.append(
            {"step": self.global_step, "sanity_check": bool(self.trainer.sanity_checking), **values}
        )

    # -- non-finite guard ------------------------------------------------------------------
    def pending_rows(self) -> list[int]:
        """Dataset row ids of the batches since the last optimizer step (kept as the batches'
        ``row_id`` tensors, or ints, until asked) and forget them."""
        rows: list[int] = []
        for item in self._rows_since_step:
            rows += item.tolist() if isinstance(item, torch.Tensor) else [int(item)]
        self._rows_since_step = []
        return rows

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.trained_model().parameters() if p.grad is not None]
        finite = True
        if grads:  # before clipping, as TRL's grad_norm
            norm, all_finite = gradient_norm_and_finite(grads)
            self.log("train/grad_norm", norm)
            finite = bool(all_finite)  # the step's one host sync: a bad step must not be taken
        if finite:
            self._rows_since_step = []
            return
        rows = self.pending_rows()
        if self.on_nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite loss or gradient at step {self.global_step} from dataset rows {rows}; inspect "
                "those rows, lower the learning rate, or set model.init_args.on_nonfinite: skip"
            )
        for param in self.trained_model().parameters():
            param.grad = None  # optimizers skip parameters without a gradient: no update at all
        self.nonfinite_skipped += 1
        rank_zero_info(f"skipped step {self.global_step}: non-finite gradient from dataset rows {rows}")
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), rank_zero_only=True)

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.run_record()
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        checkpoint["rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.saved_run = checkpoint.get(CHECKPOINT_KEY, {})
        check_same_run(self.saved_run, self.run_record())
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))
        if "rng_state" in checkpoint:
            set_rng_state(checkpoint["rng_state"])

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.trained_model().parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(params)
        configured = optimizer  # fingerprinted as the recipe has it, whatever the device
        optimizer = self.device_optimizer(optimizer)
        scheduler = WarmupDecayLR(optimizer) if self.scheduler_factory is None else self.scheduler_factory(optimizer)
        # sized in on_train_start, not here: trainer.estimated_stepping_batches builds the train
        # loader, and a loader built before the checkpoint is restored never gets its position back
        self.optimizer_id = optimizer_fingerprint(configured, scheduler)
        if self.saved_run is not None:  # DeepSpeed restores after this; the others before
            check_same_run(self.saved_run, self.run_record())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def device_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """``optimizer`` with its fused kernel where the parameters' device and the trainer's
        precision and strategy allow it (:func:`~dpo_lightning.optim.with_fused_kernel`: CUDA,
        no gradient scaler, not DeepSpeed); the same optimizer on CPUs."""
        trainer = self.attached_trainer
        if trainer is None:
            return optimizer
        scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        deepspeed = isinstance(trainer.strategy, DeepSpeedStrategy)
        return with_fused_kernel(optimizer, grad_scaler=scaler, deepspeed=deepspeed)

    def on_train_start(self) -> None:
        self.log_often_enough()
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, WarmupDecayLR):
                continue
            total = int(self.trainer.estimated_stepping_batches)
            if scheduler.total_steps is None:
                scheduler.set_total_steps(total)
            elif scheduler.total_steps != total:
                # a longer or shorter run is the same run only if the steps taken had the same lr
                taken = range(scheduler.last_epoch + 1)
                before = [scheduler.factor(s) for s in taken]
                saved, scheduler.total_steps = scheduler.total_steps, total
                if [scheduler.factor(s) for s in taken] != before:
                    raise ValueError(
                        f"--ckpt_path: the checkpoint's schedule spans {saved} optimizer steps, this run {total}, "
                        "and the steps already taken would have had other learning rates; resume with the "
                        "trainer.max_epochs / max_steps / accumulate_grad_batches it was trained with (a constant "
                        "schedule without warmup can be extended), or start a new run"
                    )
                scheduler.set_total_steps(total)

    #: the fewest training-log rows a run writes (when it has that many steps), for a curve
    MIN_LOGGED_STEPS = 5

    def log_often_enough(self) -> None:
        """A run of fewer than ``MIN_LOGGED_STEPS`` logging intervals logs every
        ``steps // MIN_LOGGED_STEPS`` steps (every step at least) instead, so its metrics.csv holds
        a training curve and not only an epoch row; longer runs keep ``trainer.log_every_n_steps``."""
        total = float(self.trainer.estimated_stepping_batches)
        every = self.trainer.log_every_n_steps
        if not math.isfinite(total) or total // max(every, 1) >= self.MIN_LOGGED_STEPS:
            return
        shorter = max(1, int(total) // self.MIN_LOGGED_STEPS)
        if shorter < every:
            self.trainer.log_every_n_steps = shorter
            rank_zero_info(f"logging every {shorter} steps: this run's {int(total)} steps hold fewer than "
                           f"{self.MIN_LOGGED_STEPS} intervals of trainer.log_every_n_steps ({every})")

    # -- export ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.export_dir is not None:
            check_export_target(self.export_dir, self.overwrite_export)
        if self.trainer.accumulate_grad_batches < 1:
            raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {self.trainer.accumulate_grad_batches}")
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own, nor DeepSpeed's
            strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_end(self) -> None:
        if self.export_dir is not None:
            state = self.gathered_state_dict()  # collective under FSDP: every rank takes part
            self.export(self.export_dir, state)
            self.trainer.strategy.barrier("export")

    def gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP, the trained model's full (unsharded) weights on rank 0, gathered from all
        ranks; ``None`` elsewhere (``save_pretrained`` then reads the module itself).

        Weights the model ties (a tied LM head) come back as one tensor, as in the module's own
        export (:func:`~dpo_lightning.export.alias_tied_weights`). Run by the tests on 2 CPU
        processes (gloo, through a test-only subclass of ``FSDPStrategy``); not yet run on GPUs
        by this project (no CUDA in its CI); DeepSpeed ZeRO-3 partitions are
        not gathered: export from ZeRO-2, or convert the ZeRO-3 checkpoint with Lightning's
        ``convert_zero_checkpoint_to_fp32_state_dict``.
        """
        strategy = self.trainer.strategy
        if not isinstance(strategy, FSDPStrategy):
            return None
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

        with _get_full_state_dict_context(strategy.model, world_size=strategy.world_size):
            full = strategy.model.state_dict()
        prefix = next(name for name, child in self.named_children() if child is self.trained_model()) + "."
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        return alias_tied_weights(state, self.trained_model())

    def reference_spec(self) -> ModelSpec | None:
        """The model the trained policy is measured against (written beside an export as
        ``reference.json``, read back by ``validate``), or ``None`` when there is none to name."""
        return None

    def tokenized_data(self) -> TokenizedDataModule | None:
        """The trainer's data module when it is one of this library's (its train data, data
        fingerprint and reports go into the model card), else ``None``."""
        trainer = self.attached_trainer
        datamodule = trainer.datamodule if trainer is not None else None
        return datamodule if isinstance(datamodule, TokenizedDataModule) else None

    @rank_zero_only
    def export(self, path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save the trained model and tokenizer (safetensors); ``from_pretrained(path)`` loads them."""
        reference = self.reference_spec()
        target = save_pretrained_atomic(
            self.trained_model(), self.tokenizer, path, overwrite=self.overwrite_export, state_dict=state_dict,
            card=model_card(self, self.tokenized_data(), self.recipe),
            extra_files={REFERENCE_RECORD: reference_record(reference)} if reference is not None else None,
        )
        rank_zero_info(f"exported {type(self.trained_model()).__name__} and tokenizer to {target.resolve()}")
