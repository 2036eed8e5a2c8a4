"""Reward accuracy and margin against hand counts, ties included."""

from __future__ import annotations

import pytest
import torch

from dpo_lightning.metrics import PreferenceMetrics, RewardAccuracy, RewardMargin


def test_accuracy_counts_ties_as_wrong() -> None:
    metric = RewardAccuracy()
    metric.update(torch.tensor([1.0, 0.5, 0.2, -1.0]), torch.tensor([0.0, 0.5, 0.3, -2.0]))  # 2 correct, 1 tie
    metric.update(torch.tensor([0.0, 3.0]), torch.tensor([0.0, 2.9]))  # tie, correct
    assert metric.compute().item() == pytest.approx(3 / 6)
    assert metric.correct.item() == 3 and metric.total.item() == 6


def test_margin_is_the_mean_difference_over_all_updates() -> None:
    metric = RewardMargin()
    metric.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    metric.update(torch.tensor([0.0]), torch.tensor([6.0]))
    assert metric.compute().item() == pytest.approx((1 + 2 - 6) / 3)


def test_preference_metrics_compute_names_and_reset() -> None:
    m = PreferenceMetrics()
    m.update(torch.tensor(0.5), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]),
             torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -6.0]), {"offset": torch.tensor([1.0, 3.0])})
    values = m.compute()
    assert values["rewards/accuracy"] == 0.5
    assert values["rewards/margins"] == pytest.approx(0.5)
    assert values["logps/chosen"] == pytest.approx(-4.0)
    assert values["logps/rejected"] == pytest.approx(-5.0)
    assert values["offset"] == pytest.approx(2.0)
    assert values["loss"] == pytest.approx(0.5)
    m.reset()
    assert m.accuracy.total.item() == 0
