"""Fault injection for the reliability tests: a hard kill, and a loss that turns NaN."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch

from dpo_lightning.losses import DPOLoss, LossOutput


class KillAtStep(L.Callback):
    """SIGKILL this process after optimizer step ``step`` (no cleanup, like an OOM killer)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NaNAtSteps(DPOLoss):
    """DPO whose loss is NaN at the given optimizer steps (counted by calls in training)."""

    def __init__(self, steps: list[int], beta: float = 0.1) -> None:
        super().__init__(beta=beta)
        self.steps = set(steps)
        self.calls = 0

    def forward(self, policy, reference, batch) -> LossOutput:
        out = super().forward(policy, reference, batch)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls - 1 in self.steps:
                out.loss = out.loss * torch.tensor(float("nan"))
        return out


class KillWhileSaving(L.Callback):
    """SIGKILL this process half-way through writing the ``nth`` checkpoint file saved at
    optimizer step ``step`` (``torch.save`` writes half of the bytes to the file, then the kill),
    like a machine losing power while a checkpoint is written."""

    def __init__(self, step: int, nth: int = 1) -> None:
        self.step = step
        self.nth = nth
        self.seen = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step != self.step:
            return
        self.seen += 1
        if self.seen != self.nth:
            return
        import io

        original = torch.save

        def half_then_kill(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            if isinstance(f, (str, os.PathLike)):
                f = open(f, "wb")
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_then_kill
