"""Learning-rate schedule: linear warmup from 0, then linear or cosine decay, sized from the Trainer."""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupDecayLR(LambdaLR):
    """Linear warmup from 0 to the optimizer's lr, then decay to ``min_lr_ratio * lr``.

    The same curves as ``transformers.get_linear_schedule_with_warmup`` and
    ``get_cosine_schedule_with_warmup`` (tested equal): at optimizer step ``s`` with ``w``
    warmup steps and ``n`` steps in all, the multiplier is ``s / w`` while ``s < w``, then
    ``1 - p`` (linear) or ``(1 + cos(pi p)) / 2`` (cosine) with ``p = (s - w) / (n - w)``, floored
    at ``min_lr_ratio``.

    Args:
        optimizer: the optimizer.
        total_steps: optimizer steps in the run; ``None`` (the usual case from YAML) lets the
            training module fill it in with :meth:`set_total_steps` when training starts, from
            ``trainer.estimated_stepping_batches``. Until then the multiplier is that of step 0.
        warmup: fraction of ``total_steps`` if < 1, else a number of steps. Default 0.1.
        decay: ``"linear"`` (default), ``"cosine"`` or ``"constant"``.
        min_lr_ratio: floor of the decay as a fraction of the peak lr. Default 0.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup: float = 0.1,
        decay: Literal["linear", "cosine", "constant"] = "linear",
        min_lr_ratio: float = 0.0,
    ) -> None:
        if not warmup >= 0 or not math.isfinite(warmup):
            raise ValueError(f"model.init_args.scheduler.init_args.warmup must be a finite number >= 0, got {warmup}")
        if decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"model.init_args.scheduler.init_args.decay must be linear, cosine or constant, got {decay!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"model.init_args.scheduler.init_args.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps = total_steps
        self.warmup = warmup
        self.decay = decay
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def set_total_steps(self, total_steps: int) -> None:
        """Size the schedule and re-apply the current step's learning rate."""
        self.total_steps = int(total_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def warmup_steps(self) -> int:
        total = self.total_steps or 1
        return int(round(self.warmup * total)) if self.warmup < 1 else int(self.warmup)

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimizer step ``step``."""
        if self.total_steps is None:
            return 0.0 if self.warmup > 0 else 1.0
        total = max(self.total_steps, 1)
        warm = self.warmup_steps()
        if step < warm:
            return step / warm
        if self.decay == "constant":
            return 1.0
        progress = min((step - warm) / max(total - warm, 1), 1.0)
        shape = 1 - progress if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape
