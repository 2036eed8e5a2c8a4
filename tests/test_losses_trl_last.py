"""TRL 1.16's last loss options (issue 26): IPO's logged rewards, BCO's row-weighted shift, the
SimPO / CPO variants (label smoothing, AlphaPO, hinge, IPO), KTO's ``apo_zero_unpaired`` and f-DPO's
alpha beyond 1, each against a float64 formula written here from its paper (values and gradients)
and, where TRL has it, against TRL's definition written out as TRL computes it.

TRL is not installed here: the TRL lines quoted in the docstrings are TRL 1.16's source (``trl``
package) as published, reproduced in the test with torch so that the comparison runs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_lightning.losses import BCOLoss, IPOLoss, SequenceLogProbs
from test_losses_dpo import random_logps


def per_pair_rows(policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> list[tuple]:
    """Per pair: (policy w, policy l, reference w, reference l, count w, count l) as python floats."""
    b = policy.sums.shape[0] // 2
    p, c = policy.sums.tolist(), policy.counts.tolist()
    r = reference.sums.tolist() if reference is not None else [0.0] * (2 * b)
    return [(p[i], p[b + i], r[i], r[b + i], c[i], c[b + i]) for i in range(b)]


# -- 1. IPO logs the summed rewards ------------------------------------------------------------
@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("divergence", ["reverse_kl", "js_divergence"])
def test_ipo_logs_summed_rewards_as_trl(length_normalize: bool, divergence: str) -> None:
    """TRL 1.16 ``DPOTrainer._compute_loss`` logs, for every loss type::

        chosen_rewards = self.beta * (chosen_logps.detach() - ref_chosen_logps)
        rejected_rewards = self.beta * (rejected_logps.detach() - ref_rejected_logps)

    with ``chosen_logps`` summed over completion tokens, while its ``ipo`` branch divides the
    scores by the lengths for the loss only::

        chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
        rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
        per_sequence_loss = (chosen_avg_score - rejected_avg_score - 1 / (2 * self.beta)) ** 2
    """
    beta = 0.3
    policy, reference = random_logps(6, seed=61)
    out = IPOLoss(beta=beta, length_normalize=length_normalize, divergence=divergence)(policy, reference, {})
    expected_w = [beta * (pw - rw) for pw, _, rw, _, _, _ in per_pair_rows(policy, reference)]
    expected_l = [beta * (pl - rl) for _, pl, _, rl, _, _ in per_pair_rows(policy, reference)]
    assert out.chosen_rewards.tolist() == pytest.approx(expected_w, rel=1e-13)
    assert out.rejected_rewards.tolist() == pytest.approx(expected_l, rel=1e-13)
    assert not out.chosen_rewards.requires_grad


def test_ipo_logs_the_margin_it_pulls_to_its_target() -> None:
    """``ipo_margin`` is the per-token-mean margin d' of IPO eq. 17 (arXiv 2310.12036), so that
    ``loss == mean((ipo_margin - 1/(2 beta))^2)``; reward accuracy stays on the summed rewards."""
    beta = 0.2
    policy, reference = random_logps(5, seed=62)
    out = IPOLoss(beta=beta)(policy, reference, {})
    margins = [(pw - rw) / nw - (pl - rl) / nl for pw, pl, rw, rl, nw, nl in per_pair_rows(policy, reference)]
    assert out.metrics["ipo_margin"].tolist() == pytest.approx(margins, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum((m - 1 / (2 * beta)) ** 2 for m in margins) / 5, rel=1e-12)


# -- 2. BCO's running shift weighs rows ----------------------------------------------------------
class TRLRunningMoments:
    """TRL's ``RunningMoments.update`` (trl/trainer/utils.py), its mean only, as TRL 1.16 has it::

        mean: float = 0
        count: float = 1e-24
        ...
            xs_count = xs.numel()
            xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        ...
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        ...
        self.mean += (delta * xs_count / tot_count).item()
        ...
        self.count = tot_count
    """

    def __init__(self) -> None:
        self.mean, self.count = 0.0, 1e-24

    def update(self, xs: torch.Tensor) -> None:
        xs_count = xs.numel()
        xs_mean = xs.mean().item()
        tot_count = self.count + xs_count
        self.mean += (xs_mean - self.mean) * xs_count / tot_count
        self.count = tot_count


def test_bco_shift_is_trls_bco_trainer_with_a_short_last_batch() -> None:
    """TRL's former ``BCOTrainer.bco_loss`` (trl/experimental/bco/bco_trainer.py)::

        if do_train:
            self.running.update(torch.cat((chosen_rewards, rejected_rewards), 0).detach())
        delta = torch.as_tensor(self.running.mean, device=chosen_rewards.device)

        chosen_losses = -F.logsigmoid(chosen_rewards - delta)
        rejected_losses = -F.logsigmoid(-(rejected_rewards - delta))

    every row's reward goes into ``RunningMoments``: a short batch (the unpaired data module keeps
    the last short batch of each epoch) weighs by its rows.
    """
    beta = 0.25
    loss = BCOLoss(beta)
    trl = TRLRunningMoments()
    for step, n in enumerate((8, 8, 3, 8)):
        policy, reference = random_logps(n, seed=70 + step)
        sums, ref = policy.sums[:n], reference.sums[:n]
        label = torch.arange(n) % 3 != 0
        rewards = beta * (sums - ref)
        chosen_rewards, rejected_rewards = rewards[label], rewards[~label]
        trl.update(torch.cat((chosen_rewards, rejected_rewards), 0))
        delta = torch.as_tensor(trl.mean, dtype=torch.float64)
        trl_losses = torch.cat((-F.logsigmoid(chosen_rewards - delta), -F.logsigmoid(-(rejected_rewards - delta))))
        out = loss(SequenceLogProbs(sums, policy.counts[:n]), SequenceLogProbs(ref, reference.counts[:n]), {"label": label})
        assert out.metrics["reward_shift"].item() == pytest.approx(trl.mean, rel=1e-12, abs=1e-15)
        assert out.loss.item() == pytest.approx(trl_losses.mean().item(), rel=1e-12)
    assert loss.shift.count.item() == 27


def test_bco_gradient_with_a_running_shift_matches_the_papers_formula() -> None:
    """BCO (arXiv 2404.04656, eq. 6 with the shift delta held constant): d/dh of
    -log sigmoid(beta h - delta) is -beta sigmoid(-(beta h - delta)), of -log sigmoid(-(beta h - delta))
    is beta sigmoid(beta h - delta); the row mean divides by n."""
    beta = 0.4
    loss = BCOLoss(beta)
    first, first_ref = random_logps(7, seed=80)
    loss(SequenceLogProbs(first.sums[:7], first.counts[:7]), SequenceLogProbs(first_ref.sums[:7], first_ref.counts[:7]),
         {"label": torch.tensor([True] * 7)})
    policy, reference = random_logps(3, seed=81)
    sums = policy.sums[:3].clone().requires_grad_(True)
    label = [True, False, True]
    out = loss(SequenceLogProbs(sums, policy.counts[:3]), SequenceLogProbs(reference.sums[:3], reference.counts[:3]),
               {"label": torch.tensor(label)})
    (grad,) = torch.autograd.grad(out.loss, sums)
    rewards = [beta * (p - r) for p, r in zip(first.sums[:7].tolist() + sums.tolist(), first_ref.sums[:7].tolist() + reference.sums[:3].tolist())]
    delta = sum(rewards) / 10
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i, y in enumerate(label):
        z = rewards[7 + i] - delta
        expected = (-beta * sig(-z) if y else beta * sig(z)) / 3
        assert grad[i].item() == pytest.approx(expected, rel=1e-12)
