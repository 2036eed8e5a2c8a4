"""Reference strategies: where ``log pi_ref(y|x)`` comes from, one class each.

Every strategy has the same small interface, and :class:`~.preference.PreferenceModule` holds
exactly one and never asks which:

* :meth:`ReferenceStrategy.prepare`: before training or validation (at ``setup``), given what it
  may use (:class:`PrepareContext`: the policy, the log-prob path, the data module, ...);
* :meth:`ReferenceStrategy.logprobs`: the reference's :class:`SequenceLogProbs` for a batch;
* :meth:`ReferenceStrategy.after_optimizer_step`: after each optimizer step (a moving reference
  updates itself here);
* :meth:`ReferenceStrategy.on_train_epoch_start`: at the start of each training epoch (the
  iterative reference becomes the policy at each round's start);
* :meth:`ReferenceStrategy.on_save_checkpoint` / :meth:`on_load_checkpoint`: what of it goes into
  a checkpoint. A fixed reference is left out (it is rebuilt from the recipe on resume); a
  moving reference is saved and restored.

Strategies: :class:`NoReference` (SimPO, ORPO), :class:`FrozenCopy` (the initial policy, the
default), :class:`SeparateModel` (``reference.model``), :class:`AdaptersDisabled` (LoRA: the
policy with its adapters switched off), :class:`PrecomputedReference` (one pass before
training, cached on disk; wraps one of the live strategies), :class:`MovingReference`
(TR-DPO: soft or hard updates towards the policy), :class:`BEMAReference` (the bias-corrected
EMA of the policy's weights) and :class:`RoundReference` (iterative DPO: the policy at the start
of each round). Adding one is a class here plus a line in
:func:`choose_reference`.

A recipe's reference settings are one nested section, :class:`ReferenceSpec`
(``model.init_args.reference``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..fingerprints import tokenizer_fingerprint
from ..losses import SequenceLogProbs
from ..models import ModelSpec, freeze, load_causal_lm
from . import bema, reference_cache
from .bema import BEMAUpdate

#: ``compute(network, batch) -> SequenceLogProbs``: the module's log-prob path (:class:`.logprobs.LogProbSelector`)
LogProbFn = Callable[[nn.Module, Mapping[str, Tensor]], SequenceLogProbs]
MODEL_KEY = "model.init_args"
#: where a recipe's reference settings live (:class:`ReferenceSpec`)
REFERENCE_KEY = f"{MODEL_KEY}.reference"


@dataclass
class PrepareContext:
    """What a strategy may use when it prepares (at ``setup``), handed over by the module.

    Attributes:
        policy: the policy (peft model with LoRA).
        compute: the module's log-prob path.
        tokenizer: the policy's tokenizer.
        datamodule: the trainer's data module, or ``None``; a strategy reads its ``splits`` and
            ``ordered_loader(split)`` and writes ``add_columns(split, columns)`` (the allowed reach).
        device: where the run computes (the module may not be moved there yet).
        is_global_zero: whether this is the process that writes shared files.
        barrier: ``barrier(name)`` waits for every process.
    """

    policy: nn.Module
    compute: LogProbFn
    tokenizer: Any
    datamodule: Any | None
    device: torch.device
    is_global_zero: bool = True
    barrier: Callable[[str], None] = lambda name: None


class ReferenceStrategy(nn.Module):
    """Base class. Held by the training module as ``module.reference``; its parameters (if any)
    move with the module, never require grad and are never in the optimizer. It stays in eval
    mode whatever mode the module is switched to."""

    def __init__(self) -> None:
        super().__init__()
        self.training = False

    def prepare(self, context: PrepareContext) -> None:
        """Called at ``setup`` of every stage, after the data module is set up."""

    def logprobs(self, policy: nn.Module, batch: Mapping[str, Tensor], compute: LogProbFn) -> SequenceLogProbs | None:
        """``(2B,)`` reference log-probs of ``batch``, or ``None`` (no reference)."""
        raise NotImplementedError

    def after_optimizer_step(self, policy: nn.Module) -> None:
        """Called after each optimizer step with the (updated) policy."""

    def on_train_epoch_start(self, policy: nn.Module, epoch: int) -> dict[str, float]:
        """Called at the start of each training epoch (0-based ``epoch``) with the policy; returns
        values for the loggers (none by default)."""
        return {}

    def on_save_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Edit the module's ``state_dict`` before it is saved; default: leave this strategy out."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]

    def on_load_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Edit a loaded ``state_dict`` before it is applied; default: keep the current values."""
        for key, value in self.state_dict(prefix=prefix).items():
            state_dict.setdefault(key, value)

    def train(self, mode: bool = True) -> ReferenceStrategy:
        return super().train(False)


