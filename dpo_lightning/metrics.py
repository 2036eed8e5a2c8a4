"""torchmetrics classes for preference training; all states sum-reduce, so DDP sync is exact."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric


class RewardAccuracy(Metric):
    """Fraction of pairs with ``chosen_reward > rejected_reward`` strictly (ties count as wrong).

    ``update(chosen (B,), rejected (B,))``; ``compute() -> scalar`` in [0, 1].
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen: Tensor, rejected: Tensor) -> None:
        if chosen.shape != rejected.shape:
            raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ")
        self.correct += (chosen > rejected).sum()
        self.total += chosen.numel()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class RewardMargin(Metric):
    """Mean of ``chosen_reward - rejected_reward`` over all pairs seen.

    ``update(chosen (B,), rejected (B,))``; ``compute() -> scalar``.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total_margin", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen: Tensor, rejected: Tensor) -> None:
        if chosen.shape != rejected.shape:
            raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ")
        self.total_margin += (chosen.double() - rejected.double()).sum()
        self.count += chosen.numel()

    def compute(self) -> Tensor:
        return (self.total_margin / self.count.clamp(min=1)).float()


class SyncFreeMean(MeanMetric):
    """``MeanMetric`` whose update reads nothing back to the host on an accelerator.

    torchmetrics' default (``nan_strategy="warn"``) drops NaN values after checking for them on
    the host: two host syncs per update, ten per training step for :class:`PreferenceMetrics`,
    each stalling a CUDA step until the GPU catches up. On such devices this update drops them by
    giving them zero weight on the device instead (the same mean, without the warning). CPU
    tensors take ``MeanMetric``'s own update: same numbers, same warning.

    ``update(value (N,) or scalar, weight float or broadcastable tensor)``; ``compute() -> scalar``.
    """

    @staticmethod
    def sync_free(device_type: str) -> bool:
        """Whether updates on ``device_type`` take the sync-free path (all but the CPU)."""
        return device_type != "cpu"

    def update(self, value: Tensor | float, weight: Tensor | float | None = None) -> None:  # type: ignore[override]
        if isinstance(value, Tensor) and self.sync_free(value.device.type):
            self.update_on_device(value, weight)
        else:
            super().update(value, weight)

    def update_on_device(self, value: Tensor, weight: Tensor | float | None = None) -> None:
        """Accumulate the weighted sum and weight of the non-NaN entries without a host sync."""
        value = value.to(self.dtype)
        if weight is None:
            weight = torch.ones_like(value)
        elif isinstance(weight, Tensor):
            weight = weight.to(self.dtype)
        else:
            weight = torch.full_like(value, weight)  # a fill on the device, not a host-to-device copy
        weight = torch.broadcast_to(weight, value.shape)
        keep = ~(torch.isnan(value) | torch.isnan(weight))
        self.mean_value += torch.where(keep, value * weight, 0.0).sum()
        self.weight += torch.where(keep, weight, 0.0).sum()


class PreferenceMetrics(nn.Module):
    """The metrics one stage (train or val) reports, keyed by their logged names.

    ``paired=False`` (KTO) leaves out accuracy and margin; ``logps=False`` (reward models)
    leaves out the log-prob means.

    ``update`` takes ``(B,)`` chosen/rejected rewards and log-probs, the scalar loss and any
    extra values; ``compute`` returns ``{name: float}`` synced across processes. Every value is
    an exact mean over rows, whatever the batch size or the number of processes: the batch's
    mean loss (and any scalar extra) is weighted by its row count (pairs, or unpaired rows),
    per-row tensors are averaged element by element.
    """

    def __init__(self, paired: bool = True, logps: bool = True) -> None:
        super().__init__()
        self.paired = paired
        self.track_logps = logps
        self.accuracy = RewardAccuracy()
        self.margin = RewardMargin()
        self.means = nn.ModuleDict(
            {
                name: SyncFreeMean()
                for name in ("loss", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected")
            }
        )
        self.extra = nn.ModuleDict()
        self.extra_names: dict[str, str] = {}  # ModuleDict key -> the name the loss gave (kept as is)

    def update(
        self,
        loss: Tensor,
        chosen_rewards: Tensor,
        rejected_rewards: Tensor,
        chosen_logps: Tensor | None = None,
        rejected_logps: Tensor | None = None,
        extra: dict[str, Tensor] | None = None,
    ) -> None:
        if self.paired:
            self.accuracy.update(chosen_rewards, rejected_rewards)
            self.margin.update(chosen_rewards, rejected_rewards)
        rows = chosen_rewards.numel() + (0 if self.paired else rejected_rewards.numel())
        self.means["loss"].update(loss.detach().float(), weight=float(rows))
        for name, values in (
            ("rewards_chosen", chosen_rewards), ("rewards_rejected", rejected_rewards),
            ("logps_chosen", chosen_logps), ("logps_rejected", rejected_logps),
        ):
            if values is not None and values.numel():  # an all-desirable KTO batch has no rejected side
                self.means[name].update(values.detach().float())
        for name, value in (extra or {}).items():
            key = name.replace(".", "\N{ONE DOT LEADER}")  # a module name cannot hold "."
            self.extra_names[key] = name
            if key not in self.extra:
                self.extra[key] = SyncFreeMean().to(chosen_rewards.device)
            value = value.detach().float()
            self.extra[key].update(value, weight=float(rows) if value.numel() == 1 else 1.0)

    def compute(self) -> dict[str, float]:
        """``{"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy",
        "logps/chosen", "logps/rejected", ...extra}`` as floats. A side no process saw (the
        undesirable side of an all-desirable KTO run) is NaN; accuracy and margin are left out
        for unpaired losses.
        Every process computes the same set of names, so the DDP sync never waits on one."""
        metrics: dict[str, Metric] = {
            "loss": self.means["loss"],
            "rewards/chosen": self.means["rewards_chosen"],
            "rewards/rejected": self.means["rewards_rejected"],
            **{self.extra_names.get(k, k): m for k, m in self.extra.items()},
        }
        if self.track_logps:
            metrics["logps/chosen"] = self.means["logps_chosen"]
            metrics["logps/rejected"] = self.means["logps_rejected"]
        if self.paired:
            metrics["rewards/margins"] = self.margin
            metrics["rewards/accuracy"] = self.accuracy
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            return {name: float(m.compute()) for name, m in metrics.items()}

    def reset(self) -> None:
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()
