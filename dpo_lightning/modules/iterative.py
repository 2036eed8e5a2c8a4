"""Iterative preference optimisation's module side: a reference reset to the policy at the start
of every round (an epoch of :class:`~dpo_lightning.iterative.IterativePairsDataModule`).

Iterative DPO (Xiong et al. 2024, "RLHF Workflow", arXiv 2405.07863; Yuan et al. 2024,
Self-Rewarding LMs; OpenRLHF's iterative DPO) trains round after round on pairs sampled from
the policy of the round's start. Whether the reference stays the initial (SFT) policy or
follows the policy differs between papers; ``reference.reset`` chooses:

* ``"per_round"`` (this module's default): at the start of every round after the first,
  ``pi_ref <- pi`` (the policy that sampled the round's pairs; :class:`~.reference.RoundReference`).
  Each round is then a DPO run around the previous round's model, with a KL leash to it, not
  to the SFT model.
* ``"never"``: the reference stays what :class:`PreferenceModule` built (the initial policy,
  or ``reference.model``): a KL leash to the start of training across all rounds.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..losses import PreferenceLoss
from ..models import ModelSpec
from .preference import PreferenceModule
from .reference import REFERENCE_KEY, ReferenceReset, RoundReference, refuse_moved_settings


class IterativePreferenceModule(PreferenceModule):
    """:class:`PreferenceModule` for iterative DPO: the same training step, losses, reference
    strategies, log-prob paths, metrics and export; ``reference.reset`` defaults to ``per_round``.

    Pair it with :class:`~dpo_lightning.iterative.IterativePairsDataModule` (each epoch is one
    round of pairs sampled from the policy at the round's start), ``trainer.max_epochs`` =
    rounds and ``trainer.reload_dataloaders_every_n_epochs: 1`` (``recipes/iterative_dpo.yaml``).

    Args:
        model, loss and every other argument: as :class:`PreferenceModule` (passed through).
            ``reference.reset``: ``"per_round"`` (default when unset): at the start of every
            epoch after the first the reference becomes a copy of the policy
            (:class:`~.reference.RoundReference`, chosen by :func:`~.reference.choose_reference`);
            needs a loss with a reference, full fine-tuning (not ``lora``), and neither
            ``reference.update`` nor ``reference.precompute``. ``"never"``: the reference is
            :class:`PreferenceModule`'s.

    Logged at each reset: ``round/reference_reset`` (the 1-based round).
    """

    default_reset: ClassVar[ReferenceReset] = "per_round"

    def __init__(
        self,
        model: ModelSpec,
        loss: PreferenceLoss | None = None,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: :class:`PreferenceModule`'s other arguments (the CLI reads them from its
        signature), so this class follows that one's settings and defaults."""
        refuse_moved_settings(kwargs)
        reference = kwargs.get("reference")
        reset = (reference.reset if reference is not None else None) or self.default_reset
        if reset == "per_round" and loss is not None and not loss.needs_reference:
            raise ValueError(
                f"{REFERENCE_KEY}.reset: per_round (this module's default), but {type(loss).__name__} uses no "
                "reference model; set reference: {reset: never}"
            )
        super().__init__(model=model, loss=loss, **kwargs)

    def reference_state(self) -> dict[str, Any]:
        """What the reference is now: ``{"strategy", "round"}`` (for logs and tests)."""
        round_index = int(self.reference.round) if isinstance(self.reference, RoundReference) else -1
        return {"strategy": type(self.reference).__name__, "round": round_index}


__all__ = ["IterativePreferenceModule", "RoundReference"]
