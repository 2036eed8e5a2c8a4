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

from dpo_lightning.contract import BatchLayout, DataRequirements
from dpo_lightning.losses import (
    AlphaPOLoss,
    APOZeroLoss,
    APOZeroUnpairedLoss,
    BCOLoss,
    CPOHingeLoss,
    CPOIPOLoss,
    CPOLoss,
    DPOLoss,
    IPOLoss,
    SequenceLogProbs,
    SimPOLoss,
)
from test_losses_dpo import log_sigmoid, random_logps


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


# -- 5, 6. SimPO with label smoothing, AlphaPO, CPO's hinge and IPO ----------------------------------
def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def alpha_reward(mean_logp: float, beta: float, alpha: float) -> float:
    """AlphaPO (arXiv 2501.03884): r = beta (1 - p^(-alpha)) / alpha on p = pi(y|x)^(1/|y|); beta * log p at alpha 0."""
    if alpha == 0:
        return beta * mean_logp
    return beta * (1 - math.exp(mean_logp) ** -alpha) / alpha


def simpo_pair(pw, pl, rw, rl, nw, nl, beta, gamma, eps, alpha=0.0) -> float:
    """SimPO eq. 6 (arXiv 2405.14734) with cDPO smoothing, on AlphaPO's reward."""
    return smoothed(alpha_reward(pw / nw, beta, alpha) - alpha_reward(pl / nl, beta, alpha) - gamma, eps)


def token_nll(data: list[tuple]) -> float:
    return -sum(row[0] for row in data) / sum(row[4] for row in data)


def cpo_hinge_batch(data, beta, alpha) -> float:
    """SLiC's hinge on CPO's reference-free margin (sums) + alpha * token-mean NLL of y_w."""
    return sum(max(0.0, 1 - beta * (pw - pl)) for pw, pl, *_ in data) / len(data) + alpha * token_nll(data)


def cpo_ipo_batch(data, beta, alpha) -> float:
    """IPO eq. 17 on CPO's reference-free per-token-mean margin + alpha * token-mean NLL of y_w."""
    pref = sum((pw / nw - pl / nl - 1 / (2 * beta)) ** 2 for pw, pl, _, _, nw, nl in data) / len(data)
    return pref + alpha * token_nll(data)


def batch_mean(per_pair, **kwargs):
    return lambda data: sum(per_pair(*row, **kwargs) for row in data) / len(data)


REFERENCE_FREE = {
    "simpo_smoothed": (lambda: SimPOLoss(beta=2.5, gamma=0.7, label_smoothing=0.1),
                       batch_mean(simpo_pair, beta=2.5, gamma=0.7, eps=0.1)),
    "alphapo": (lambda: AlphaPOLoss(beta=2.0, gamma=0.5, alpha=0.25), batch_mean(simpo_pair, beta=2.0, gamma=0.5, eps=0.0, alpha=0.25)),
    "alphapo_negative_smoothed": (lambda: AlphaPOLoss(beta=1.5, gamma=0.3, label_smoothing=0.2, alpha=-0.4),
                                  batch_mean(simpo_pair, beta=1.5, gamma=0.3, eps=0.2, alpha=-0.4)),
    "cpo_hinge": (lambda: CPOHingeLoss(beta=0.05, alpha=0.6), lambda d: cpo_hinge_batch(d, 0.05, 0.6)),
    "cpo_ipo": (lambda: CPOIPOLoss(beta=0.4, alpha=0.8), lambda d: cpo_ipo_batch(d, 0.4, 0.8)),
}


@pytest.mark.parametrize("batch", [1, 4, 17])
@pytest.mark.parametrize("case", sorted(REFERENCE_FREE))
def test_reference_free_variants_match_float64_formula(case: str, batch: int) -> None:
    make, formula = REFERENCE_FREE[case]
    loss = make()
    policy, _ = random_logps(batch, seed=batch + 90, scale=1.0)
    out = loss(policy, None, {})
    assert not loss.needs_reference and loss.pairwise
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(formula(per_pair_rows(policy)), rel=1e-12, abs=1e-12)
    assert out.per_pair.shape == (batch,) and out.per_pair.mean().item() == pytest.approx(out.loss.item(), rel=1e-13)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("case", sorted(REFERENCE_FREE))
