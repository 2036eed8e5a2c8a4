"""The extension point: every preference loss subclasses :class:`PreferenceLoss`.

A loss receives the policy's (and, if it asks for one, the reference's) per-sequence
log-probabilities over completion tokens, plus the collated batch, and returns a
:class:`LossOutput`. The training module never asks which loss it holds: it reads the
class attributes below to know what to build and what the data must carry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import BatchLayout, DataRequirements


@dataclass(frozen=True)
class SequenceLogProbs:
    """Per-sequence log-probabilities summed over completion tokens.

    Attributes:
        sums: ``(N,)`` sum over completion tokens of ``log pi(y_t | x, y_<t)``.
        counts: ``(N,)`` number of completion tokens in each sequence.
        tokens: ``(N, T - 1)`` per-token log-probs, column ``t`` scoring token ``t + 1`` of the
            batch's ``input_ids`` (0 outside completions), or ``None``. Only computed when the
            loss sets ``needs_token_logprobs`` (LD-DPO): losses that read sums only pay
            nothing for it.
        token_mask: ``(N, T - 1)`` bool, True where ``tokens`` holds a completion token; set
            together with ``tokens``.
        beyond_shared: ``(N,)`` for a paired batch, the part of ``sums`` over the completion
            tokens beyond the pair's shared length ``min(|y_w|, |y_l|)``, or ``None``. What LD-DPO
            reads from a precomputed reference, which caches sums and not per-token values
            (:func:`~dpo_lightning.losses.length.length_desensitized`).
        square_mass: ``(N,)`` detached sum over completion tokens of ``log sum_v pi(v | x, y_<t)^2``
            (the log of the probability the model gives on average to its own samples there),
            or ``None``. Only computed when the loss sets ``needs_square_mass`` (WPO's aligned
            weights); it needs the whole vocabulary distribution at every completion position.

    For a paired batch ``N = 2B``: rows ``[0, B)`` are the chosen responses and rows
    ``[B, 2B)`` the rejected ones, in the same pair order. For an unpaired batch with KL rows
    (KTO) rows ``[0, B)`` are the labelled completions and ``[B, 2B)`` the mismatched
    prompt/completion pairs used for the KL estimate. For an unpaired batch without them
    (BCO, ``BatchLayout.UNPAIRED``) ``N = B`` labelled completions: read ``sums`` directly,
    ``chosen`` / ``rejected`` (halves) mean nothing there.
    """

    sums: Tensor
    counts: Tensor
    tokens: Tensor | None = None
    token_mask: Tensor | None = None
    beyond_shared: Tensor | None = None
    square_mass: Tensor | None = None

    @property
    def means(self) -> Tensor:
        """``(N,)`` per-token mean log-prob (length-normalised)."""
        return self.sums / self.counts.clamp(min=1).to(self.sums.dtype)

    def _half(self, values: Tensor, second: bool) -> Tensor:
        n = values.shape[0]
        if n % 2:
            raise ValueError(f"expected an even number of sequences (2B), got {n}")
        return values[n // 2 :] if second else values[: n // 2]

    @property
    def chosen(self) -> Tensor:
        """``(B,)`` summed log-probs of the chosen responses."""
        return self._half(self.sums, second=False)

    @property
    def rejected(self) -> Tensor:
        """``(B,)`` summed log-probs of the rejected responses."""
        return self._half(self.sums, second=True)

    @property
    def chosen_means(self) -> Tensor:
        """``(B,)`` per-token mean log-probs of the chosen responses."""
        return self._half(self.means, second=False)

    @property
    def rejected_means(self) -> Tensor:
        """``(B,)`` per-token mean log-probs of the rejected responses."""
        return self._half(self.means, second=True)


@dataclass
class LossOutput:
    """What every loss returns.

    Attributes:
        loss: scalar tensor to minimise (carries the graph).
        chosen_rewards: ``(B,)`` detached implicit rewards of the chosen responses.
        rejected_rewards: ``(B,)`` detached implicit rewards of the rejected responses.
        metrics: extra detached scalars or ``(B,)`` tensors to log (averaged over the batch).
        chosen_logps / rejected_logps: policy log-probs to log for each side; ``None`` means
            the first / second half of the policy's sums (set them for unpaired losses).
        per_pair: ``(B,)`` the loss of each pair before the batch mean (``loss ==
            per_pair.mean()``), carrying the graph; ``None`` when the loss is not a mean over
            pairs (AOT sorts its pairs, KTO averages rows). Wrappers that weight pairs (WPO) need it.
        token_part / tokens: the part of ``loss`` (a scalar carrying the graph) that is a mean
            over the batch's completion tokens, and that token count (a scalar):
            :class:`~.rpo.ChosenNLLLoss` ``average="tokens"`` sets them, a mixture adds up its
            components' parts. ``None``: all of ``loss`` is a mean over the batch's rows. Read by
            :func:`global_batch_loss`, which weighs each part by this process's share of the
            global batch under DDP.

    For unpaired losses (KTO) the "chosen" side is the desirable rows and the "rejected" side
    the undesirable ones; their lengths may differ and reward accuracy is then not defined.
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    chosen_logps: Tensor | None = None
    rejected_logps: Tensor | None = None
    per_pair: Tensor | None = None
    token_part: Tensor | None = None
    tokens: Tensor | None = None


def mean_rows(out: LossOutput, paired: bool) -> Tensor:
    """How many rows ``out.loss`` is a mean over: the pairs of a paired batch (``(B,)`` chosen
    rewards; TPO's triples too), every labelled row of an unpaired one (desirable and
    undesirable together); a
    scalar tensor on the rewards' device. The same count :class:`~dpo_lightning.metrics.PreferenceMetrics`
    weighs a batch's loss by."""
    rows = out.chosen_rewards.numel() + (0 if paired else out.rejected_rewards.numel())
    return torch.tensor(float(rows), device=out.chosen_rewards.device)


def global_batch_loss(
    loss: Tensor,
    rows: Tensor,
    sum_over_ranks: Callable[[Tensor], Tensor],
    world_size: int,
    token_part: Tensor | None = None,
    tokens: Tensor | None = None,
) -> Tensor:
    r"""This process's loss, scaled so that DDP's gradient average is the gradient of the global
    batch's loss, whatever the rows (or tokens) each process holds.

    DDP averages the gradients of the ``W`` processes with equal weights. When process ``r``'s
    loss is a mean over its ``n_r`` rows, that average is the mean of per-process means, not the
    mean over the ``N = sum_r n_r`` rows of the global batch (a process with 3 pairs and one with
    1 would weigh each of the latter's pairs 3 times as much). Scaling by the process's share::

        L'_r = L_r * n_r / mean_r(n_r)        mean_r(L'_r) = sum_r n_r L_r / N

    gives exactly the global-batch mean. A ``token_part`` (a mean over ``tokens`` completion
    tokens, e.g. an SFT term) is scaled by the process's share of the global tokens instead, and
    the rest of ``loss`` by its share of the rows. A process with no rows (``n_r = 0``) gets a
    zero weight. With ``world_size == 1`` ``loss`` is returned as it is (no collective).

    Args:
        loss: scalar, this process's batch mean (carrying the graph).
        rows: scalar count of the rows ``loss`` (less ``token_part``) averages over (:func:`mean_rows`).
        sum_over_ranks: sums a ``(2,)`` float64 tensor over every process (an ``all_reduce``);
            every process must call this function once per training batch, or the others wait.
        world_size: ``W``.
        token_part / tokens: see :class:`LossOutput`.
    Returns:
        the scaled scalar loss, ``loss``'s dtype.
    """
    if world_size == 1:
        return loss
    zero = torch.zeros((), dtype=torch.float64, device=loss.device)
    counts = torch.stack([rows.detach().to(zero), zero if tokens is None else tokens.detach().to(zero)])
    mean = sum_over_ranks(counts) / world_size
    share = torch.where(mean > 0, counts / mean.clamp(min=torch.finfo(torch.float64).tiny), zero).to(loss.dtype)
    if token_part is None:
        return loss * share[0]
    return (loss - token_part) * share[0] + token_part * share[1]


#: Where a loss's arguments sit in a recipe, named in error messages.
LOSS_KEY = "model.init_args.loss.init_args"


@dataclass(frozen=True)
class LossNeeds:
    """What a loss needs, as one value: a plain loss declares it with the class attributes of
    :class:`PreferenceLoss` (``needs`` is derived from them); a loss built from other losses
    (:class:`ComposedLoss`: mixtures, wrappers) combines its parts' values.

    Attributes:
        reference: reference log-probs (``needs_reference``).
        layout: the batch layout (``batch_layout``).
        columns: extra ``(B,)`` batch columns read (``score_columns``).
        token_logprobs: per-token policy log-probs (``needs_token_logprobs``).
        reference_tokens: per-token reference log-probs (``needs_reference_tokens``).
        square_mass: the policy's ``SequenceLogProbs.square_mass`` (``needs_square_mass``).
    """

    reference: bool = True
    layout: BatchLayout = BatchLayout.PAIRS
    columns: tuple[str, ...] = ()
    token_logprobs: bool = False
    reference_tokens: bool = False
    square_mass: bool = False

    @classmethod
    def union(cls, parts: Sequence[LossNeeds]) -> LossNeeds:
        """What losses trained together need: any part's reference and per-token values, every
        part's columns (first-seen order), their one layout (``ValueError`` if they differ).
        The square mass is not passed on: only the outermost loss asks for it (WPO's aligned
        weights go around a mixture, not inside one)."""
        layouts = {part.layout for part in parts}
        if len(layouts) != 1:
            raise ValueError(f"losses trained together must share one batch layout, got {sorted(l.value for l in layouts)}")
        return cls(
            reference=any(part.reference for part in parts),
            layout=parts[0].layout,
            columns=tuple(dict.fromkeys(c for part in parts for c in part.columns)),
            token_logprobs=any(part.token_logprobs for part in parts),
            reference_tokens=any(part.reference_tokens for part in parts),
        )


class PreferenceLoss(nn.Module, ABC):
    """Base class of all preference losses.

    Subclasses set the class attributes that say what they need and implement
    :meth:`forward`. Everything else (reference model, data columns, metrics) follows.

    Class attributes:
        needs_reference: build a frozen reference model (or disable LoRA adapters) and pass
            its log-probs as ``reference``. ``False`` means no reference is ever loaded.
        batch_layout: how the batch's rows are laid out (:class:`~dpo_lightning.contract.BatchLayout`):
            ``PAIRS`` (default), ``UNPAIRED_WITH_KL`` (KTO) or ``UNPAIRED`` (BCO). The data module is told this
            through :attr:`data_requirements` and refuses a layout it does not produce.
        score_columns: dataset columns the loss reads from the batch (e.g. ODPO's scores);
            a dataset without them is rejected at setup.
        needs_token_logprobs: ask for per-token log-probs (``SequenceLogProbs.tokens``) as
            well as the sums. Default False.
        needs_reference_tokens: the per-token values are read from the reference too (LD-DPO);
            a precomputed reference then also caches each response's sum beyond its pair's
            shared length (``SequenceLogProbs.beyond_shared``), all LD-DPO reads from it.
        needs_square_mass: ask for the policy's ``SequenceLogProbs.square_mass`` (WPO's aligned
            weights). Default False.
    """

    needs_reference: ClassVar[bool] = True
    batch_layout: ClassVar[BatchLayout] = BatchLayout.PAIRS
    score_columns: ClassVar[tuple[str, ...]] = ()
    needs_token_logprobs: ClassVar[bool] = False
    needs_reference_tokens: ClassVar[bool] = False
    needs_square_mass: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "paired" in vars(cls):
            raise TypeError(
                f"{cls.__name__} sets `paired`, which was replaced by `batch_layout`: write "
                "`batch_layout = BatchLayout.UNPAIRED_WITH_KL` (from dpo_lightning.contract) for "
                "unpaired rows, or nothing for pairs"
            )

    @property
    def needs(self) -> LossNeeds:
        """What this loss needs, from its class attributes."""
        return LossNeeds(
            reference=self.needs_reference, layout=self.batch_layout, columns=tuple(self.score_columns),
            token_logprobs=self.needs_token_logprobs, reference_tokens=self.needs_reference_tokens,
            square_mass=self.needs_square_mass,
        )

    def communicates(self) -> bool:
        """Whether :meth:`forward` runs a collective (an ``all_reduce``) under DDP, as KTO's KL
        estimate and BCO's reward shift do: every process must then run the loss on every
        training batch. Here: whether any loss inside this one does (a mixture's parts)."""
        return any(m.communicates() for m in self.modules() if m is not self and isinstance(m, PreferenceLoss))

    @property
    def data_requirements(self) -> DataRequirements:
        """What this loss needs from the data module (layout and extra columns)."""
        return DataRequirements(self.batch_layout, tuple(self.score_columns))

    @property
    def pairwise(self) -> bool:
        """True when batches hold (chosen, rejected) pairs."""
        return self.batch_layout == BatchLayout.PAIRS

    @abstractmethod
    def forward(
        self,
        policy: SequenceLogProbs,
        reference: SequenceLogProbs | None,
        batch: Mapping[str, Any],
    ) -> LossOutput:
        """Compute the loss.

        Args:
            policy: the policy's log-probs, ``(2B,)`` sums and counts.
            reference: the reference's log-probs (same layout), or ``None`` when
                ``needs_reference`` is ``False``.
            batch: the collated batch (``input_ids`` ``(2B, T)``, optional score columns ``(B,)``).
        """


