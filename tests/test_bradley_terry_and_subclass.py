"""Bradley-Terry against its formula, and a user's loss subclass trained through the CLI."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from conftest import ROOT, quick
from dpo_lightning.losses import BradleyTerryLoss


def bt_reference(rw: float, rl: float, m: float) -> float:
    x = rw - rl - m
    return math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x))


@pytest.mark.parametrize("batch", [1, 5, 32])
def test_bradley_terry_matches_formula(batch: int) -> None:
    g = torch.Generator().manual_seed(batch)
    rewards = 10 * torch.randn(2 * batch, generator=g, dtype=torch.float64)
    margin = torch.rand(batch, generator=g, dtype=torch.float64)
    plain = BradleyTerryLoss()(rewards, {})
    expected = sum(bt_reference(rewards[i].item(), rewards[batch + i].item(), 0.0) for i in range(batch)) / batch
    assert plain.loss.item() == pytest.approx(expected, rel=1e-12)
    with_margin = BradleyTerryLoss(use_margin=True)(rewards, {"margin": margin})
    expected_m = sum(
        bt_reference(rewards[i].item(), rewards[batch + i].item(), margin[i].item()) for i in range(batch)
    ) / batch
    assert with_margin.loss.item() == pytest.approx(expected_m, rel=1e-12)
    zero = BradleyTerryLoss(use_margin=True)(rewards, {"margin": torch.zeros(batch, dtype=torch.float64)})
    assert zero.loss.item() == plain.loss.item()
    centred = BradleyTerryLoss(center_rewards_coefficient=0.01)(rewards, {})
    extra = 0.01 * sum((rewards[i].item() + rewards[batch + i].item()) ** 2 for i in range(batch)) / batch
    assert centred.loss.item() == pytest.approx(expected + extra, rel=1e-12)
    assert BradleyTerryLoss(use_margin=True).score_columns == ("margin",)


def test_bradley_terry_gradient_direction() -> None:
    rewards = torch.tensor([0.5, -1.0, 0.2, 0.3], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(BradleyTerryLoss()(rewards, {}).loss, rewards)
    assert (grad[:2] < 0).all() and (grad[2:] > 0).all()


def test_user_subclass_outside_the_package_trains_through_the_cli(tmp_path, monkeypatch) -> None:
    from dpo_lightning.cli import run

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "plugins"))
    cli = run(quick("dpo", tmp_path, "--model.init_args.loss", '{"class_path": "my_loss.ScaledSigmoidLoss", "init_args": {"beta": 0.2}}'))
    assert type(cli.model.loss).__name__ == "ScaledSigmoidLoss" and cli.model.loss.beta == 0.2
    assert cli.trainer.global_step == 2
    assert "my_loss" in sys.modules
