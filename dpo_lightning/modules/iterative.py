"""Iterative preference optimisation's module side: a reference reset to the policy at the start
of every round (an epoch of :class:`~dpo_lightning.iterative.IterativePairsDataModule`).

Iterative DPO (Xiong et al. 2024, "RLHF Workflow", arXiv 2405.07863; Yuan et al. 2024,
Self-Rewarding LMs; OpenRLHF's iterative DPO) trains round after round on pairs sampled from
the policy of the round's start. Whether the reference stays the initial (SFT) policy or
follows the policy differs between papers; ``reference_reset`` chooses:

* ``"per_round"``: at the start of every round after the first, ``pi_ref <- pi`` (the policy
  that sampled the round's pairs). Each round is then a DPO run around the previous round's
  model, with a KL leash to it, not to the SFT model.
* ``"never"``: the reference stays what :class:`PreferenceModule` built (the initial policy,
  or ``reference_model``): a KL leash to the start of training across all rounds.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..losses import PreferenceLoss
from ..models import ModelSpec
from .preference import PreferenceModule
from .reference import FrozenNetwork

ReferenceReset = Literal["never", "per_round"]
MODEL_KEY = "model.init_args"


class RoundReference(FrozenNetwork):
    """A frozen reference that is set to the policy at the start of each round (epoch).

    ``round`` (a buffer) is the 0-based round whose start last reset it (``-1``: never reset,
    the network is the initial reference). Its weights and ``round`` are saved in checkpoints:
    a run resumed in the middle of a round gets the reference of that round's start back (the
    policy has moved on since), and one resumed at a round boundary resets it again.
    """

    def __init__(self, network: nn.Module, policy: nn.Module) -> None:
        super().__init__(network)
        if [n for n, _ in network.named_parameters()] != [n for n, _ in policy.named_parameters()]:
            raise ValueError(
                f"{MODEL_KEY}.reference_reset: per_round needs a reference with the policy's architecture "
                "(the policy's weights are copied into it); drop reference_model or set reference_reset: never"
            )
        self.register_buffer("round", torch.full((), -1, dtype=torch.long))

    @torch.no_grad()
    def reset(self, policy: nn.Module, round_index: int) -> None:
        """``reference <- policy`` (parameters, in the reference's dtype), marked as round ``round_index``."""
        for ref, new in zip(self.network.parameters(), policy.parameters()):
            ref.copy_(new.detach().to(ref.dtype))
        self.round.fill_(round_index)

    def on_save_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Keep the reference's current weights and round in the checkpoint."""

    def on_load_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        missing = [k for k in self.state_dict(prefix=prefix) if k not in state_dict]
        if missing:
            raise ValueError(
                "--ckpt_path: the checkpoint holds no per-round reference (it was trained without "
                f"{MODEL_KEY}.reference_reset: per_round); resume with the recipe it was trained with"
            )


class IterativePreferenceModule(PreferenceModule):
    """:class:`PreferenceModule` for iterative DPO: the same training step, losses, reference
    strategies, log-prob paths, metrics and export, plus ``reference_reset``.

    Pair it with :class:`~dpo_lightning.iterative.IterativePairsDataModule` (each epoch is one
    round of pairs sampled from the policy at the round's start), ``trainer.max_epochs`` =
    rounds and ``trainer.reload_dataloaders_every_n_epochs: 1`` (``recipes/iterative_dpo.yaml``).

    Args:
        reference_reset: ``"per_round"`` (default): at the start of every epoch after the
            first the reference becomes a copy of the policy (see :class:`RoundReference`);
            needs a loss with a reference, full fine-tuning (not ``lora``), and neither
            ``reference_update`` nor ``precompute_reference``. ``"never"``: the reference is
            :class:`PreferenceModule`'s.
        model, loss and every other argument: as :class:`PreferenceModule` (passed through).

    Logged at each reset: ``round/reference_reset`` (the 1-based round).
    """

    def __init__(
        self,
        model: ModelSpec,
        loss: PreferenceLoss | None = None,
        reference_reset: ReferenceReset = "per_round",
        **kwargs: Any,
    ) -> None:
        """``kwargs``: :class:`PreferenceModule`'s other arguments (the CLI reads them from its
        signature), so this class follows that one's settings and defaults."""
        if reference_reset not in ("never", "per_round"):
            raise ValueError(f"{MODEL_KEY}.reference_reset must be never or per_round, got {reference_reset!r}")
        if reference_reset == "per_round":
            clash = [name for name in ("lora", "reference_update", "precompute_reference") if kwargs.get(name)]
            if clash:
                raise ValueError(
                    f"{MODEL_KEY}.reference_reset: per_round copies the policy into the reference each round, which "
                    f"{clash[0]} does not allow (LoRA's reference is the base model without adapters; a moving or "
                    "precomputed reference is another strategy); set reference_reset: never or remove "
                    f"{MODEL_KEY}.{clash[0]}"
                )
            if loss is not None and not loss.needs_reference:
                raise ValueError(
                    f"{MODEL_KEY}.reference_reset: per_round, but {type(loss).__name__} uses no reference model; "
                    "set reference_reset: never"
                )
        super().__init__(model=model, loss=loss, **kwargs)
        self.reference_reset = reference_reset
        if reference_reset == "per_round":
            if not isinstance(self.reference, FrozenNetwork):  # pragma: no cover - excluded above
                raise ValueError(f"{MODEL_KEY}.reference_reset: per_round needs a frozen reference network")
            self.reference = RoundReference(self.reference.network, self.policy)

    def on_train_epoch_start(self) -> None:
        """Round ``r >= 1`` (0-based epoch) starts: the reference becomes the policy that sampled
        its pairs. Idempotent (the reference records the round it was reset for)."""
        super().on_train_epoch_start()
        round_index = int(self.current_epoch)
        if not isinstance(self.reference, RoundReference) or round_index == 0:
            return
        if int(self.reference.round) == round_index:
            return
        self.reference.reset(self.policy, round_index)
        rank_zero_info(f"round {round_index + 1}: the reference is now the policy of the round's start")
        for logger in self.loggers:
            logger.log_metrics({"round/reference_reset": float(round_index + 1)}, step=self.global_step)

    def reference_state(self) -> dict[str, Any]:
        """What the reference is now: ``{"strategy", "round"}`` (for logs and tests)."""
        round_index = int(self.reference.round) if isinstance(self.reference, RoundReference) else -1
        return {"strategy": type(self.reference).__name__, "round": round_index}


__all__ = ["IterativePreferenceModule", "RoundReference"]