def test_reference_free_variants_gradient_matches_finite_difference(case: str, batch: int) -> None:
    make, formula = REFERENCE_FREE[case]
    policy, _ = random_logps(batch, seed=batch + 95, scale=0.5)
    sums = policy.sums.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(make()(SequenceLogProbs(sums, policy.counts), None, {}).loss, sums)
    h = 1e-6
    for k in range(2 * batch):
        up, down = policy.sums.clone(), policy.sums.clone()
        up[k] += h
        down[k] -= h
        numeric = (formula(per_pair_rows(SequenceLogProbs(up, policy.counts)))
                   - formula(per_pair_rows(SequenceLogProbs(down, policy.counts)))) / (2 * h)
        assert grad[k].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9), (case, k)


def trl_cpo_loss(policy: SequenceLogProbs, loss_type: str, beta: float, label_smoothing: float, cpo_alpha: float,
                 alpha: float = 0.0, simpo_gamma: float = 0.5) -> torch.Tensor:
    """TRL 1.16's ``CPOTrainer`` (trl/experimental/cpo/cpo_trainer.py), ``concatenated_forward``
    (``average_log_prob=self.loss_type in ["ipo", "simpo"]``, ``nll_loss`` the cross entropy over
    the chosen half), ``cpo_loss`` and ``loss = losses.mean() + self.cpo_alpha * policy_nll_loss``::

        if self.alpha != 0.0:
            chosen_probs = torch.exp(policy_chosen_logps)
            rejected_probs = torch.exp(policy_rejected_logps)
            policy_chosen_rewards = (1 - chosen_probs.pow(-self.alpha)) / self.alpha
            policy_rejected_rewards = (1 - rejected_probs.pow(-self.alpha)) / self.alpha
            logits = (policy_chosen_rewards - policy_rejected_rewards).to(self.accelerator.device)
        else:
            logits = (policy_chosen_logps - policy_rejected_logps).to(self.accelerator.device)
        if self.loss_type == "simpo":
            gamma_logratios = self.simpo_gamma / self.beta
            logits = logits - gamma_logratios
            losses = (
                -F.logsigmoid(self.beta * logits) * (1 - self.label_smoothing)
                - F.logsigmoid(-self.beta * logits) * self.label_smoothing
            )
        elif self.loss_type == "sigmoid":
            losses = (... the same without gamma ...)
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * logits)
        elif self.loss_type == "ipo":
            losses = (logits - 1 / (2 * self.beta)) ** 2
    """
    average = loss_type in ("ipo", "simpo")
    logps = policy.means if average else policy.sums
    policy_chosen_logps, policy_rejected_logps = logps.chunk(2)
    b = policy_chosen_logps.shape[0]
    policy_nll_loss = -policy.sums[:b].sum() / policy.counts[:b].sum()  # CrossEntropyLoss: mean over chosen tokens
    if alpha != 0.0:
        chosen_probs = torch.exp(policy_chosen_logps)
        rejected_probs = torch.exp(policy_rejected_logps)
        logits = (1 - chosen_probs.pow(-alpha)) / alpha - (1 - rejected_probs.pow(-alpha)) / alpha
    else:
        logits = policy_chosen_logps - policy_rejected_logps
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
    if loss_type in ("simpo", "sigmoid"):
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses.mean() + cpo_alpha * policy_nll_loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_free_variants_are_trls_cpo_trainer(seed: int) -> None:
    policy, _ = random_logps(9, seed=110 + seed, scale=0.4)
    cases = [
        (CPOHingeLoss(beta=0.3, alpha=0.7), "hinge", 0.3, 0.0, 0.7, 0.0),
        (CPOIPOLoss(beta=0.2, alpha=1.0), "ipo", 0.2, 0.0, 1.0, 0.0),
        (CPOLoss(beta=0.1, label_smoothing=0.1, alpha=1.0), "sigmoid", 0.1, 0.1, 1.0, 0.0),
        (SimPOLoss(beta=2.0, gamma=0.5, label_smoothing=0.15), "simpo", 2.0, 0.15, 0.0, 0.0),
        (AlphaPOLoss(beta=2.0, gamma=0.5, alpha=0.2), "simpo", 2.0, 0.0, 0.0, 0.2),
    ]
    for loss, loss_type, beta, eps, cpo_alpha, alpha in cases:
        expected = trl_cpo_loss(policy, loss_type, beta, eps, cpo_alpha, alpha)
        assert loss(policy, None, {}).loss.item() == pytest.approx(expected.item(), rel=1e-12), loss_type


def test_alphapo_alpha_zero_is_simpo_and_rewards_are_shaped() -> None:
    policy, _ = random_logps(6, seed=120, scale=0.5)
    simpo = SimPOLoss(beta=2.0, gamma=0.5, label_smoothing=0.1)(policy, None, {})
    zero = AlphaPOLoss(beta=2.0, gamma=0.5, label_smoothing=0.1, alpha=0.0)(policy, None, {})
    assert torch.equal(simpo.per_pair, zero.per_pair)
    near = AlphaPOLoss(beta=2.0, gamma=0.5, label_smoothing=0.1, alpha=1e-7)(policy, None, {})
    assert near.loss.item() == pytest.approx(simpo.loss.item(), rel=1e-5)
    out = AlphaPOLoss(beta=2.0, gamma=0.5, alpha=0.25)(policy, None, {})
    expected = [alpha_reward(m, 2.0, 0.25) for m in policy.chosen_means.tolist()]
    assert out.chosen_rewards.tolist() == pytest.approx(expected, rel=1e-12) and not out.chosen_rewards.requires_grad


def test_alphapo_is_finite_for_very_unlikely_responses() -> None:
    for dtype in (torch.float64, torch.float32):
        sums = torch.tensor([-5e4, -1.0, -1.0, -5e4], dtype=dtype, requires_grad=True)
        out = AlphaPOLoss(alpha=0.5)(SequenceLogProbs(sums, torch.ones(4, dtype=torch.long)), None, {})
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(sums.grad).all(), dtype


def test_cpo_variants_log_trls_rewards() -> None:
    """TRL: ``chosen_rewards = self.beta * (policy_chosen_logps...)`` on the logps the loss type
    reads: sums for hinge, per-token means for ipo."""
    policy, _ = random_logps(4, seed=121)
    hinge = CPOHingeLoss(beta=0.3)(policy, None, {})
    torch.testing.assert_close(hinge.chosen_rewards, 0.3 * policy.chosen)
    ipo = CPOIPOLoss(beta=0.3)(policy, None, {})
    torch.testing.assert_close(ipo.rejected_rewards, 0.3 * policy.rejected_means)


# -- 6. KTO's apo_zero_unpaired ---------------------------------------------------------------
def apo_zero_unpaired(h: list[float], labels: list[bool], beta: float, wd: float, wu: float) -> float:
    """APO-zero (arXiv 2408.06266, eq. 7) split by label, + 1 on the desirable side as TRL: mean over rows."""
    losses = [wd * (1 - sigmoid(beta * x)) if y else wu * sigmoid(beta * x) for x, y in zip(h, labels)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("n", [1, 6, 25])
@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.8)])
def test_apo_zero_unpaired_matches_float64_formula(n: int, beta: float, wd: float, wu: float) -> None:
    """TRL 1.16 ``KTOTrainer.kto_loss`` with ``loss_type="apo_zero_unpaired"`` (no KL rows,
    ``calculate_KL`` is False)::

        chosen_losses = 1 - F.sigmoid(self.beta * chosen_logratios)
        ...
        rejected_losses = F.sigmoid(self.beta * rejected_logratios)
        ...
        losses = torch.cat(
            (self.desirable_weight * chosen_losses, self.undesirable_weight * rejected_losses), 0,
        )
    and ``loss = losses.nanmean()``: a mean over rows, which the order does not change.
    """
    policy, reference = random_logps(n, seed=130 + n, scale=0.3)
    sums, ref = policy.sums[:n], reference.sums[:n]
    labels = [(i * 7) % 3 != 0 for i in range(n)]
    label = torch.tensor(labels)
    h = (sums - ref).tolist()
    out = APOZeroUnpairedLoss(beta, wd, wu)(SequenceLogProbs(sums, policy.counts[:n]), SequenceLogProbs(ref, reference.counts[:n]),
                                            {"label": label})
    assert out.loss.item() == pytest.approx(apo_zero_unpaired(h, labels, beta, wd, wu), rel=1e-12)
    # TRL's own lines
    logratios = sums - ref
    chosen_losses = 1 - torch.sigmoid(beta * logratios[label])
    rejected_losses = torch.sigmoid(beta * logratios[~label])
    trl = torch.cat((wd * chosen_losses, wu * rejected_losses), 0).nanmean()
    assert out.loss.item() == pytest.approx(trl.item(), rel=1e-13)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * x for x, y in zip(h, labels) if y], rel=1e-13)
    assert out.rejected_rewards.tolist() == pytest.approx([beta * x for x, y in zip(h, labels) if not y], rel=1e-13)
    assert out.per_pair is None


def test_apo_zero_unpaired_gradient_and_layout() -> None:
    """d/dh: desirable -w_d beta s(1-s), undesirable +w_u beta s(1-s), s = sigmoid(beta h), over n rows;
    on one chosen and one rejected row per pair it is APO-zero's loss exactly."""
    beta, wd, wu = 0.4, 1.2, 0.9
    policy, reference = random_logps(5, seed=140, scale=0.3)
    sums = policy.sums[:5].clone().requires_grad_(True)
    labels = [True, False, False, True, False]
    out = APOZeroUnpairedLoss(beta, wd, wu)(SequenceLogProbs(sums, policy.counts[:5]),
                                            SequenceLogProbs(reference.sums[:5], reference.counts[:5]), {"label": torch.tensor(labels)})
    (grad,) = torch.autograd.grad(out.loss, sums)
    for i, y in enumerate(labels):
        s = sigmoid(beta * (sums[i].item() - reference.sums[i].item()))
        assert grad[i].item() == pytest.approx((-wd if y else wu) * beta * s * (1 - s) / 5, rel=1e-12)
    loss = APOZeroUnpairedLoss()
    assert loss.data_requirements == DataRequirements(BatchLayout.UNPAIRED, ()) and loss.needs_reference and not loss.pairwise
    paired, paired_ref = random_logps(6, seed=141)
    unpaired = loss(paired, paired_ref, {"label": torch.tensor([True] * 6 + [False] * 6)})
    assert 2 * unpaired.loss.item() == pytest.approx(APOZeroLoss(0.1)(paired, paired_ref, {}).loss.item(), rel=1e-13)
    with pytest.raises(KeyError, match="label"):
        loss(paired, paired_ref, {})
    with pytest.raises(ValueError, match="one log-prob per labelled row"):
        loss(paired, paired_ref, {"label": torch.tensor([True, False])})


# -- 6. f-DPO's alpha beyond 1 ------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.5, 3.0])
def test_alpha_divergence_above_one_matches_formula(alpha: float) -> None:
    """f-DPO (arXiv 2309.16240): f'(u) = (1 - u^(-alpha))/alpha, defined with 0 outside dom f' for
    every alpha > 0; TRL's ``f_alpha_divergence_coef`` c = 1 - alpha < 0."""
    beta = 0.3
    policy, reference = random_logps(7, seed=150, scale=0.05)
    sums = policy.sums.clone().requires_grad_(True)
    out = DPOLoss(beta=beta, divergence="alpha_divergence", divergence_alpha=alpha)(SequenceLogProbs(sums, policy.counts), reference, {})
    f = lambda log_u: (1 - math.exp(-alpha * log_u)) / alpha  # noqa: E731
    expected = [-log_sigmoid(beta * (f(pw - rw) - f(pl - rl))) for pw, pl, rw, rl, _, _ in per_pair_rows(policy, reference)]
    assert out.loss.item() == pytest.approx(sum(expected) / 7, rel=1e-12)
    (grad,) = torch.autograd.grad(out.loss, sums)
    for i, (pw, pl, rw, rl, _, _) in enumerate(per_pair_rows(policy, reference)):
        z = beta * (f(pw - rw) - f(pl - rl))
        dz = -sigmoid(-z) * beta / 7
        assert grad[i].item() == pytest.approx(dz * math.exp(-alpha * (pw - rw)), rel=1e-10)
        assert grad[7 + i].item() == pytest.approx(-dz * math.exp(-alpha * (pl - rl)), rel=1e-10)
    # TRL's coefficient c = 1 - alpha: (u^(c-1) - 1) / (c - 1)
    c = 1 - alpha
    u = math.exp(0.3)
    assert (u ** (c - 1) - 1) / (c - 1) == pytest.approx(f(0.3), rel=1e-14)


@pytest.mark.parametrize("alpha", [0.0, -0.5, math.inf, math.nan])
def test_alpha_divergence_refuses_alpha_at_or_below_zero_saying_why(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"divergence_alpha must be > 0 and finite.*reverse_kl"):
        DPOLoss(divergence="alpha_divergence", divergence_alpha=alpha)


@pytest.mark.parametrize("make,key", [
    (lambda: SimPOLoss(label_smoothing=0.5), "label_smoothing"),
    (lambda: AlphaPOLoss(alpha=math.nan), "alpha"),
    (lambda: AlphaPOLoss(gamma=-1.0), "gamma"),
    (lambda: CPOHingeLoss(beta=0.0), "beta"),
    (lambda: CPOIPOLoss(alpha=-1.0), "alpha"),
    (lambda: APOZeroUnpairedLoss(desirable_weight=0.0), "desirable_weight"),
])
def test_bad_arguments_name_the_recipe_key(make, key: str) -> None:
    with pytest.raises(ValueError, match=rf"model\.init_args\.loss\.init_args\.{key} must"):
        make()


# -- 4. wrapper order -------------------------------------------------------------------------
def test_wrapper_order_that_matches_trl_leaves_the_nll_on_raw_tokens() -> None:
    """TRL 1.16 with ``loss_type=["sigmoid", "sft"]`` and ``ld_alpha``: the sigmoid term reads the
    length-desensitised sums (LD-DPO, arXiv 2409.06411), the ``sft`` term
    ``-chosen_per_token_logps[chosen_mask].mean()`` reads the raw tokens. That is
    ``MixtureLoss([LengthDesensitized(DPOLoss), ChosenNLLLoss])``; the other nesting reweights the
    NLL's tokens too."""
    from dpo_lightning.losses import ChosenNLLLoss, LengthDesensitized, MixtureLoss
    from test_losses_options import ld_sums, row_tokens, token_logps

    beta, alpha, b = 0.2, 0.3, 5
    policy, reference = token_logps(b, seed=160)
    lp, lr = ld_sums(policy, alpha), ld_sums(reference, alpha)
    dpo = sum(-log_sigmoid(beta * ((lp[i] - lr[i]) - (lp[b + i] - lr[b + i]))) for i in range(b)) / b
    raw_nll = -sum(sum(row_tokens(policy, i)) for i in range(b)) / sum(len(row_tokens(policy, i)) for i in range(b))
    ld_nll = -sum(lp[:b]) / sum(len(row_tokens(policy, i)) for i in range(b))
    trl_order = MixtureLoss([LengthDesensitized(DPOLoss(beta), ld_alpha=alpha), ChosenNLLLoss()])
    other = LengthDesensitized(MixtureLoss([DPOLoss(beta), ChosenNLLLoss()]), ld_alpha=alpha)
    assert trl_order.needs_token_logprobs and trl_order.needs_reference_tokens
    assert trl_order(policy, reference, {}).loss.item() == pytest.approx(dpo + raw_nll, rel=1e-12)
    assert other(policy, reference, {}).loss.item() == pytest.approx(dpo + ld_nll, rel=1e-12)
    assert abs(raw_nll - ld_nll) > 1e-3  # the two orders differ on these rows


# -- 9. LD-DPO on a precomputed reference -------------------------------------------------------
@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_ld_dpo_from_cached_sums_beyond_the_shared_length_matches_the_token_form(ld_alpha: float) -> None:
    """LD-DPO (arXiv 2409.06411): log pi_LD = sum_{t <= l_p} + alpha sum_{t > l_p}
    = log pi - (1 - alpha) * (sum beyond l_p); the cached ``beyond_shared`` gives the reference's
    values, loss and gradients (through the policy) of the per-token form."""
    from dpo_lightning.losses import LengthDesensitized
    from dpo_lightning.losses.length import beyond_shared_sums, length_desensitized
    from test_losses_options import ld_sums, row_tokens, token_logps

    beta, b = 0.3, 6
    policy, reference = token_logps(b, seed=170)
    tail = beyond_shared_sums(reference)
    for i in range(b):  # written out: the tokens beyond min(|y_w|, |y_l|)
        w, l = row_tokens(reference, i), row_tokens(reference, b + i)
        shared = min(len(w), len(l))
        assert tail[i].item() == pytest.approx(sum(w[shared:]), abs=1e-12)
        assert tail[b + i].item() == pytest.approx(sum(l[shared:]), abs=1e-12)
    cached = SequenceLogProbs(reference.sums, reference.counts, beyond_shared=tail)
    assert length_desensitized(cached, ld_alpha, "reference").sums.tolist() == pytest.approx(ld_sums(reference, ld_alpha), rel=1e-12, abs=1e-12)
    loss = LengthDesensitized(DPOLoss(beta), ld_alpha)
    tokens = policy.tokens.clone().requires_grad_(True)
    live_policy = SequenceLogProbs(tokens.sum(-1), policy.counts, tokens, policy.token_mask)
    live = loss(live_policy, reference, {})
    (live_grad,) = torch.autograd.grad(live.loss, tokens)
    tokens2 = policy.tokens.clone().requires_grad_(True)
    out = loss(SequenceLogProbs(tokens2.sum(-1), policy.counts, tokens2, policy.token_mask), cached, {})
    (grad,) = torch.autograd.grad(out.loss, tokens2)
    assert out.loss.item() == pytest.approx(live.loss.item(), rel=1e-12)
    torch.testing.assert_close(grad, live_grad, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="per-token reference log-probs.*reference.precompute"):
        LengthDesensitized(DPOLoss(beta), 0.5)(policy, SequenceLogProbs(reference.sums, reference.counts), {})


# -- 3. WPO's aligned weights --------------------------------------------------------------------
def test_wpo_aligned_weights_are_trls() -> None:
    """TRL 1.16 ``DPOTrainer`` with ``use_weighting`` (WPO eq. 2, arXiv 2406.11827)::

        with torch.no_grad():
            logprobs = F.log_softmax(logits, dim=-1)
            weights_adjustment_factor = torch.logsumexp(2 * logprobs, dim=-1)  # same as sum(probs**2) in log space
            per_token_logps_adjusted = per_token_logps - weights_adjustment_factor
            all_weights = (per_token_logps_adjusted * loss_mask).sum(-1) / loss_mask.sum(-1)
            chosen_weights = all_weights[:num_examples]
            rejected_weights = all_weights[num_examples:]
            output["policy_weights"] = torch.clamp(torch.exp(chosen_weights + rejected_weights), max=1)

    and ``per_sequence_loss * policy_weights`` before the mean. Written here from logits, against
    our selector's ``square_mass`` on every log-prob path, and a float64 formula per pair.
    """
    from dpo_lightning.losses import WPOWeighted
    from dpo_lightning.modules.logprobs import logits_to_completion_logprobs

    g = torch.Generator().manual_seed(180)
    n, t, v, b = 6, 9, 11, 3
    logits = 3 * torch.randn(n, t, v, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, v, (n, t), generator=g)
    completion = torch.zeros(n, t, dtype=torch.long)
    for row, (start, end) in enumerate([(2, 9), (3, 6), (1, 8), (4, 9), (2, 4), (5, 9)]):
        completion[row, start:end] = 1
    policy = logits_to_completion_logprobs(logits, input_ids, completion, with_square_mass=True)
    reference = SequenceLogProbs(policy.sums - 0.5, policy.counts)
    # TRL's lines on the same logits
    shift_logits, labels, loss_mask = logits[:, :-1], input_ids[:, 1:], completion[:, 1:].bool()
    logprobs = F.log_softmax(shift_logits, dim=-1)
    per_token_logps = torch.gather(logprobs, 2, labels[..., None])[..., 0] * loss_mask
    adjusted = per_token_logps - torch.logsumexp(2 * logprobs, dim=-1)
    all_weights = (adjusted * loss_mask).sum(-1) / loss_mask.sum(-1)
    trl_weights = torch.clamp(torch.exp(all_weights[:b] + all_weights[b:]), max=1)
    out = WPOWeighted(DPOLoss(0.1))(policy, reference, {})
    torch.testing.assert_close(out.metrics["wpo_weight"], trl_weights, rtol=1e-12, atol=0)
    # float64 per pair from the paper: p_t / sum_v p_v^2, geometric mean over tokens, product, min 1
    probs = logprobs.exp()
    for i in range(b):
        logw = 0.0
        for row in (i, b + i):
            terms = [math.log(probs[row, s, labels[row, s]].item() / (probs[row, s] ** 2).sum().item())
                     for s in range(t - 1) if loss_mask[row, s]]
            logw += sum(terms) / len(terms)
        assert out.metrics["wpo_weight"][i].item() == pytest.approx(min(1.0, math.exp(logw)), rel=1e-12)
    dpo = DPOLoss(0.1)(policy, reference, {})
    assert out.loss.item() == pytest.approx((trl_weights * dpo.per_pair).mean().item(), rel=1e-12)
    plain = WPOWeighted(DPOLoss(0.1), aligned=False)(policy, reference, {})
    assert (plain.metrics["wpo_weight"] <= out.metrics["wpo_weight"] + 1e-15).all()
    with pytest.raises(ValueError, match="square_mass.*outermost.*aligned: false"):
        WPOWeighted(DPOLoss(0.1))(SequenceLogProbs(policy.sums, policy.counts), reference, {})


def test_square_mass_is_the_same_on_every_log_prob_path(tokenizer) -> None:
    """full logits, the chunked LM head and the shared-prompt layout give the same square_mass."""
    from conftest import tiny_spec
    from dpo_lightning.models import load_causal_lm
    from dpo_lightning.modules.logprobs import chunked_model_logprobs, model_logprobs, shared_prompt_model_logprobs

    model = load_causal_lm(tiny_spec(), tokenizer).double()
    prompts = [[1, 5, 7, 9], [1, 6, 8]]
    completions = [[11, 12, 13, 2], [14, 2], [15, 16, 2], [17, 18, 19, 20, 2]]  # chosen 0, 1; rejected 2, 3
    rows = [prompts[0] + completions[0], prompts[1] + completions[1], prompts[0] + completions[2], prompts[1] + completions[3]]
    width = max(map(len, rows))
    input_ids = torch.zeros(4, width, dtype=torch.long)
    attention = torch.zeros(4, width, dtype=torch.long)
    completion = torch.zeros(4, width, dtype=torch.long)
    for r, ids in enumerate(rows):
        p = len(prompts[r % 2])
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        completion[r, p : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
    with torch.no_grad():
        full = model_logprobs(model, batch, with_square_mass=True)
        chunked = chunked_model_logprobs(model, batch, chunk_size=3, with_square_mass=True)
        shared = shared_prompt_model_logprobs(model, batch, chunk_size=3, with_square_mass=True)
    assert full.square_mass is not None and (full.square_mass < 0).all()
    torch.testing.assert_close(chunked.square_mass, full.square_mass, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(shared.square_mass, full.square_mass, rtol=1e-8, atol=1e-8)
    assert model_logprobs(model, batch).square_mass is None


# -- docs/losses.md ----------------------------------------------------------------------------------
def test_readme_loss_tables_list_every_loss_with_its_trl_column() -> None:
    """Every loss class exported by dpo_lightning.losses has a row (class, equation, TRL 1.16, recipe)."""
    import inspect as _inspect

    from conftest import ROOT
    from dpo_lightning import losses

    readme = (ROOT / "docs" / "losses.md").read_text()
    section = readme[readme.index("# Losses"):readme.index("## Reward model -> scores -> ODPO")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    names = [n for n in losses.__all__ if _inspect.isclass(getattr(losses, n)) and issubclass(getattr(losses, n), torch.nn.Module)
             and n not in ("PreferenceLoss", "ComposedLoss")]  # base classes
    assert len(names) > 30
    for name in names:
        row = next((r for r in rows if r.startswith(f"| `{name}(")), None)
        assert row is not None, name
        assert row.count(" | ") >= 3, name  # equation, TRL, recipe columns
