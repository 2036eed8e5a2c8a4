"""BCO: binary classifier optimisation, paired (``BCOPairLoss``) and on unpaired rows (``BCOLoss``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import BatchLayout
from .base import LossOutput, PreferenceLoss, SequenceLogProbs, check_positive, labelled_rows, policy_rewards


def global_sum_count(values: Tensor) -> tuple[Tensor, Tensor]:
    """Detached float64 sum and number of ``values`` ``(N,)`` over every row of every DDP rank
    (all-reduced, as :func:`~dpo_lightning.losses.kto.estimate_kl`); two scalars."""
    values = values.detach().double()
    total = torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return total[0], total[1]


def global_mean(values: Tensor) -> Tensor:
    """Detached float64 mean of ``values`` ``(N,)`` over every row of every DDP rank; a scalar."""
    total, count = global_sum_count(values)
    return total / count.clamp(min=1)


class RunningMean(nn.Module):
    """The running reward shift ``delta``: a weighted mean of the values folded in so far, each
    update bringing one value (a batch mean) and its weight (the rows behind it, or 1 per step).
    ``delta = 0`` before the first update.

    Buffers (saved in ``state_dict``, hence in Lightning checkpoints, and restored on resume):
        mean: ``()`` float64, the running mean.
        count: ``()`` float64, the total weight folded in (rows for :class:`BCOLoss`, steps for
            :class:`BCOPairLoss`).

    The buffers stay float64 whatever dtype the module is cast to (``.half()``, ``.to(torch.bfloat16)``,
    a ``*-true`` precision plugin, DeepSpeed): a cast would round the mean and stop ``count`` at
    256 in bf16. Device moves apply as usual. Not covered: FSDP's mixed precision casts buffers
    itself (Lightning sets its ``buffer_dtype`` to the precision's dtype), so under FSDP the
    shift is held in that dtype.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RunningMean:
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)  # the device move only, exactly
        return self

    @torch.no_grad()
    def update(self, value: Tensor, weight: float | Tensor = 1.0) -> None:
        """Fold one scalar of weight ``weight > 0`` into the mean:
        ``count += weight; mean += (value - mean) * weight / count``. A non-finite value is
        skipped (it would poison every later step), and so is a zero weight."""
        value = value.detach().to(self.mean)
        weight = torch.as_tensor(weight).detach().to(self.mean)
        if not bool(torch.isfinite(value)) or not bool(weight > 0):
            return
        self.count += weight
        self.mean += (value - self.mean) * weight / self.count


class _RewardShift(PreferenceLoss):
    """Shared by the BCO losses: the running reward shift, updated in training mode only."""

    shift: RunningMean | None
    #: fold each step's batch mean in with the weight of its rows (True) or with weight 1 (False)
    shift_weighted_by_rows: bool = True

    def communicates(self) -> bool:
        """The running shift's batch means are all-reduced over the processes."""
        return self.shift is not None

    def running_shift(self, rewards: Tensor) -> Tensor:
        """``delta`` for this step, a detached scalar in ``rewards``' dtype: in training mode
        the batch mean of ``rewards`` (``beta * h`` of every row, both classes, all DDP ranks)
        is folded into the running mean first, weighted by its number of rows or by 1
        (:attr:`shift_weighted_by_rows`); in eval mode the running mean is only read."""
        if self.shift is None:
            return rewards.new_zeros(())
        if self.training:
            total, count = global_sum_count(rewards)
            weight = count if self.shift_weighted_by_rows else 1.0
            self.shift.update(total / count.clamp(min=1), weight)
        return self.shift.mean.detach().to(device=rewards.device, dtype=rewards.dtype)


class BCOPairLoss(_RewardShift):
    r"""BCO on pairs (Jung et al., 2024, arXiv 2404.04656; TRL's ``loss_type="bco_pair"``).

    The chosen response is classified as desirable and the rejected one as undesirable, with
    the implicit reward ``r = beta * h``, ``h = log pi(y|x) - log pi_ref(y|x)`` (summed over
    completion tokens) as the classifier's logit::

        L = -log sigmoid(beta * h_w - delta) - log sigmoid(-(beta * h_l - delta)),  mean over pairs

    ``reward_shift=False`` (default): ``delta = 0``, exactly TRL 1.16's ``bco_pair``.
    ``reward_shift=True``: ``delta`` is the paper's reward shift, the running mean over training
    steps of each step's batch-mean reward (chosen and rejected rewards together, all DDP ranks),
    each step weighing 1 as in TRL's former ``bco_pair`` (TRL < 1.16 folded the scalar
    ``torch.cat((chosen_rewards, rejected_rewards), 0).mean()`` into its ``RunningMoments``), updated
    before it is used in that step and only in training mode (see :class:`BCOLoss`); it is
    logged as ``reward_shift``.

    Args:
        beta: > 0, default 0.1; typical 0.01 to 0.5.
        reward_shift: use the running reward shift ``delta``. Default False.

    Shapes: ``policy``/``reference`` hold ``(2B,)`` sums (chosen then rejected); the rewards
    returned are ``(B,)`` implicit rewards ``beta * h`` (without ``delta``), detached;
    ``per_pair`` is ``(B,)``.
    """

    shift_weighted_by_rows = False

    def __init__(self, beta: float = 0.1, reward_shift: bool = False) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.reward_shift = bool(reward_shift)
        self.shift = RunningMean() if reward_shift else None

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        if reference is None:
            raise ValueError("BCOPairLoss needs reference log-probs")
        chosen, rejected = policy_rewards(self.beta, policy, reference)
        delta = self.running_shift(torch.cat([chosen, rejected]))
        losses = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
        metrics = {"reward_shift": delta.detach()} if self.shift is not None else {}
        return LossOutput(losses.mean(), chosen.detach(), rejected.detach(), metrics, per_pair=losses)


class BCOLoss(_RewardShift):
    r"""BCO (Jung et al., 2024, arXiv 2404.04656) on unpaired desirable / undesirable rows.

    A binary classifier whose logit is the implicit reward ``r = beta * h``, ``h = log pi(y|x) -
    log pi_ref(y|x)`` (summed over completion tokens), shifted by ``delta``::

        desirable   y:  w_d * -log sigmoid(beta * h - delta)
        undesirable y:  w_u * -log sigmoid(-(beta * h - delta))
        L = mean over the batch's rows

    ``delta`` is the paper's reward shift: the running mean of the rewards ``beta * h`` of
    every training row seen so far (both classes together; under DDP every rank's rows, so all
    ranks hold the same ``delta``). Each step's batch is weighted by its rows, so a short last
    batch of an epoch weighs less than a full one, exactly as TRL's former ``BCOTrainer``, whose
    ``RunningMoments.update`` receives every row's reward and adds ``xs.numel()`` to its count.
    It is updated before it is used in that step's loss and only in training mode: validation
    reads it and never moves it. Each training forward (a micro-batch, under gradient
    accumulation) is one update, as in TRL; a non-finite batch mean is not folded in. Its state
    lives in the buffers ``shift.mean`` / ``shift.count`` (the rows folded in;
    :class:`RunningMean`, float64), so it is saved in checkpoints and restored on resume. It is
    logged as ``reward_shift``.

    Not implemented: the paper's optional underlying distribution matching (UDM), which
    reweights rows by a density ratio from a classifier over prompt embeddings and needs an
    embedding model.

    Batch layout ``UNPAIRED`` (from :class:`~dpo_lightning.data.UnpairedDataModule`, which
    unpairs a paired dataset into one desirable and one undesirable row per pair): the
    log-probs are ``(B,)``, one per labelled completion, and the batch holds ``label`` ``(B,)``
    bool. There are no KL rows. A batch that is all desirable or all undesirable is fine.

    Args:
        beta: > 0, default 0.1; typical 0.01 to 0.5.
        desirable_weight: ``w_d`` > 0, default 1.0.
        undesirable_weight: ``w_u`` > 0, default 1.0; raise the smaller class's weight when the
            classes are unbalanced.

    Returns rewards ``beta * h`` (without ``delta``), detached: ``(n_d,)`` for the desirable
    rows as ``chosen_rewards`` and ``(n_u,)`` for the undesirable ones as ``rejected_rewards``,
    and the matching policy log-probs as ``chosen_logps`` / ``rejected_logps``.
    """

    batch_layout = BatchLayout.UNPAIRED

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        self.desirable_weight = check_positive("desirable_weight", desirable_weight)
        self.undesirable_weight = check_positive("undesirable_weight", undesirable_weight)
        self.shift = RunningMean()

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        label = labelled_rows("BCOLoss", policy, reference, batch)
        rewards = self.beta * (policy.sums - reference.sums)
        delta = self.running_shift(rewards)
        logits = rewards - delta
        desirable = -self.desirable_weight * F.logsigmoid(logits)
        undesirable = -self.undesirable_weight * F.logsigmoid(-logits)
        losses = torch.where(label, desirable, undesirable)
        detached = rewards.detach()
        return LossOutput(
            losses.mean(),
            detached[label],
            detached[~label],
            {"reward_shift": delta.detach()},
            chosen_logps=policy.sums[label].detach(),
            rejected_logps=policy.sums[~label].detach(),
        )


__all__ = ["BCOLoss", "BCOPairLoss", "RunningMean", "global_mean", "global_sum_count"]
