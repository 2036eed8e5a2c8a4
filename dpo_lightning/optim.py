"""Learning-rate schedule: linear warmup then linear or cosine decay, sized from the Trainer."""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupDecayLR(LambdaLR):
    """Linear warmup from 0 to the optimizer's lr, then decay to ``min_lr_ratio * lr``.

    Args:
        optimizer: the optimizer.
        total_steps: optimizer steps in the run; ``None`` lets the module fill it in from
            ``trainer.estimated_stepping_batches`` (the usual case from YAML).
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
        if warmup < 0:
            raise ValueError(f"scheduler.warmup must be >= 0, got {warmup}")
        if decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"scheduler.decay must be linear, cosine or constant, got {decay!r}")
        self.total_steps = total_steps
        self.warmup = warmup
        self.decay = decay
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def warmup_steps(self) -> int:
        total = self.total_steps or 1
        return int(round(self.warmup * total)) if self.warmup < 1 else int(self.warmup)

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimizer step ``step``."""
        total = max(self.total_steps or 1, 1)
        warm = self.warmup_steps()
        if step < warm:
            return (step + 1) / (warm + 1)
        if self.decay == "constant":
            return 1.0
        progress = min((step - warm) / max(total - warm, 1), 1.0)
        shape = 1 - progress if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape
