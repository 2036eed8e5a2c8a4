"""The one contract between a training module and a data module.

A loss (or a training module without one) states what its batches must hold as
:class:`DataRequirements`; the data module receives it, together with the model's tokenizer,
in one call::

    datamodule.connect(module.tokenizer, module.data_requirements)

The CLI makes that call after building both objects; users of the Python API, scoring and
sampling make the same call. Neither side reads the other's attributes.

Adding a batch layout: a member here, and a data module that declares it as its ``layout``
(it then appears in the error that points a mismatched recipe to the right class).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum


class BatchLayout(str, Enum):
    """How the rows of a collated batch are laid out.

    * ``PAIRS``: ``(2B, T)``: rows ``[0, B)`` are ``prompt + chosen``, rows ``[B, 2B)`` are
      ``prompt + rejected`` of the same pairs (DPO family, reward models).
    * ``UNPAIRED_WITH_KL``: ``(2B, T)``: rows ``[0, B)`` are ``B`` labelled completions
      (``label`` ``(B,)`` bool), rows ``[B, 2B)`` pair each prompt with another row's
      completion, for KTO's KL reference point.
    * ``UNPAIRED``: ``(B, T)``: ``B`` labelled completions (``label`` ``(B,)`` bool, True =
      desirable) and nothing else, for unpaired losses without a KL estimate (BCO): no
      mismatched rows, so no forward pass is spent on them.
    * ``TRIPLES``: ``(3B, T)``: rows ``[0, B)`` are ``prompt + chosen``, ``[B, 2B)``
      ``prompt + rejected`` and ``[2B, 3B)`` ``prompt + gold`` of the same triples (TPO: a gold
      completion besides the pair).
    * ``COMPLETIONS``: ``(B, T)``: one ``prompt + completion`` per row (SFT).
    * ``PROMPTS``: ``(B, T)``: prompts alone, left-padded for generation (online training
      samples the completions itself).
    """

    PAIRS = "pairs"
    UNPAIRED_WITH_KL = "unpaired_with_kl"
    UNPAIRED = "unpaired"
    TRIPLES = "triples"
    COMPLETIONS = "completions"
    PROMPTS = "prompts"


class PairRows(str, Enum):
    """How the training module runs a pair's two sequences, so that length-grouped training
    batches gather rows of similar *width as run* (a batch's content is the same either way).

    With prompt ``P``, chosen ``C`` and rejected ``R`` tokens:

    * ``SEPARATE``: two rows, ``prompt + chosen`` and ``prompt + rejected``: width ``P + max(C, R)``.
    * ``SHARED``: one row ``[prompt; chosen; rejected]`` (``share_prompt: true``): width ``P + C + R``.
    * ``SHARED_ON_CPU``: ``SHARED`` when the trainer runs on a CPU, ``SEPARATE`` elsewhere
      (``share_prompt: auto``, which shares prompts on CPUs only).
    """

    SEPARATE = "separate"
    SHARED = "shared"
    SHARED_ON_CPU = "shared_on_cpu"


@dataclass(frozen=True)
class DataRequirements:
    """What a training module needs from its batches.

    Attributes:
        layout: the batch layout (see :class:`BatchLayout`).
        columns: extra per-row numeric columns the loss reads from the batch, each collated to
            ``(B,)`` float32 (e.g. ODPO's ``score_chosen`` / ``score_rejected``, a reward
            model's ``margin``). A dataset without one of them fails at setup.
        max_positions: the most positions the model can attend over (its config's
            ``max_position_embeddings``), or ``None`` when unknown. A data module whose
            ``max_length`` is larger refuses it at ``connect``. A limit, not a batch property:
            left out of ``==`` (two requirements that differ only here produce the same batches).
        pair_rows: how ``PAIRS`` batches will run (:class:`PairRows`); the width the length-grouped
            sampler groups training rows by. Left out of ``==`` for the same reason (it orders
            batches, it does not change what is tokenized).
    """

    layout: BatchLayout = BatchLayout.PAIRS
    columns: tuple[str, ...] = ()
    max_positions: int | None = field(default=None, compare=False)
    pair_rows: PairRows = field(default=PairRows.SEPARATE, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", BatchLayout(self.layout))
        object.__setattr__(self, "pair_rows", PairRows(self.pair_rows))
        object.__setattr__(self, "columns", tuple(self.columns))
        if self.max_positions is not None and not (isinstance(self.max_positions, int) and self.max_positions >= 1):
            raise ValueError(f"DataRequirements.max_positions must be a positive int or None, got {self.max_positions!r}")

    def with_model_limit(self, model: object) -> DataRequirements:
        """These requirements with ``max_positions`` read from ``model.config.max_position_embeddings``
        (left ``None`` when the config has no such limit)."""
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        return replace(self, max_positions=limit if isinstance(limit, int) and limit > 0 else None)
