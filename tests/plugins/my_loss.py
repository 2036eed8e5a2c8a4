"""A user's own loss, outside the package: the "Write your own loss" example of docs/losses.md."""

import torch.nn.functional as F

from dpo_lightning.losses import LossOutput, PreferenceLoss


class ScaledSigmoidLoss(PreferenceLoss):
    """DPO whose beta grows with the chosen response's length: L = -log sigmoid(beta * |y_w| * d)."""

    def __init__(self, beta: float = 0.1):
        super().__init__()
        self.beta = beta

    def forward(self, policy, reference, batch):
        h_w = policy.chosen - reference.chosen  # (B,)
        h_l = policy.rejected - reference.rejected  # (B,)
        scale = self.beta * policy.counts[: h_w.shape[0]].float().log1p()
        loss = -F.logsigmoid(scale * (h_w - h_l)).mean()
        return LossOutput(loss, (self.beta * h_w).detach(), (self.beta * h_l).detach())
