"""Reference frontiers from reference samples: best-of-n's exact KL, pi* by importance weights,
regret and KL efficiency."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lightning.experiments import frontiers


def test_best_of_n_on_a_two_level_reward_is_exact() -> None:
    scores = torch.tensor([[1.0, 1.0] + [0.0] * 6])  # P(r = 1) = 1/4 under the reference
    a, n = 0.25, 4
    q1 = 1 - (1 - a) ** n
    kl = q1 * math.log(q1 / a) + (1 - q1) * math.log((1 - q1) / (1 - a))
    reward, got = frontiers.best_of_n(scores, n)
    assert reward == pytest.approx(q1, abs=1e-12)
    assert got == pytest.approx(kl, abs=1e-12)
    assert got < math.log(n) - (n - 1) / n  # ties: below the continuous-reward value
    assert frontiers.best_of_n(scores, 1) == pytest.approx((0.25, 0.0), abs=1e-12)


def test_best_of_n_on_distinct_rewards_approaches_log_n_minus_n_minus_1_over_n() -> None:
    scores = torch.randperm(100_000, generator=torch.Generator().manual_seed(0)).double()[None] / 100_000
    n = 8
    reward, kl = frontiers.best_of_n(scores, n)
    assert kl == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-3)
    assert reward == pytest.approx(n / (n + 1), abs=1e-3)  # E[max of n uniforms]


def test_optimum_by_importance_weights_is_the_tilted_level_distribution() -> None:
    levels, counts = [0.0, 1 / 3, 2 / 3, 1.0], [3, 5, 6, 2]  # 16 samples of one prompt
    scores = torch.tensor([[v for v, c in zip(levels, counts) for _ in range(c)]], dtype=torch.float64)
    beta = 0.2
    weights = [c / 16 * math.exp(v / beta) for v, c in zip(levels, counts)]
    z = sum(weights)
    reward = sum(w * v for w, v in zip(weights, levels)) / z
    kl = sum(w / z * math.log((w / z) / (c / 16)) for w, c in zip(weights, counts))
    got = frontiers.optimum(scores, beta)
    assert got["reward"] == pytest.approx(reward, abs=1e-12)
    assert got["kl"] == pytest.approx(kl, abs=1e-12)
    w = [math.exp(v / beta) for v, c in zip(levels, counts) for _ in range(c)]
    assert got["ess_min"] == pytest.approx(sum(w) ** 2 / sum(x * x for x in w), abs=1e-9)


def test_optimum_averages_prompts_at_one_beta() -> None:
    a = torch.tensor([[0.0, 1.0, 1.0, 0.5]])
    b = torch.tensor([[0.2, 0.2, 0.9, 0.0]])
    one, two, both = frontiers.optimum(a, 0.3), frontiers.optimum(b, 0.3), frontiers.optimum(torch.cat([a, b]), 0.3)
    assert both["reward"] == pytest.approx((one["reward"] + two["reward"]) / 2, abs=1e-12)
    assert both["kl"] == pytest.approx((one["kl"] + two["kl"]) / 2, abs=1e-12)
    assert both["ess_min"] == pytest.approx(min(one["ess_min"], two["ess_min"]), abs=1e-12)


def test_regret_and_kl_efficiency_against_the_optimum() -> None:
    scores = torch.rand(4, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    star = frontiers.optimum(scores, 0.1)
    assert frontiers.regret(scores, star["kl"], star["reward"]) == pytest.approx(0.0, abs=1e-9)
    assert frontiers.regret(scores, star["kl"], star["reward"] - 0.1) == pytest.approx(0.1, abs=1e-9)
    assert frontiers.kl_efficiency(scores, star["kl"], star["reward"]) == pytest.approx(1.0, abs=1e-9)
    assert frontiers.kl_efficiency(scores, 2 * star["kl"], star["reward"]) == pytest.approx(0.5, abs=1e-9)
    assert math.isnan(frontiers.kl_efficiency(scores, 5.0, 1.0))
