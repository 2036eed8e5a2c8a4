"""DPO / cDPO / robust DPO / hinge against float64 formulas written from the papers."""

from __future__ import annotations


import pytest
import torch

from conftest import log_sigmoid, random_logps
from dpo_lightning.losses import DPOLoss, HingeLoss, RobustDPOLoss, SequenceLogProbs


def dpo_reference(pw, pl, rw, rl, beta, eps) -> float:
    """Paper eq. 7 (with cDPO's smoothing), one pair, python floats."""
    d = (pw - rw) - (pl - rl)
    return -(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (2.0, 0.45)])
def test_dpo_matches_float64_formula(batch: int, beta: float, eps: float) -> None:
    policy, reference = random_logps(batch, seed=batch)
    out = DPOLoss(beta=beta, label_smoothing=eps)(policy, reference, {})
    expected = sum(
        dpo_reference(policy.chosen[i].item(), policy.rejected[i].item(), reference.chosen[i].item(),
                      reference.rejected[i].item(), beta, eps)
        for i in range(batch)
    ) / batch
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(out.chosen_rewards, beta * (policy.chosen - reference.chosen))
    torch.testing.assert_close(out.rejected_rewards, beta * (policy.rejected - reference.rejected))
    assert not out.chosen_rewards.requires_grad


def test_dpo_extreme_log_ratios_are_finite() -> None:
    counts = torch.tensor([1, 1, 1, 1])
    policy = SequenceLogProbs(torch.tensor([0.0, -1e4, -1e4, 0.0], dtype=torch.float64, requires_grad=True), counts)
    reference = SequenceLogProbs(torch.tensor([-1e4, 0.0, 0.0, -1e4], dtype=torch.float64), counts)
    for loss in (DPOLoss(beta=1.0), DPOLoss(beta=1.0, label_smoothing=0.3), RobustDPOLoss(beta=1.0), HingeLoss(1.0)):
        out = loss(policy, reference, {})
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(policy.sums.grad).all()
        policy.sums.grad = None


def test_dpo_gradient_direction() -> None:
    """Raising the chosen log-prob lowers the loss; raising the rejected one raises it."""
    policy, reference = random_logps(8, seed=3)
    sums = policy.sums.clone().requires_grad_(True)
    loss = DPOLoss(beta=0.1)(SequenceLogProbs(sums, policy.counts), reference, {}).loss
    (grad,) = torch.autograd.grad(loss, sums)
    assert (grad[:8] < 0).all() and (grad[8:] > 0).all()


def test_robust_dpo_formula_and_eps_zero_is_dpo() -> None:
    policy, reference = random_logps(6, seed=7)
    d = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    beta, eps = 0.3, 0.2
    per_pair = [
        ((1 - eps) * -log_sigmoid(beta * x) - eps * -log_sigmoid(-beta * x)) / (1 - 2 * eps) for x in d.tolist()
    ]
    out = RobustDPOLoss(beta=beta, label_smoothing=eps)(policy, reference, {})
    assert out.loss.item() == pytest.approx(sum(per_pair) / 6, rel=1e-12)
    dpo = DPOLoss(beta=beta)(policy, reference, {}).loss
    assert RobustDPOLoss(beta=beta, label_smoothing=0.0)(policy, reference, {}).loss.item() == pytest.approx(dpo.item(), rel=1e-14)


def test_hinge_formula() -> None:
    policy, reference = random_logps(6, seed=9, scale=0.05)
    d = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    out = HingeLoss(beta=2.0)(policy, reference, {})
    assert out.loss.item() == pytest.approx(sum(max(0.0, 1 - 2.0 * x) for x in d.tolist()) / 6, rel=1e-12)


@pytest.mark.parametrize("kwargs,key", [({"beta": 0.0}, "beta"), ({"beta": -1.0}, "beta"),
                                         ({"label_smoothing": 0.5}, "label_smoothing"),
                                         ({"label_smoothing": -0.1}, "label_smoothing")])
def test_dpo_rejects_bad_hyperparameters(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"loss.init_args.{key}"):
        DPOLoss(**kwargs)
