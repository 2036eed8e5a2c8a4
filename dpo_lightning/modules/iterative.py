"""Iterative preference optimisation's module side: a reference reset to the policy at the start
of every round (an epoch of :class:`~dpo_lightning.iterative.IterativePairsDataModule`).

Iterative DPO (Xiong et al. 2024, "RLHF Workflow", arXiv 2405.07863; Yuan et al. 2024,
Self-Rewarding LMs; OpenRLHF's iterative DPO) trains round after round on pairs sampled from
the policy of the round's start. Whether the reference stays the initial (SFT) policy or
follows the policy differs between papers; ``reference_reset`` chooses:

* ``"per_round"``: at the start of every round after the first, ``pi_ref <- pi`` (the policy
  that sampled the round's pairs; :class:`~.reference.RoundReference`). Each round is then a
  DPO run around the previous round's model, with a KL leash to it, not to the SFT model.
* ``"never"``: the reference stays what :class:`PreferenceModule` built (the initial policy,
  or ``reference_model``): a KL leash to the start of training across all rounds.
"""

from __future__ import annotations

from typing import Any, Literal

from ..losses import PreferenceLoss
from ..models import ModelSpec
from .preference import PreferenceModule
from .reference import RoundReference, check_per_round

ReferenceReset = Literal["never", "per_round"]
MODEL_KEY = "model.init_args"


class IterativePreferenceModule(PreferenceModule):
    """:class:`PreferenceModule` for iterative DPO: the same training step, losses, reference
    strategies, log-prob paths, metrics and export, plus ``reference_reset``.

    Pair it with :class:`~dpo_lightning.iterative.IterativePairsDataModule` (each epoch is one
    round of pairs sampled from the policy at the round's start), ``trainer.max_epochs`` =
    rounds and ``trainer.reload_dataloaders_every_n_epochs: 1`` (``recipes/iterative_dpo.yaml``).

    Args:
        reference_reset: ``"per_round"`` (default): at the start of every epoch after the
            first the reference becomes a copy of the policy (:class:`~.reference.RoundReference`,
            chosen by :func:`~.reference.choose_reference`); needs a loss with a reference, full
            fine-tuning (not ``lora``), and neither ``reference_update`` nor
            ``precompute_reference``. ``"never"``: the reference is :class:`PreferenceModule`'s.
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
            check_per_round(adapters=kwargs.get("lora") is not None, update=kwargs.get("reference_update"),
                            precompute=bool(kwargs.get("precompute_reference")))
            if loss is not None and not loss.needs_reference:
                raise ValueError(
                    f"{MODEL_KEY}.reference_reset: per_round, but {type(loss).__name__} uses no reference model; "
                    "set reference_reset: never"
                )
        self.reference_reset = reference_reset  # read by reference_options() inside PreferenceModule.__init__
        super().__init__(model=model, loss=loss, **kwargs)

    def reference_options(self) -> dict[str, Any]:
        """``per_round`` for :func:`~.reference.choose_reference`."""
        return {"per_round": self.reference_reset == "per_round"}

    def reference_state(self) -> dict[str, Any]:
        """What the reference is now: ``{"strategy", "round"}`` (for logs and tests)."""
        round_index = int(self.reference.round) if isinstance(self.reference, RoundReference) else -1
        return {"strategy": type(self.reference).__name__, "round": round_index}


__all__ = ["IterativePreferenceModule", "RoundReference"]
