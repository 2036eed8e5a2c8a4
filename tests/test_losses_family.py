"""IPO, ODPO, SimPO, ORPO and the RPO wrapper against float64 formulas from their papers."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import log_sigmoid, random_logps
from dpo_lightning.losses import DPOLoss, IPOLoss, ODPOLoss, ORPOLoss, SequenceLogProbs, SimPOLoss, WithChosenNLL

SHAPES = [1, 4, 33]


def pairs(policy: SequenceLogProbs, reference: SequenceLogProbs | None = None):
    """Per pair: (policy sum w, l, ref sum w, l, count w, l) as python floats."""
    b = policy.sums.shape[0] // 2
    for i in range(b):
        yield (
            policy.sums[i].item(), policy.sums[b + i].item(),
            reference.sums[i].item() if reference else 0.0, reference.sums[b + i].item() if reference else 0.0,
            policy.counts[i].item(), policy.counts[b + i].item(),
        )


@pytest.mark.parametrize("batch", SHAPES)
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_ipo_uses_per_token_means(batch: int, beta: float) -> None:
    policy, reference = random_logps(batch, seed=batch + 11)
    expected = []
    for pw, pl, rw, rl, nw, nl in pairs(policy, reference):
        d = (pw / nw - rw / nw) - (pl / nl - rl / nl)
        expected.append((d - 1 / (2 * beta)) ** 2)
    out = IPOLoss(beta=beta)(policy, reference, {})
    assert out.loss.item() == pytest.approx(sum(expected) / batch, rel=1e-12)
    sums = IPOLoss(beta=beta, length_normalize=False)(policy, reference, {})
    expected_sums = [((pw - rw) - (pl - rl) - 1 / (2 * beta)) ** 2 for pw, pl, rw, rl, _, _ in pairs(policy, reference)]
    assert sums.loss.item() == pytest.approx(sum(expected_sums) / batch, rel=1e-12)


@pytest.mark.parametrize("batch", SHAPES)
def test_odpo_matches_formula_with_log_offset(batch: int) -> None:
    policy, reference = random_logps(batch, seed=batch + 21)
    g = torch.Generator().manual_seed(batch)
    s_l = torch.rand(batch, generator=g, dtype=torch.float64)
    s_w = s_l + 2 * torch.rand(batch, generator=g, dtype=torch.float64) + 0.01
    beta, alpha = 0.2, 0.7
    expected = []
    for i, (pw, pl, rw, rl, _, _) in enumerate(pairs(policy, reference)):
        delta = alpha * math.log(s_w[i].item() - s_l[i].item())
        expected.append(-log_sigmoid(beta * ((pw - rw) - (pl - rl)) - delta))
    out = ODPOLoss(beta=beta, alpha=alpha)(policy, reference, {"score_chosen": s_w, "score_rejected": s_l})
    assert out.loss.item() == pytest.approx(sum(expected) / batch, rel=1e-12)
    identity = ODPOLoss(beta=beta, alpha=alpha, offset_fn="identity")(
        policy, reference, {"score_chosen": s_w, "score_rejected": s_l}
    )
    torch.testing.assert_close(identity.metrics["offset"], alpha * (s_w - s_l))


def test_odpo_alpha_zero_is_dpo_exactly() -> None:
    policy, reference = random_logps(8, seed=5)
    scores = {"score_chosen": torch.rand(8, dtype=torch.float64), "score_rejected": torch.rand(8, dtype=torch.float64)}
    odpo = ODPOLoss(beta=0.3, alpha=0.0)(policy, reference, scores).loss
    assert odpo.item() == DPOLoss(beta=0.3)(policy, reference, {}).loss.item()


def test_odpo_ties_and_inverted_scores_are_clamped_not_nan() -> None:
    policy, reference = random_logps(3, seed=6)
    scores = {"score_chosen": torch.tensor([1.0, 0.2, 5.0], dtype=torch.float64),
              "score_rejected": torch.tensor([1.0, 0.9, 4.0], dtype=torch.float64)}
    loss = ODPOLoss(beta=0.1, alpha=1.0, min_score_diff=1e-3)
    out = loss(policy, reference, scores)
    assert torch.isfinite(out.loss)
    offset = out.metrics["offset"]
    assert offset[0].item() == pytest.approx(math.log(1e-3)) and offset[1].item() == pytest.approx(math.log(1e-3))
    assert offset[2].item() == pytest.approx(0.0)


def test_odpo_without_scores_names_the_column() -> None:
    policy, reference = random_logps(2, seed=1)
    with pytest.raises(KeyError, match="score_chosen"):
        ODPOLoss()(policy, reference, {})


@pytest.mark.parametrize("batch", SHAPES)
def test_simpo_formula_and_no_reference(batch: int) -> None:
    policy, _ = random_logps(batch, seed=batch + 31)
    beta, gamma = 2.0, 0.8
    expected = [-log_sigmoid(beta * pw / nw - beta * pl / nl - gamma) for pw, pl, _, _, nw, nl in pairs(policy)]
    loss = SimPOLoss(beta=beta, gamma=gamma)
    assert not loss.needs_reference
    assert loss(policy, None, {}).loss.item() == pytest.approx(sum(expected) / batch, rel=1e-12)


@pytest.mark.parametrize("batch", SHAPES)
def test_orpo_formula(batch: int) -> None:
    policy, _ = random_logps(batch, seed=batch + 41, scale=1.0)
    lam = 0.25

    def log_odds(mean: float) -> float:
        p = math.exp(mean)
        return math.log(p / (1 - p))

    expected = []
    for pw, pl, _, _, nw, nl in pairs(policy):
        ratio = log_odds(pw / nw) - log_odds(pl / nl)
        expected.append(-pw / nw + lam * -log_sigmoid(ratio))
    loss = ORPOLoss(lam=lam)
    assert not loss.needs_reference
    assert loss(policy, None, {}).loss.item() == pytest.approx(sum(expected) / batch, rel=1e-10)


def test_orpo_is_finite_at_extreme_log_probs() -> None:
    sums = torch.tensor([-1e-12, -1e4, -1e4, -1e-12], dtype=torch.float64, requires_grad=True)
    out = ORPOLoss()(SequenceLogProbs(sums, torch.tensor([1, 1, 1, 1])), None, {})
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(sums.grad).all()


def test_chosen_nll_wrapper_adds_weighted_nll() -> None:
    policy, reference = random_logps(5, seed=8)
    inner = DPOLoss(beta=0.1)
    wrapped = WithChosenNLL(inner, weight=0.5)
    expected = inner(policy, reference, {}).loss.item() + 0.5 * (-policy.chosen_means).mean().item()
    assert wrapped(policy, reference, {}).loss.item() == pytest.approx(expected, rel=1e-12)
    assert wrapped.needs_reference and WithChosenNLL(SimPOLoss()).needs_reference is False
    assert WithChosenNLL(ODPOLoss()).score_columns == ("score_chosen", "score_rejected")


@pytest.mark.parametrize("loss", [IPOLoss(0.1), ODPOLoss(0.1, alpha=0.5), SimPOLoss(), ORPOLoss(), WithChosenNLL(DPOLoss())])
def test_gradient_direction_every_pairwise_loss(loss) -> None:
    """Raising a chosen log-prob lowers the loss; raising a rejected one raises it."""
    policy, reference = random_logps(4, seed=12, scale=0.02)
    sums = policy.sums.clone().requires_grad_(True)
    batch = {"score_chosen": torch.full((4,), 2.0, dtype=torch.float64),
             "score_rejected": torch.full((4,), 1.0, dtype=torch.float64)}
    out = loss(SequenceLogProbs(sums, policy.counts), reference if loss.needs_reference else None, batch)
    (grad,) = torch.autograd.grad(out.loss, sums)
    assert (grad[:4] < 0).all() and (grad[4:] > 0).all(), grad


@pytest.mark.parametrize("loss", [IPOLoss(0.1), ODPOLoss(0.1), SimPOLoss(), ORPOLoss(), DPOLoss(0.1)])
def test_extreme_inputs_no_nan(loss) -> None:
    sums = torch.tensor([-1e5, -1e-9, -3e4, -1e-9, -1e5, -2.0], dtype=torch.float64, requires_grad=True)
    ref = SequenceLogProbs(torch.tensor([-1e-9, -1e5, -1.0, -1e5, -1e-9, -1e5], dtype=torch.float64), torch.ones(6))
    batch = {"score_chosen": torch.tensor([0.0, 1.0, 1e6], dtype=torch.float64),
             "score_rejected": torch.tensor([1.0, 1.0, -1e6], dtype=torch.float64)}
    out = loss(SequenceLogProbs(sums, torch.tensor([1, 1, 1, 1, 1, 1])), ref if loss.needs_reference else None, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(sums.grad).all()