class NoReference(ReferenceStrategy):
    """For reference-free losses (``needs_reference = False``): nothing is loaded."""

    def logprobs(self, policy, batch, compute) -> None:
        return None


class FrozenNetwork(ReferenceStrategy):
    """A frozen causal LM (eval mode, no grad), run under ``no_grad`` with the module's log-prob path."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = freeze(network)

    @torch.no_grad()
    def logprobs(self, policy, batch, compute) -> SequenceLogProbs:
        return compute(self.network, batch)


class MovingNetwork(FrozenNetwork):
    """A frozen network whose weights the strategy changes during training (towards the policy,
    or to it): they and its buffers are kept in checkpoints and must be found there on resume.

    Subclasses set ``kind`` (what it is, in words) and ``setting`` (the recipe setting that
    makes it), named when a checkpoint lacks it.
    """

    kind = ""
    setting = ""

    def __init__(self, network: nn.Module, policy: nn.Module, needs: str) -> None:
        super().__init__(network)
        if [n for n, _ in network.named_parameters()] != [n for n, _ in policy.named_parameters()]:
            raise ValueError(f"{self.setting} needs a reference with the policy's architecture ({needs})")

    def on_save_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Keep the reference's current weights and buffers in the checkpoint."""

    def on_load_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        missing = [k for k in self.state_dict(prefix=prefix) if k not in state_dict]
        if missing:
            raise ValueError(
                f"--ckpt_path: the checkpoint holds no {self.kind} (it was trained without "
                f"{self.setting}); resume with the recipe it was trained with"
            )