class ComposedLoss(PreferenceLoss):
    """A loss built from other losses (a mixture, a wrapper): it declares nothing itself; what
    it needs is :attr:`needs`, set once in ``__init__`` from its parts' (``self.set_needs``), and
    the need attributes read from it."""

    _needs: LossNeeds = LossNeeds()

    def set_needs(self, needs: LossNeeds) -> None:
        self._needs = needs

    @property
    def needs(self) -> LossNeeds:
        return self._needs

    needs_reference = property(lambda self: self._needs.reference)  # type: ignore[assignment]
    batch_layout = property(lambda self: self._needs.layout)  # type: ignore[assignment]
    score_columns = property(lambda self: self._needs.columns)  # type: ignore[assignment]
    needs_token_logprobs = property(lambda self: self._needs.token_logprobs)  # type: ignore[assignment]
    needs_reference_tokens = property(lambda self: self._needs.reference_tokens)  # type: ignore[assignment]
    needs_square_mass = property(lambda self: self._needs.square_mass)  # type: ignore[assignment]


def smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """cDPO's conservative loss, elementwise: ``-(1 - eps) log sigmoid(x) - eps log sigmoid(-x)``
    for logits ``x`` of any shape (``eps = 0``: the plain sigmoid loss)."""
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def labelled_rows(name: str, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]) -> Tensor:
    """``label`` ``(B,)`` bool of an ``UNPAIRED`` batch, after checking that the loss ``name`` got
    reference log-probs and one log-prob per labelled row (a clear error naming the fix if not)."""
    if reference is None:
        raise ValueError(f"{name} needs reference log-probs")
    if "label" not in batch:
        raise KeyError(f"{name} needs the batch column 'label'; use UnpairedDataModule")
    label = batch["label"].bool()
    if policy.sums.shape != label.shape or reference.sums.shape != label.shape:
        raise ValueError(
            f"{name} expects one log-prob per labelled row (the 'unpaired' layout): got policy "
            f"{tuple(policy.sums.shape)}, reference {tuple(reference.sums.shape)} for {label.numel()} labels; "
            "connect the data module with module.data_requirements"
        )
    return label


def check_positive(name: str, value: float) -> float:
    """Validate a hyperparameter that must be finite and > 0 and return it as float."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{LOSS_KEY}.{name} must be > 0 and finite, got {value}")
    return float(value)


def check_nonnegative(name: str, value: float) -> float:
    """Validate a hyperparameter that must be finite and >= 0 and return it as float."""
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{LOSS_KEY}.{name} must be >= 0 and finite, got {value}")
    return float(value)


def check_range(name: str, value: float, low: float, high: float) -> float:
    """Validate ``low <= value < high`` (finite bounds) and return it as float."""
    if not (low <= value < high and math.isfinite(value)):
        raise ValueError(f"{LOSS_KEY}.{name} must be in [{low}, {high}), got {value}")
    return float(value)


def policy_rewards(
    beta: float, policy: SequenceLogProbs, reference: SequenceLogProbs | None
) -> tuple[Tensor, Tensor]:
    """``r = beta * (log pi(y|x) - log pi_ref(y|x))`` for chosen and rejected, each ``(B,)``,
    carrying the graph (for losses that act on each side's reward: APO, NCA, BCO)."""
    if reference is None:
        raise ValueError("this loss needs reference log-probs but none were given")
    return beta * (policy.chosen - reference.chosen), beta * (policy.rejected - reference.rejected)


def implicit_rewards(
    beta: float, policy: SequenceLogProbs, reference: SequenceLogProbs | None
) -> tuple[Tensor, Tensor]:
    """:func:`policy_rewards`, detached: what every reference-based loss logs, each ``(B,)``."""
    chosen, rejected = policy_rewards(beta, policy, reference)
    return chosen.detach(), rejected.detach()


#: The f-divergence regularisers of f-DPO (Wang et al., 2023, arXiv 2309.16240), by name.
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

#: Largest exponent :func:`divergence_scores` passes to ``exp`` (as TRL: exp(80) is finite in float32).
_MAX_EXPONENT = 80.0


def check_divergence(divergence: str, alpha: float) -> tuple[str, float]:
    """Validate an f-divergence name and its alpha (finite, ``> 0``); return them.

    f-DPO (arXiv 2309.16240, Theorem 1) needs ``f`` strictly convex with ``0`` outside the domain
    of ``f'``, so that the optimal policy has the closed form the loss relies on. The alpha
    divergence's ``f'(u) = (1 - u^(-alpha)) / alpha`` satisfies both for every ``alpha > 0``
    (``f''(u) = u^(-alpha-1) > 0`` and ``f'(u) -> -inf`` as ``u -> 0``), beyond the paper's (0, 1)
    too; ``alpha = 0`` is its limit ``log u`` (``reverse_kl``); for ``alpha < 0`` ``f'`` stays
    finite at ``u = 0`` and the closed form fails.
    """
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"{LOSS_KEY}.divergence must be one of {', '.join(F_DIVERGENCES)}, got {divergence!r}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(
            f"{LOSS_KEY}.divergence_alpha must be > 0 and finite, got {alpha}: alpha = 0 is the reverse KL "
            "(write divergence: reverse_kl), and below 0 f'(u) stays finite as u -> 0, where f-DPO's closed form fails"
        )
    return divergence, float(alpha)


