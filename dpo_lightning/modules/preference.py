"""``PreferenceModule``: a policy, a frozen reference and a pluggable preference loss."""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ..fingerprints import spec_fingerprint, tokenizer_fingerprint
from ..lora import LoraSpec, add_adapters, save_merged
from ..losses import DPOLoss, PreferenceLoss, SequenceLogProbs
from ..metrics import PreferenceMetrics
from ..models import ModelSpec, freeze, load_causal_lm, load_tokenizer
from . import reference_cache
from .base import AlignmentModule
from .logprobs import (
    chunked_model_logprobs,
    model_logprobs,
    shared_prompt_model_logprobs,
    supports_chunked_logprobs,
)

REFERENCE_PREFIX = "reference."
# The frozen reference is in eval mode on purpose; Lightning's generic warning about it is noise.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


class PreferenceModule(AlignmentModule):
    """Train a causal LM policy on preference pairs with any :class:`PreferenceLoss`.

    The reference model is built only when ``loss.needs_reference``: a frozen copy of the
    initial policy by default, or the model at ``reference_model``. It stays in eval mode,
    requires no grad, is not in the optimizer, and is left out of checkpoints (it is rebuilt
    from the recipe on resume).

    Args:
        model: where the policy comes from (hub id / folder, or a config to build).
        loss: the preference loss; default ``DPOLoss(beta=0.1)``.
        reference_model: a separate reference; ``None`` copies the initial policy.
        optimizer, scheduler, export_dir, overwrite_export, on_nonfinite: see
            :class:`AlignmentModule` (the policy is what is exported).
        gradient_checkpointing: recompute activations in backward to save memory.
        logprobs: how per-token log-probs are computed. ``"chunked"`` runs the LM head only at
            completion positions, ``logprob_chunk_size`` at a time, recomputing in backward: no
            ``(2B, T, V)`` logits are ever held. ``"full"`` takes the model's logits. ``"auto"``
            (default) picks chunked where the model allows it (plain linear head, no logit
            scaling) and the strategy is not FSDP, whose root unit must run the full forward.
        logprob_chunk_size: positions per LM-head chunk (memory ~ chunk x vocab x 4 bytes).
        precompute_reference: before training, run the reference once over the train and val
            splits, cache its log-probs on disk (see :mod:`.reference_cache`), and free the
            reference model: training then runs the policy alone. A later run with the same
            data, tokenization, reference and tokenizer reads the cache and runs no reference.
            Pairwise losses only (KTO's KL pairs change every batch).
        reference_cache_dir: where the cache lives; default ``~/.cache/dpo_lightning/reference_logps``.
        lora: train LoRA adapters (peft) instead of all weights. The reference is then the
            policy with adapters disabled (unless ``lora.separate_reference`` or a
            ``reference_model`` is given); export writes the adapter (and, with
            ``lora.merge_on_export``, the merged model to ``<export_dir>/merged``).
        share_prompt: run each pair's prompt once instead of twice: ``[prompt; chosen; rejected]``
            in one row with a 4D attention mask (see :func:`.logprobs.shared_prompt_model_logprobs`).
            Pairwise losses, chunked log-probs and ``sdpa`` / ``eager`` attention only.
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
        on_nonfinite: Literal["stop", "skip"] = "stop",
        logprobs: Literal["auto", "chunked", "full"] = "auto",
        logprob_chunk_size: int = 1024,
        precompute_reference: bool = False,
        reference_cache_dir: str | None = None,
        lora: LoraSpec | None = None,
        share_prompt: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler", "export_dir", "overwrite_export"])
        self.loss = loss if loss is not None else DPOLoss()
        self.model_spec = model
        self.tokenizer = load_tokenizer(model)
        self.policy = load_causal_lm(model, self.tokenizer)
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.lora = lora
        self.adapter_reference = bool(
            lora is not None and self.loss.needs_reference and reference_model is None and not lora.separate_reference
        )
        needs_separate = self.loss.needs_reference and not self.adapter_reference
        self.reference = self.build_reference(reference_model) if needs_separate else None
        if lora is not None:
            self.policy = add_adapters(self.policy, lora, gradient_checkpointing)
        if logprobs not in ("auto", "chunked", "full"):
            raise ValueError(f"model.init_args.logprobs must be auto, chunked or full, got {logprobs!r}")
        if logprobs == "chunked" and not supports_chunked_logprobs(self.policy):
            raise ValueError(
                "model.init_args.logprobs: chunked needs a plain linear LM head without logit scaling; "
                "this model has none, use auto or full"
            )
        self.logprobs_mode = logprobs
        self.logprob_chunk_size = logprob_chunk_size
        if share_prompt:
            problem = (
                "a pairwise loss" if not self.loss.paired
                else "logprobs: auto or chunked" if logprobs == "full"
                else "a model with a plain linear LM head" if not supports_chunked_logprobs(self.policy)
                else "sdpa or eager attention" if "flash" in str(self.policy.config._attn_implementation)
                else None
            )
            if problem:
                raise ValueError(f"model.init_args.share_prompt needs {problem}")
        self.share_prompt = share_prompt
        if precompute_reference and not (self.loss.needs_reference and self.loss.paired):
            raise ValueError(
                "model.init_args.precompute_reference needs a pairwise loss with a reference; "
                f"{type(self.loss).__name__} has none to precompute"
            )
        self.precompute_reference = precompute_reference
        self.reference_cache_dir = reference_cache_dir or reference_cache.DEFAULT_CACHE_DIR
        self.reference_id = spec_fingerprint(reference_model if reference_model is not None else model)
        self.reference_batches_computed = 0
        self.init_training(
            optimizer, scheduler, export_dir, overwrite_export, on_nonfinite,
            metrics=functools.partial(PreferenceMetrics, paired=self.loss.paired),
        )

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

    def use_chunked_logprobs(self) -> bool:
        if self.logprobs_mode != "auto":
            return self.logprobs_mode == "chunked"
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        return "FSDP" not in strategy and supports_chunked_logprobs(self.policy)

    def sequence_logprobs(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> SequenceLogProbs:
        """``(2B,)`` log-prob sums and counts of ``model`` on ``batch``, by the configured path."""
        if self.use_chunked_logprobs():
            if self.share_prompt:
                return shared_prompt_model_logprobs(model, batch, self.logprob_chunk_size)
            return chunked_model_logprobs(model, batch, self.logprob_chunk_size)
        return model_logprobs(model, batch)

    def reference_logprobs(self, batch: dict[str, Tensor]) -> SequenceLogProbs | None:
        """``(2B,)`` reference log-probs, or ``None`` when the loss needs no reference."""
        if not self.loss.needs_reference:
            return None
        if "reference_chosen" in batch:  # precomputed
            counts = batch["completion_mask"][:, 1:].sum(-1)
            return SequenceLogProbs(torch.cat([batch["reference_chosen"], batch["reference_rejected"]]), counts)
        with torch.no_grad():
            if self.adapter_reference:
                with self.policy.disable_adapter():
                    return self.sequence_logprobs(self.policy, batch)
            return self.sequence_logprobs(self.reference, batch)

    # -- steps ----------------------------------------------------------------------------
    def trained_model(self) -> torch.nn.Module:
        return self.policy

    def step(self, batch: dict[str, Tensor], metrics: PreferenceMetrics) -> tuple[Tensor, dict[str, Tensor]]:
        policy = self.sequence_logprobs(self.policy, batch)
        reference = self.reference_logprobs(batch)
        out = self.loss(policy, reference, batch)
        chosen_logps = out.chosen_logps if out.chosen_logps is not None else policy.chosen.detach()
        rejected_logps = out.rejected_logps if out.rejected_logps is not None else policy.rejected.detach()
        metrics.update(out.loss, out.chosen_rewards, out.rejected_rewards, chosen_logps, rejected_logps, out.metrics)
        values = {}
        if self.loss.paired:
            values["rewards/accuracy"] = (out.chosen_rewards > out.rejected_rewards).float().mean()
        return out.loss, values

    # -- precomputed reference ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        # here, not in on_fit_start: Lightning builds the train loader for the scheduler's step
        # count before on_fit_start, and that loader must already carry the cached columns
        self.attach_reference_logprobs()

    def attach_reference_logprobs(self) -> None:
        """Give the data module's splits the reference's log-probs, then free the reference."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if not self.precompute_reference or datamodule is None or getattr(datamodule, "reference_attached", False):
            return
        if self.reference is None and not self.adapter_reference:
            raise RuntimeError("the reference model was freed before its log-probs were attached")
        tokenizer_id = tokenizer_fingerprint(self.tokenizer)
        device = self.trainer.strategy.root_device  # the module is not moved there yet
        network = self.policy if self.adapter_reference else self.reference
        for split in ("train_dataset", "val_dataset"):
            dataset = getattr(datamodule, split, None)
            if dataset is None:
                continue
            path = reference_cache.cache_path(self.reference_cache_dir, dataset, self.reference_id, tokenizer_id)

            def compute(dataset=dataset) -> Tensor:
                collate = datamodule.collator()
                batches = -(-len(dataset) // datamodule.eval_batch_size)
                rank_zero_info(f"precomputing reference log-probs for {len(dataset)} rows ({batches} batches)")
                self.reference_batches_computed += batches
                was_training = network.training
                network.to(device).eval()  # no dropout in the reference pass
                values = reference_cache.compute(
                    self.reference_logprobs, dataset, collate, datamodule.eval_batch_size, device,
                )
                network.train(was_training)
                return values

            values, computed = reference_cache.load_or_compute(
                path, compute, self.trainer.is_global_zero, lambda: self.trainer.strategy.barrier("reference_cache")
            )
            rank_zero_info(f"reference log-probs for {split}: {'computed and saved to' if computed else 'read from'} {path}")
            setattr(datamodule, split, reference_cache.attach(dataset, values))
        datamodule.carried_columns = reference_cache.COLUMNS
        datamodule.reference_attached = True
        self.reference = None  # freed: training runs the policy alone
        self.adapter_reference = False

    # -- export -----------------------------------------------------------------------------
    def export(self, path: str, state_dict: dict[str, Tensor] | None = None) -> None:
        """Policy (or its LoRA adapter) and tokenizer; with ``lora.merge_on_export`` also the
        merged model in ``<path>/merged``."""
        super().export(path, state_dict)
        if self.lora is not None and self.lora.merge_on_export and self.trainer.is_global_zero:
            save_merged(self.policy, Path(path) / "merged")
            self.tokenizer.save_pretrained(Path(path) / "merged")
            rank_zero_info(f"exported the merged model to {(Path(path) / 'merged').resolve()}")

    # -- checkpoints: never store the reference --------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(REFERENCE_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.reference is not None:
            state = checkpoint["state_dict"]
            for key, value in self.reference.state_dict(prefix=REFERENCE_PREFIX).items():
                state.setdefault(key, value)
