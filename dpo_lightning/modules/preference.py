"""``PreferenceModule``: a policy, a reference strategy and a pluggable preference loss."""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ..contract import BatchLayout, DataRequirements
from ..fingerprints import spec_fingerprint
from ..lora import LoraSpec, add_adapters, save_merged
from ..losses import DPOLoss, PreferenceLoss, SequenceLogProbs, mean_rows
from ..metrics import PreferenceMetrics
from ..models import ModelSpec, load_causal_lm, load_tokenizer, set_dropout
from .base import AlignmentModule, batch_values
from .logprobs import LogProbSelector
from .reference import PrepareContext, ReferenceReset, ReferenceSpec, ReferenceStrategy, choose_reference

REFERENCE_PREFIX = "reference."
# A frozen reference is in eval mode on purpose; Lightning warns about every eval-mode module at
# the start of training. The filter is set in on_fit_start and removed in on_train_start.
_EVAL_MODE_WARNING = r".*module\(s\) in eval mode at the start of training.*"


class PreferenceModule(AlignmentModule):
    """Train a causal LM policy with any :class:`PreferenceLoss`.

    The reference is one :class:`~.reference.ReferenceStrategy` (``self.reference``), chosen
    from the ``reference`` section (:class:`~.reference.ReferenceSpec`) by
    :func:`~.reference.choose_reference`: none for reference-free losses, a frozen copy of the
    initial policy (default), the model at ``reference.model``, the policy with its LoRA
    adapters disabled, a precomputed cache (``reference.precompute``), or a moving reference
    (``reference.update``: TR-DPO; ``reference.bema``: the bias-corrected EMA of the policy).
    The module never asks which. Log-probs of policy and reference go
    through one :class:`~.logprobs.LogProbSelector`. What the data must hold is
    :attr:`data_requirements` (the loss's), handed to the data module by ``connect``.

    Args:
        model: where the policy comes from (hub id / folder, or a config to build).
        loss: the preference loss; default ``DPOLoss(beta=0.1)``.
        reference: the reference's settings (:class:`~.reference.ReferenceSpec`:
            ``{model, precompute, cache_dir, update, reset, bema}``); ``None``: a frozen copy of the
            initial policy (with LoRA: the policy with its adapters off).
        optimizer, scheduler, export_dir, overwrite_export, on_nonfinite: see
            :class:`AlignmentModule` (the policy is what is exported).
        gradient_checkpointing: recompute activations in backward to save memory.
        logprobs: how per-token log-probs are computed. ``"chunked"`` runs the LM head only at
            completion positions, ``logprob_chunk_size`` at a time, recomputing in backward: no
            ``(2B, T, V)`` logits are ever held. ``"full"`` takes the model's logits. ``"auto"``
            (default) picks chunked where the model allows it (plain linear head, no logit
            scaling) and the strategy is not FSDP, whose root unit must run the full forward.
        logprob_chunk_size: positions per LM-head chunk (memory ~ chunk x vocab x 4 bytes);
            ``"auto"`` (default): on a CPU about 32 MB of logits a chunk (1024 positions at vocab
            2k, 262 at 32k), elsewhere 1024 (:meth:`.LogProbSelector.positions_per_chunk`).
        lora: train LoRA adapters (peft) instead of all weights. The reference is then the
            policy with adapters disabled (unless ``lora.separate_reference`` or a
            ``reference.model`` is given); export writes the adapter (and, with
            ``lora.merge_on_export``, the merged model to ``<export_dir>/merged``).
        share_prompt: run each pair's prompt once instead of twice: ``[prompt; chosen; rejected]``
            in one row with a 4D attention mask (see :func:`.logprobs.shared_prompt_model_logprobs`).
            Pairwise losses, chunked log-probs and ``sdpa`` / ``eager`` attention only.
            ``auto`` (default): on for CPU batches of pairwise losses where the shared layout is
            exact (listed architectures, no sliding window shorter than the batch: see
            :func:`.logprobs.shared_prompt_is_exact`), off elsewhere; ``true`` forces it.
        disable_dropout: switch every dropout of the policy off (LoRA's too), whether the model
            is loaded or built. Default True, as in TRL's DPO: with dropout the policy's
            log-probs differ from the reference's at step 0 and the implicit rewards are noise.
    """

    def __init__(
        self,
        model: ModelSpec,
        loss: PreferenceLoss | None = None,
        reference: ReferenceSpec | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
        overwrite_export: bool = False,
        gradient_checkpointing: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        logprobs: Literal["auto", "chunked", "full"] = "auto",
        logprob_chunk_size: int | Literal["auto"] = "auto",
        lora: LoraSpec | None = None,
        share_prompt: bool | Literal["auto"] = "auto",
        disable_dropout: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler", "export_dir", "overwrite_export"])
        self.loss = loss if loss is not None else DPOLoss()
        self.model_spec = model
        needs = self.loss.needs
        settings = reference if reference is not None else ReferenceSpec()
        if not isinstance(settings, ReferenceSpec):
            raise TypeError(f"model.init_args.reference must be a ReferenceSpec, got {type(settings).__name__}")
        #: the ``reference`` section, its ``reset`` resolved (:attr:`default_reset` when unset)
        self.reference_settings = replace(settings, reset=settings.reset or self.default_reset)
        pairwise = needs.layout == BatchLayout.PAIRS
        self.reference_settings.check(needs_reference=needs.reference, pairwise=pairwise, adapters=lora is not None)
        self.tokenizer = load_tokenizer(model)
        self.policy = load_causal_lm(model, self.tokenizer)
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.lora = lora
        separate = self.reference_settings.model
        self.reference: ReferenceStrategy = choose_reference(
            self.reference_settings, needs_reference=needs.reference, pairwise=pairwise, policy=self.policy,
            tokenizer=self.tokenizer, adapters=lora is not None,
            separate_with_adapters=bool(lora and lora.separate_reference),
            reference_id=spec_fingerprint(separate if separate is not None else model),
            reference_tokens=needs.reference_tokens,
        )
        if lora is not None:
            self.policy = add_adapters(self.policy, lora, gradient_checkpointing)
        set_dropout(self.policy, disable_dropout)
        self.logprob_selector = LogProbSelector(logprobs, logprob_chunk_size, share_prompt)
        self.logprob_selector.check(self.policy, pairwise=self.loss.pairwise)
        self.init_training(
            optimizer, scheduler, export_dir, overwrite_export, on_nonfinite,
            metrics=functools.partial(PreferenceMetrics, paired=self.compares_pairs),
        )

    #: ``reference.reset`` when the recipe leaves it unset (the iterative module: ``per_round``)
    default_reset: ClassVar[ReferenceReset] = "never"

    @property
    def compares_pairs(self) -> bool:
        """Whether each chosen reward has its rejected one (``PAIRS``, and TPO's ``TRIPLES``): then
        reward accuracy and margins are logged."""
        return self.loss.batch_layout in (BatchLayout.PAIRS, BatchLayout.TRIPLES)

    @property
    def data_requirements(self) -> DataRequirements:
        """What the data module must produce: the loss's batch layout and columns, the
        policy's position limit (``max_position_embeddings``), and how pairs will run
        (``share_prompt``), which the length-grouped sampler groups by."""
        requirements = self.loss.data_requirements.with_model_limit(self.policy)
        return replace(requirements, pair_rows=self.logprob_selector.pair_rows(self.policy))

    # -- log-probs --------------------------------------------------------------------------
    def logprobs(self, model: torch.nn.Module, batch: dict[str, Tensor],
                 selector: LogProbSelector | None = None) -> SequenceLogProbs:
        """``(2B,)`` log-prob sums and counts of ``model`` on ``batch`` (per-token values too when
        the loss asks), by the configured path (``selector``: another one, e.g. a subclass's
        single-sequence path); the reference strategy uses the same."""
        trainer = self.attached_trainer
        strategy = trainer.strategy if trainer is not None else None
        return (selector or self.logprob_selector)(
            model, batch, strategy, with_tokens=self.loss.needs_token_logprobs,
            with_square_mass=self.loss.needs_square_mass and model is self.policy,
        )

    # -- steps ----------------------------------------------------------------------------
    def trained_model(self) -> torch.nn.Module:
        return self.policy

    def objective(self) -> PreferenceLoss:
        return self.loss

    def summary_metrics(self) -> dict[str, str]:
        """Held-out reward accuracy for pairs (and TPO's triples); for unpaired rows (KTO), the
        mean implicit reward of each side. Each label starts with the key it is logged under."""
        if self.compares_pairs:
            return {"rewards/accuracy": "val/rewards/accuracy"}
        return {"rewards/chosen": "val/rewards/chosen (desirable rows)",
                "rewards/rejected": "val/rewards/rejected (undesirable rows)"}

    def pair_logprobs(self, batch: dict[str, Tensor]) -> tuple[SequenceLogProbs, SequenceLogProbs | None]:
        """The policy's and the reference's log-probs of ``batch``'s rows (``(2B,)`` for pairs),
        what the loss reads; the reference's is ``None`` for a reference-free loss."""
        policy = self.logprobs(self.policy, batch)
        return policy, self.reference.logprobs(self.policy, batch, self.logprobs)

    def step(self, batch: dict[str, Tensor], metrics: PreferenceMetrics) -> tuple[Tensor, dict[str, Tensor]]:
        policy, reference = self.pair_logprobs(batch)
        out = self.loss(policy, reference, batch)
        if self.training:  # under DDP each process's loss is weighed by its share of the global batch
            self.count_batch(mean_rows(out, self.compares_pairs), out.token_part, out.tokens)
        chosen_logps, rejected_logps = out.chosen_logps, out.rejected_logps
        if chosen_logps is None or rejected_logps is None:
            default_chosen, default_rejected = self.logged_logps(policy, batch)
            chosen_logps = default_chosen if chosen_logps is None else chosen_logps
            rejected_logps = default_rejected if rejected_logps is None else rejected_logps
        metrics.update(out.loss, out.chosen_rewards, out.rejected_rewards, chosen_logps, rejected_logps, out.metrics)
        values = batch_values(out.chosen_rewards, out.rejected_rewards, chosen_logps, rejected_logps, out.metrics, self.compares_pairs)
        return out.loss, values

    def logged_logps(self, policy: SequenceLogProbs, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The policy log-probs logged for each side when the loss's output leaves them out:
        the desirable / undesirable rows of an ``UNPAIRED`` batch (``(B,)`` sums split by
        ``label``), otherwise the first / second half of the sums."""
        if self.loss.batch_layout == BatchLayout.UNPAIRED:
            label = batch["label"].bool()
            return policy.sums[label].detach(), policy.sums[~label].detach()
        return policy.chosen.detach(), policy.rejected.detach()

    # -- the reference's hooks ------------------------------------------------------------------
    def reference_spec(self) -> ModelSpec | None:
        """``reference.model``, else the policy's starting point ``model`` (with LoRA, the base
        without adapters); ``None`` when the loss uses no reference or it moves (TR-DPO, BEMA)."""
        moves = self.reference_settings.update is not None or self.reference_settings.bema is not None
        if not self.loss.needs_reference or moves:
            return None
        return self.reference_settings.model or self.model_spec

    #: validation measures implicit rewards against the reference (online modules measure samples)
    validates_implicit_rewards = True

    def check_reference_is_not_the_policy(self, ckpt_path: str | None) -> None:
        """``dpo-lightning validate`` refuses to measure a policy against a copy of itself: with no
        ``reference.model``, no adapters and no checkpoint, every implicit reward would be 0 (loss
        log 2, accuracy 0.00) whatever the policy is. (From Python, validating before ``fit`` gives
        exactly that on purpose: the "before" figure.)"""
        same = self.reference_settings.model is None and self.lora is None and ckpt_path is None
        if self.validates_implicit_rewards and self.loss.needs_reference and same:
            raise ValueError(
                f"validate: the reference is a copy of the policy {self.model_spec.name_or_path or 'model'!r} "
                "(model.init_args.reference.model is not set and the policy's folder records none in "
                "reference.json), so every implicit reward is 0; set model.init_args.reference.model.name_or_path "
                "to the model the policy was trained from, or give --ckpt_path"
            )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # here, not in on_fit_start: Lightning builds the train loader for the scheduler's step
        # count before on_fit_start, and that loader must already carry precomputed columns
        trainer = self.trainer
        self.reference.prepare(PrepareContext(
            policy=self.policy, compute=self.logprobs, tokenizer=self.tokenizer,
            datamodule=trainer.datamodule, device=trainer.strategy.root_device,
            is_global_zero=trainer.is_global_zero, barrier=trainer.strategy.barrier,
        ))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        values = self.reference.on_train_epoch_start(self.policy, int(self.current_epoch))
        for logger in self.loggers if values else ():
            logger.log_metrics(values, step=self.global_step)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.reference.after_optimizer_step(self.policy)

    def on_fit_start(self) -> None:
        self._warning_filters = list(warnings.filters)
        warnings.filterwarnings("ignore", message=_EVAL_MODE_WARNING)

    def on_train_start(self) -> None:
        warnings.filters[:] = getattr(self, "_warning_filters", warnings.filters)
        super().on_train_start()

    # -- export -----------------------------------------------------------------------------
    def export(self, path: str, state_dict: dict[str, Tensor] | None = None) -> None:
        """Policy (or its LoRA adapter) and tokenizer; with ``lora.merge_on_export`` also the
        merged model in ``<path>/merged``."""
        super().export(path, state_dict)
        if self.lora is not None and self.lora.merge_on_export and self.trainer.is_global_zero:
            save_merged(self.policy, Path(path) / "merged")
            self.tokenizer.save_pretrained(Path(path) / "merged")
            rank_zero_info(f"exported the merged model to {(Path(path) / 'merged').resolve()}")

    # -- checkpoints: the reference strategy decides what of it is saved ---------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.reference.on_save_checkpoint(checkpoint["state_dict"], REFERENCE_PREFIX)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reference.on_load_checkpoint(checkpoint["state_dict"], REFERENCE_PREFIX)
