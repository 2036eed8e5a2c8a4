"""Bradley-Terry labels (``sampling.label_temperature``): each pair's order is drawn with
``P(a chosen over b) = sigmoid((s_a - s_b) / tau)`` instead of the higher score always winning."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lightning.generation import SamplingSpec, form_pairs, judge_and_pair
from dpo_lightning.judges import FunctionJudge
from test_generation import samples


def chosen_first_share(scores: list[float], tau: float, prompts: int, mode: str = "all", seed: int = 0) -> dict:
    """Per candidate pair (a < b by sample index), the share of prompts where ``a`` was chosen."""
    table = torch.tensor([scores] * prompts, dtype=torch.float64)
    pairs, ties = form_pairs(table, mode, tau, torch.Generator().manual_seed(seed))
    counts: dict[tuple[int, int], list[int]] = {}
    for _, c, r in pairs:
        key = (min(c, r), max(c, r))
        counts.setdefault(key, [0, 0])[0 if c == key[0] else 1] += 1
    return {k: v[0] / (v[0] + v[1]) for k, v in counts.items()}, ties, len(pairs)


def test_each_pair_is_ordered_with_the_bradley_terry_probability() -> None:
    n, tau = 20000, 0.5
    shares, ties, total = chosen_first_share([1.0, 0.0, 2 / 3], tau, n)
    assert ties == 0 and total == 3 * n
    for (a, b), gap in {(0, 1): 1.0, (0, 2): 1 / 3, (1, 2): -2 / 3}.items():
        p = 1 / (1 + math.exp(-gap / tau))
        assert abs(shares[(a, b)] - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 standard errors


def test_best_vs_worst_keeps_the_extremes_and_draws_their_order() -> None:
    n, tau = 20000, 0.25
    shares, ties, total = chosen_first_share([0.5, 1.0, 0.0], tau, n, mode="best_vs_worst")
    assert list(shares) == [(1, 2)] and total == n and ties == 0  # always samples 1 and 2, never 0
    p = 1 / (1 + math.exp(-1.0 / tau))
    assert abs(shares[(1, 2)] - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_equal_scores_are_still_ties() -> None:
    pairs, ties = form_pairs(torch.tensor([[0.5, 0.5, 0.2]]), "all", 1.0, torch.Generator().manual_seed(0))
    assert ties == 1 and sorted((min(c, r), max(c, r)) for _, c, r in pairs) == [(0, 2), (1, 2)]


def test_without_a_temperature_the_higher_score_always_wins() -> None:
    pairs, ties = form_pairs(torch.tensor([[0.0, 1.0, 0.5]] * 50), "all")
    assert ties == 0 and all((c, r) in ((1, 0), (1, 2), (2, 0)) for _, c, r in pairs)


def test_a_temperature_needs_a_random_stream() -> None:
    with pytest.raises(ValueError, match="label_temperature needs a generator"):
        form_pairs(torch.tensor([[0.0, 1.0]]), "all", 1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_the_spec_refuses_a_temperature_that_is_not_positive(bad) -> None:
    with pytest.raises(ValueError, match=r"model.init_args.sampling.label_temperature must be a number > 0"):
        SamplingSpec(label_temperature=bad).validate("model.init_args.sampling")


def test_the_same_seed_draws_the_same_labels_and_another_seed_others() -> None:
    spec = SamplingSpec(num_samples=4, pairs="all", label_temperature=5.0)  # near coin flips: orders differ by seed
    judge = FunctionJudge("test_online:with_prompt")
    batch = samples(k=4)
    first = judge_and_pair(judge, batch, spec, seed=11).pairs
    assert judge_and_pair(judge, batch, spec, seed=11).pairs == first  # a resumed step draws the same
    assert any(judge_and_pair(judge, batch, spec, seed=s).pairs != first for s in (12, 13, 14))
    plain = judge_and_pair(judge, batch, SamplingSpec(num_samples=4, pairs="all"), seed=11).pairs
    assert sorted((i, min(c, r), max(c, r)) for i, c, r in first) == sorted((i, min(c, r), max(c, r)) for i, c, r in plain)


def test_the_shipped_online_recipe_trains_with_bradley_terry_labels(tmp_path) -> None:
    from conftest import quick
    from dpo_lightning.cli import run

    cli = run(quick("online_dpo", tmp_path, "--model.init_args.sampling.label_temperature", "0.25"))
    assert cli.model.sampling.label_temperature == 0.25
    assert cli.trainer.global_step == 2 and (tmp_path / "model" / "model.safetensors").exists()