def divergence_scores(logratios: Tensor, divergence: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    r"""``f'(u)`` at ``u = pi(y|x) / pi_ref(y|x)``, given ``log u`` ``(N,)``; returns ``(N,)``.

    f-DPO replaces DPO's ``beta * log u`` by ``beta * f'(u)``; the normaliser ``log Z(x)`` still
    cancels in the chosen-minus-rejected difference, so only losses built on that difference
    accept a divergence other than reverse KL. Constants of ``f'`` are kept as in TRL so that
    per-side length normalisation (``sigmoid_norm``, IPO) gives TRL's numbers::

        reverse_kl        log u                       (DPO)
        forward_kl        1 - 1/u
        js_divergence     log 2 + log sigmoid(log u)  = log(2u / (1 + u))
        alpha_divergence  (1 - u^(-alpha)) / alpha    (paper's convention: alpha -> 0 is reverse
                                                       KL, alpha = 1 is forward KL; any alpha > 0)

    TRL's ``f_alpha_divergence_coef = c`` computes ``(u^(c-1) - 1) / (c - 1)``, which is this
    with ``alpha = 1 - c``; the two agree at the shared default 0.5, and ``alpha > 1`` is TRL's
    ``c < 0``. Exponents are clamped at
    80 so that a very negative log-ratio gives a large finite score, never ``inf``.
    """
    if divergence == "reverse_kl":
        return logratios
    if divergence == "forward_kl":
        return 1 - torch.exp((-logratios).clamp(max=_MAX_EXPONENT))
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if divergence == "alpha_divergence":
        return (1 - torch.exp((-alpha * logratios).clamp(max=_MAX_EXPONENT))) / alpha
    raise ValueError(f"{LOSS_KEY}.divergence must be one of {', '.join(F_DIVERGENCES)}, got {divergence!r}")


def log_ratio_margin(
    policy: SequenceLogProbs,
    reference: SequenceLogProbs | None,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
) -> Tensor:
    """``d = f'(u_w) - f'(u_l)`` with ``u = pi(y|x) / pi_ref(y|x)``, ``(B,)``. With the default
    reverse KL this is DPO's ``(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``."""
    if reference is None:
        raise ValueError("this loss needs reference log-probs but none were given")
    chosen = divergence_scores(policy.chosen - reference.chosen, divergence, alpha)
    rejected = divergence_scores(policy.rejected - reference.rejected, divergence, alpha)
    return chosen - rejected


__all__ = [
    "F_DIVERGENCES",
    "FDivergence",
    "LossOutput",
    "PreferenceLoss",
    "SequenceLogProbs",
    "check_nonnegative",
    "check_positive",
    "check_divergence",
    "check_range",
    "divergence_scores",
    "global_batch_loss",
    "implicit_rewards",
    "mean_rows",
    "policy_rewards",
    "log_ratio_margin",
]

