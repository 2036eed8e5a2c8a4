"""Learning-rate schedule (linear warmup from 0, then linear or cosine decay, sized from the
Trainer), the per-device optimizer choice (fused Adam/AdamW on CUDA) and the per-step gradient
check (norm and finiteness in one pass)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
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


#: the optimizers :func:`with_fused_kernel` may switch to their fused CUDA kernel
FUSABLE_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW)


def fused_kernel_allowed(
    device_types: Iterable[str], grad_scaler: bool, deepspeed: bool, groups: Sequence[dict[str, Any]]
) -> bool:
    """Whether an Adam/AdamW over parameters on ``device_types`` should run its fused kernel.

    Yes only when every parameter is on CUDA (on CPUs the default foreach kernel is kept, so CPU
    runs keep their numbers and speed), no gradient scaler unscales before the step (Lightning
    cannot clip gradients an optimizer unscales itself, so ``16-mixed`` keeps foreach; ``bf16-mixed``
    and ``32-true`` have none), the strategy is not DeepSpeed (which wraps the optimizer), and no
    parameter group asks for an implementation (``fused`` or ``foreach`` set by the recipe wins).
    """
    types = set(device_types)
    if types != {"cuda"} or grad_scaler or deepspeed:
        return False
    return all(group.get("fused") is None and group.get("foreach") is None for group in groups)


def with_fused_kernel(optimizer: Optimizer, grad_scaler: bool = False, deepspeed: bool = False) -> Optimizer:
    """``optimizer`` rebuilt with ``fused=True`` when :func:`fused_kernel_allowed` says so (same
    class, parameter groups and settings; built before any step, so there is no state to move),
    else ``optimizer`` itself. One fused kernel per step replaces the foreach kernels' launches:
    the AdamW step was ~0.5 s of host time per step on an H200 (issue 22)."""
    if type(optimizer) not in FUSABLE_OPTIMIZERS or optimizer.state:
        return optimizer
    devices = {p.device.type for group in optimizer.param_groups for p in group["params"]}
    floating = all(p.is_floating_point() for group in optimizer.param_groups for p in group["params"])
    if not floating or not fused_kernel_allowed(devices, grad_scaler, deepspeed, optimizer.param_groups):
        return optimizer
    groups = [{**group, "fused": True, "foreach": None} for group in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer)).parameters  # defaults may hold derived keys
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    fused = type(optimizer)(groups, **{**settings, "fused": True, "foreach": None})
    # A fused Adam says it unscales gradients itself (for a GradScaler), and Lightning's mixed
    # precision then refuses gradient clipping, scaler or not. Without a scaler nothing is
    # unscaled anywhere, so it must not say so: bf16-mixed keeps its clipping.
    fused._step_supports_amp_scaling = False
    return fused


def gradient_norm_and_finite(grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The global 2-norm of ``grads`` (each taken in float32) and whether every entry is finite,
    as two 0-d tensors on the gradients' device, computed with two foreach reductions and no
    host sync (the caller decides when to read the flag).

    Finiteness comes from the max-abs norm (NaN and inf propagate through it), not from the
    2-norm, which overflows to inf on large but finite gradients.
    """
    grads32 = [g.detach() if g.dtype == torch.float32 else g.detach().float() for g in grads]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads32, 2)))
    largest = torch.stack(torch._foreach_norm([g.detach() for g in grads], float("inf"))).max()
    return norm, torch.isfinite(largest)