class FrozenCopy(FrozenNetwork):
    """A frozen copy of the initial policy (the default reference of DPO)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__(copy.deepcopy(policy))


class SeparateModel(FrozenNetwork):
    """A frozen reference loaded from its own spec (``model.init_args.reference.model``)."""

    def __init__(self, spec: ModelSpec, policy: nn.Module, tokenizer: Any) -> None:
        spec.validate(f"{REFERENCE_KEY}.model")
        network = load_causal_lm(spec, tokenizer)
        if network.config.vocab_size != policy.config.vocab_size:
            raise ValueError(
                f"{REFERENCE_KEY}.model: vocab size {network.config.vocab_size} != policy's "
                f"{policy.config.vocab_size}; both must share the tokenizer"
            )
        super().__init__(network)


class AdaptersDisabled(ReferenceStrategy):
    """LoRA: the policy itself with its adapters switched off; holds no weights of its own."""

    @torch.no_grad()
    def logprobs(self, policy, batch, compute) -> SequenceLogProbs:
        with policy.disable_adapter():
            return compute(policy, batch)


@dataclass
class ReferenceUpdate:
    """The ``reference.update`` section of a recipe: TR-DPO's moving reference (Gorbatovski et
    al. 2024, arXiv 2404.09656). Every ``every_n_steps`` optimizer steps::

        theta_ref <- alpha * theta_policy + (1 - alpha) * theta_ref

    ``alpha: 1`` is the hard update (the reference becomes the policy). Defaults as TRL's
    ``ref_model_mixup_alpha`` / ``ref_model_sync_steps``.

    Attributes:
        alpha: in (0, 1]. Default 0.6 (the paper's range: 0.5 - 0.8 soft).
        every_n_steps: >= 1. Default 512 (the paper: 64 - 512).
    """

    alpha: float = 0.6
    every_n_steps: int = 512

    def validate(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"{REFERENCE_KEY}.update.alpha must be in (0, 1], got {self.alpha}")
        if self.every_n_steps < 1:
            raise ValueError(f"{REFERENCE_KEY}.update.every_n_steps must be >= 1, got {self.every_n_steps}")


class MovingReference(MovingNetwork):
    """A reference that moves towards the policy (TR-DPO; see :class:`ReferenceUpdate`).

    Its weights and its optimizer-step counter (a buffer) are saved in checkpoints and
    restored on resume, so a resumed run updates at the same steps with the same weights.
    """

    kind = "moving reference"
    setting = f"{REFERENCE_KEY}.update"

    def __init__(self, network: nn.Module, policy: nn.Module, update: ReferenceUpdate) -> None:
        update.validate()
        super().__init__(network, policy, "its parameters are mixed into the reference")
        self.update = update
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def after_optimizer_step(self, policy: nn.Module) -> None:
        self.steps += 1
        if int(self.steps) % self.update.every_n_steps:
            return
        for ref, new in zip(self.network.parameters(), policy.parameters()):
            ref.lerp_(new.detach().to(ref.dtype), self.update.alpha)


class WeightCopies(nn.Module):
    """One buffer per parameter of a network, holding a copy of it (named as the parameter,
    ``.`` written ``__``), in the network's dtype: saved in checkpoints with the module."""

    def __init__(self, network: nn.Module, like: nn.Module) -> None:
        """``network``: whose parameters are copied; ``like``: whose parameters' dtypes they take."""
        super().__init__()
        for (name, param), target in zip(network.named_parameters(), like.parameters(), strict=True):
            self.register_buffer(name.replace(".", "__"), param.detach().to(target.dtype).clone())

    def tensors(self) -> list[Tensor]:
        """The copies, in the network's parameter order."""
        return list(self._buffers.values())


class BEMAReference(MovingNetwork):
    """A reference that is the bias-corrected EMA of the policy's weights (BEMA, Block & Zhang
    2025, arXiv 2508.00180), on TRL's schedule (:mod:`.bema`, :class:`~.bema.BEMAUpdate`).

    State (buffers, saved in checkpoints and restored on resume): ``theta0`` (the weights at
    ``update_after``), ``ema`` (the running EMA), ``running`` (the last BEMA weights; only when
    the reference's schedule differs from the BEMA updates', see
    :meth:`~.bema.BEMAUpdate.needs_running_copy`; otherwise each update writes into the
    reference itself) and ``steps`` (optimizer steps taken). All start as the initial policy's
    weights, as TRL's ``on_train_begin`` sets them. Memory: the reference plus two (or three)
    copies of the policy's weights, on the module's device.

    Every parameter of the policy is averaged (full fine-tuning: all are trained); buffers of
    the reference are left as they are.
    """

    kind = "BEMA reference"
    setting = f"{REFERENCE_KEY}.bema"

    def __init__(self, network: nn.Module, policy: nn.Module, update: BEMAUpdate) -> None:
        update.validate()
        super().__init__(network, policy, "the average of the policy's weights is written into it")
        self.update = update
        self.theta0 = WeightCopies(policy, like=self.network)
        self.ema = WeightCopies(policy, like=self.network)
        self.running = WeightCopies(policy, like=self.network) if update.needs_running_copy() else None
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def after_optimizer_step(self, policy: nn.Module) -> None:
        """One step of TRL's ``on_step_end`` (BEMA, then the reference update), ``t = steps``."""
        self.steps += 1
        step, update = int(self.steps), self.update
        weights = [p.detach() for p in policy.parameters()]
        reference = list(self.network.parameters())
        refresh = update.is_reference_step(step)
        if update.is_snapshot_step(step):
            bema.snapshot_(self.theta0.tensors(), self.ema.tensors(), weights)
        elif update.is_update_step(step):
            bema.ema_update_(self.ema.tensors(), weights, update.ema_beta(step))
            out = self.running.tensors() if self.running is not None else reference if refresh else None
            if out is not None:  # without a running copy, an update off the reference's schedule is not kept
                bema.bema_weights_(out, self.ema.tensors(), weights, self.theta0.tensors(), update.bias_alpha(step))
        if refresh and self.running is not None:
            bema.copy_(reference, self.running.tensors())


class RoundReference(MovingNetwork):
    """Iterative DPO's reference: frozen, and set to the policy at the start of each round
    (training epoch) after the first, so each round is a DPO run around the policy that sampled
    its pairs.

    ``round`` (a buffer) is the 0-based round whose start last reset it (``-1``: never reset,
    the network is the initial reference). Its weights and ``round`` are saved in checkpoints:
    a run resumed in the middle of a round gets the reference of that round's start back (the
    policy has moved on since), and one resumed at a round boundary resets it again.
    """

    kind = "per-round reference"
    setting = f"{REFERENCE_KEY}.reset: per_round"

    def __init__(self, network: nn.Module, policy: nn.Module) -> None:
        super().__init__(network, policy, "the policy's weights are copied into it; drop reference.model or set "
                                          "reference.reset: never")
        self.register_buffer("round", torch.full((), -1, dtype=torch.long))

    @torch.no_grad()
    def reset(self, policy: nn.Module, round_index: int) -> None:
        """``reference <- policy`` (parameters, in the reference's dtype), marked as round ``round_index``."""
        for ref, new in zip(self.network.parameters(), policy.parameters()):
            ref.copy_(new.detach().to(ref.dtype))
        self.round.fill_(round_index)

    def on_train_epoch_start(self, policy: nn.Module, epoch: int) -> dict[str, float]:
        """Round ``epoch >= 1`` starts: the reference becomes the policy that sampled its pairs.
        Idempotent (the reference records the round it was reset for). Logs
        ``round/reference_reset`` (the 1-based round)."""
        if epoch == 0 or int(self.round) == epoch:
            return {}
        self.reset(policy, epoch)
        rank_zero_info(f"round {epoch + 1}: the reference is now the policy of the round's start")
        return {"round/reference_reset": float(epoch + 1)}


class PrecomputedReference(ReferenceStrategy):
    """One pass of a live reference (``source``) over the train and val splits before training,
    cached on disk (:mod:`.reference_cache`); the source is then freed and the log-probs travel
    in the batch as ``reference_chosen`` / ``reference_rejected`` columns added to the data
    module's splits. A later run with the same data, tokenization, reference and tokenizer
    reads the cache and runs no reference at all. Pairwise losses only. With ``beyond_shared``
    (a loss that reads per-token reference log-probs: LD-DPO) each response's sum beyond its
    pair's shared length is cached and carried too (``SequenceLogProbs.beyond_shared``).

    Attributes:
        batches_computed: reference batches run by this process (0 when the cache was read).
    """

    def __init__(self, source: ReferenceStrategy, cache_dir: str, reference_id: str, beyond_shared: bool = False) -> None:
        super().__init__()
        self.source: ReferenceStrategy | None = source
        self.cache_dir = cache_dir
        self.reference_id = reference_id
        self.beyond_shared = beyond_shared
        self.batches_computed = 0

    def prepare(self, context: PrepareContext) -> None:
        datamodule = context.datamodule
        if datamodule is None or self.source is None:
            return
        tokenizer_id = tokenizer_fingerprint(context.tokenizer)
        results: dict[str, Tensor] = {}
        for split, dataset in datamodule.splits.items():
            key = reference_cache.cache_key(dataset, self.reference_id, tokenizer_id, self.beyond_shared)
            path = reference_cache.cache_file(self.cache_dir, key)

            def compute(split: str = split) -> Tensor:
                loader = datamodule.ordered_loader(split)
                rank_zero_info(f"precomputing reference log-probs for {len(loader.dataset)} rows ({len(loader)} batches)")
                self.batches_computed += len(loader)
                self.source.to(context.device)
                return reference_cache.compute(
                    lambda batch: self.source.logprobs(context.policy, batch, context.compute), loader, context.device,
                    self.beyond_shared,
                )

            values, computed = reference_cache.load_or_compute(
                path, key, len(dataset), compute, context.is_global_zero,
                lambda: context.barrier("reference_cache"), width=len(reference_cache.columns(self.beyond_shared)),
            )
            rank_zero_info(f"reference log-probs for {split}: {'computed and saved to' if computed else 'read from'} {path}")
            results[split] = values
        for split, values in results.items():  # after every pass: the passes' batches carry no such columns
            names = reference_cache.columns(self.beyond_shared)
            datamodule.add_columns(split, {name: values[:, i].tolist() for i, name in enumerate(names)})
        self.source = None  # freed: training runs the policy alone

    def logprobs(self, policy, batch, compute) -> SequenceLogProbs:
        if reference_cache.COLUMNS[0] not in batch:
            raise RuntimeError(
                f"{REFERENCE_KEY}.precompute: this batch has no reference log-probs; the data module must be "
                "set up through the trainer (trainer.fit / validate) so they can be attached"
            )
        counts = batch["completion_mask"][:, 1:].sum(-1)
        tail = None
        if self.beyond_shared:
            tail = torch.cat([batch[c] for c in reference_cache.BEYOND_SHARED_COLUMNS])
        return SequenceLogProbs(torch.cat([batch[c] for c in reference_cache.COLUMNS]), counts, beyond_shared=tail)


ReferenceReset = Literal["never", "per_round"]


@dataclass
class ReferenceSpec:
    """The ``reference`` section of a recipe (``model.init_args.reference``): where the
    reference comes from and how it changes during training. Every field is optional; an
    absent section is a frozen copy of the initial policy (or, with LoRA, the policy with its
    adapters off). :func:`choose_reference` maps it to one strategy.

    Attributes:
        model: a separate frozen reference (hub id / folder, or a config); ``None``: the initial
            policy.
        precompute: before training, run the reference once over the train and val splits,
            cache its log-probs on disk (:mod:`.reference_cache`) and free it: training then
            runs the policy alone. Pairwise losses only; not with ``update`` or ``reset: per_round``.
        cache_dir: where that cache lives; ``None``: ``~/.cache/dpo_lightning/reference_logps``.
        update: TR-DPO's moving reference (:class:`ReferenceUpdate`); full fine-tuning only.
        reset: ``per_round``: at the start of every training epoch after the first the
            reference becomes the policy (:class:`RoundReference`; iterative DPO's rounds);
            ``never``: it does not. ``None``: the module's default (``never``;
            :class:`~.iterative.IterativePreferenceModule`: ``per_round``).
        bema: the reference is the bias-corrected EMA of the policy's weights
            (:class:`BEMAReference`, :class:`~.bema.BEMAUpdate`); full fine-tuning only.
    """

    model: ModelSpec | None = None
    precompute: bool = False
    cache_dir: str | None = None
    update: ReferenceUpdate | None = None
    reset: ReferenceReset | None = None
    bema: BEMAUpdate | None = None

    def check(self, *, needs_reference: bool, pairwise: bool, adapters: bool) -> None:
        """Refuse settings that cannot go together, naming the recipe key; needs no model, so a
        module runs it before loading one.

        Args:
            needs_reference: the loss's ``needs_reference``.
            pairwise: the loss trains on pairs (precomputation needs fixed pairs).
            adapters: LoRA adapters will be added to the policy.
        """
        if self.reset not in (None, "never", "per_round"):
            raise ValueError(f"{REFERENCE_KEY}.reset must be never or per_round, got {self.reset!r}")
        if not needs_reference:
            for name in ("model", "precompute", "update", "bema"):
                if getattr(self, name):
                    raise ValueError(f"{REFERENCE_KEY}.{name} is set but the loss uses no reference model")
            if self.reset == "per_round":
                raise ValueError(f"{REFERENCE_KEY}.reset: per_round is set but the loss uses no reference model")
            return
        if self.precompute and not pairwise:
            raise ValueError(
                f"{REFERENCE_KEY}.precompute needs a pairwise loss: the cache holds one chosen and one "
                "rejected log-prob per pair (KTO's KL pairs change every batch; unpaired rows, as BCOLoss trains on, "
                "are not cached); set it to false"
            )
        if self.reset == "per_round":
            clash = [name for name, value in (("lora", adapters), ("reference.update", self.update),
                                              ("reference.bema", self.bema), ("reference.precompute", self.precompute))
                     if value]
            if clash:
                raise ValueError(
                    f"{REFERENCE_KEY}.reset: per_round copies the policy into the reference each round, which "
                    f"{clash[0]} does not allow (LoRA's reference is the base model without adapters; a moving or "
                    f"precomputed reference is another strategy); set reference: {{reset: never}} or remove "
                    f"{MODEL_KEY}.{clash[0]}"
                )
        if self.update is not None:
            self.update.validate()
            if self.precompute:
                raise ValueError(f"{REFERENCE_KEY}: a moving reference (update) cannot be precomputed; "
                                 "set precompute: false or remove update")
            if adapters:
                raise ValueError(f"{REFERENCE_KEY}.update needs full fine-tuning; it cannot move a LoRA reference")
        if self.bema is not None:
            self.bema.validate()
            other = "update" if self.update is not None else "precompute" if self.precompute else None
            if other is not None:
                raise ValueError(
                    f"{REFERENCE_KEY}: bema and {other} are two ways to set the reference; keep one "
                    f"(a BEMA reference moves every step, so it cannot be precomputed either)"
                )
            if adapters:
                raise ValueError(
                    f"{REFERENCE_KEY}.bema needs full fine-tuning: it averages every trained weight, and with LoRA "
                    "the reference is the base model under the adapters, which the averages would overwrite "
                    "(TRL's PEFT path writes them into the policy's own base weights); remove lora or reference.bema"
                )


#: the flat reference settings of earlier releases -> their field of :class:`ReferenceSpec`
MOVED_SETTINGS = {
    "reference_model": "model",
    "precompute_reference": "precompute",
    "reference_cache_dir": "cache_dir",
    "reference_update": "update",
    "reference_reset": "reset",
}
#: what a moved setting's message shows when its value is not known
_EXAMPLES = {"model": {"name_or_path": "..."}, "precompute": True, "cache_dir": "...",
             "update": {"alpha": 0.6, "every_n_steps": 512}, "reset": "per_round"}
_UNKNOWN = object()


def moved_setting_message(name: str, value: Any = _UNKNOWN) -> str:
    """The error for a flat reference setting of earlier releases (``precompute_reference``):
    where it lives now, with its value written in the new place when known::

        model.init_args.precompute_reference moved into the reference section: write `reference: {precompute: true}`
    """
    field = MOVED_SETTINGS[name]
    shown = _EXAMPLES[field] if value is _UNKNOWN else value
    if hasattr(shown, "__dataclass_fields__"):
        shown = {k: v for k, v in vars(shown).items() if not k.startswith("_")}
    text = yaml.safe_dump({"reference": {field: shown}}, default_flow_style=True, width=10**6).strip()
    return f"{MODEL_KEY}.{name} moved into the reference section: write `{text[1:-1]}`"


def refuse_moved_settings(kwargs: Mapping[str, Any]) -> None:
    """Refuse a flat reference setting of earlier releases among a module's keyword arguments
    (``precompute_reference=True``), pointing to the ``reference`` section."""
    for name in kwargs:
        if name in MOVED_SETTINGS:
            raise TypeError(moved_setting_message(name, kwargs[name]) + " (reference=ReferenceSpec(...) in Python)")


def choose_reference(
    spec: ReferenceSpec,
    *,
    needs_reference: bool,
    pairwise: bool,
    policy: nn.Module,
    tokenizer: Any,
    adapters: bool,
    separate_with_adapters: bool,
    reference_id: str,
    reference_tokens: bool = False,
) -> ReferenceStrategy:
    """The one place that maps a recipe's reference settings to a strategy.

    Args:
        spec: the ``reference`` section (:class:`ReferenceSpec`), its ``reset`` resolved by the
            module (``None`` counts as ``never``).
        needs_reference: the loss's ``needs_reference``.
        pairwise: the loss trains on pairs (precomputation needs fixed pairs).
        policy: the initial policy, before LoRA adapters are added.
        tokenizer: the policy's tokenizer (a separate reference must share it).
        adapters: LoRA adapters will be added to the policy.
        separate_with_adapters: ``lora.separate_reference``.
        reference_id: what the precomputed cache is keyed by (the reference's spec).
        reference_tokens: the loss reads per-token reference log-probs (``needs_reference_tokens``);
            a precomputed reference then caches the sums beyond the shared length as well.
    """
    spec.check(needs_reference=needs_reference, pairwise=pairwise, adapters=adapters)
    if not needs_reference:
        return NoReference()

    def network() -> nn.Module:
        return copy.deepcopy(policy) if spec.model is None else SeparateModel(spec.model, policy, tokenizer).network

    if spec.reset == "per_round":
        return RoundReference(network(), policy)
    if spec.update is not None:
        return MovingReference(network(), policy, spec.update)
    if spec.bema is not None:
        return BEMAReference(network(), policy, spec.bema)
    if spec.model is not None:
        live: ReferenceStrategy = SeparateModel(spec.model, policy, tokenizer)
    elif adapters and not separate_with_adapters:
        live = AdaptersDisabled()
    else:
        live = FrozenCopy(policy)
    if not spec.precompute:
        return live
    return PrecomputedReference(live, spec.cache_dir or reference_cache.DEFAULT_CACHE_DIR, reference_id,
                                beyond_shared=reference_tokens)
