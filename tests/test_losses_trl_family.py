"""EXO, NCA, SPPO-hard, AOT (paired, unpaired), APO (zero, down), DiscoPOP, DPOP, CPO and
length-normalised DPO against float64 formulas written here with python floats (TRL 1.16's
per-pair forms), their gradients, their argument checks and their reductions to DPO."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from conftest import log_sigmoid, random_logps
from dpo_lightning.losses import (
    AOTLoss,
    AOTUnpairedLoss,
    APODownLoss,
    APOZeroLoss,
    CPOLoss,
    DiscoPOPLoss,
    DPOLoss,
    DPOPLoss,
    EXOLoss,
    NCALoss,
    NormalizedDPOLoss,
    SequenceLogProbs,
    SPPOHardLoss,
)

SHAPES = [1, 4, 33]
DIVERGENCES = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


# -- the formulas, one pair at a time, python floats --------------------------------------------
def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def f_prime(log_u: float, divergence: str = "reverse_kl", alpha: float = 0.5) -> float:
    """f'(u) of f-DPO at u = exp(log_u)."""
    if divergence == "reverse_kl":
        return log_u
    if divergence == "forward_kl":
        return 1 - 1 / math.exp(log_u)
    if divergence == "js_divergence":
        u = math.exp(log_u)
        return math.log(2 * u / (1 + u))
    return (1 - math.exp(log_u) ** -alpha) / alpha


def rows(policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> list[tuple]:
    """Per pair: (policy w, policy l, reference w, reference l, count w, count l) as python floats."""
    b = policy.sums.shape[0] // 2
    p, c = policy.sums.tolist(), policy.counts.tolist()
    r = reference.sums.tolist() if reference is not None else [0.0] * (2 * b)
    return [(p[i], p[b + i], r[i], r[b + i], c[i], c[b + i]) for i in range(b)]


def margin(pw, pl, rw, rl, divergence="reverse_kl", alpha=0.5) -> float:
    return f_prime(pw - rw, divergence, alpha) - f_prime(pl - rl, divergence, alpha)


def exo(pw, pl, rw, rl, nw, nl, beta, eps, divergence="reverse_kl", alpha=0.5) -> float:
    z = beta * margin(pw, pl, rw, rl, divergence, alpha)
    q_w, q_l = sigmoid(z), sigmoid(-z)
    return q_w * (log_sigmoid(z) - math.log(1 - eps)) + q_l * (log_sigmoid(-z) - math.log(eps))


def nca(pw, pl, rw, rl, nw, nl, beta) -> float:
    r_w, r_l = beta * (pw - rw), beta * (pl - rl)
    return -log_sigmoid(r_w) - 0.5 * log_sigmoid(-r_w) - 0.5 * log_sigmoid(-r_l)


def sppo_hard(pw, pl, rw, rl, nw, nl, beta) -> float:
    return ((pw - rw) - 0.5 / beta) ** 2 + ((pl - rl) + 0.5 / beta) ** 2


def apo_zero(pw, pl, rw, rl, nw, nl, beta) -> float:
    return 1 - sigmoid(beta * (pw - rw)) + sigmoid(beta * (pl - rl))


def apo_down(pw, pl, rw, rl, nw, nl, beta) -> float:
    return sigmoid(beta * (pw - rw)) + 1 - sigmoid(beta * ((pw - rw) - (pl - rl)))


def discopop(pw, pl, rw, rl, nw, nl, beta, tau, divergence="reverse_kl", alpha=0.5) -> float:
    rho = beta * margin(pw, pl, rw, rl, divergence, alpha)
    m = sigmoid(rho / tau)
    return (1 - m) * -log_sigmoid(rho) + m * math.exp(-rho)


def dpop(pw, pl, rw, rl, nw, nl, beta, lam) -> float:
    return -log_sigmoid(beta * (((pw - rw) - (pl - rl)) - lam * max(0.0, rw - pw)))


def sigmoid_norm(pw, pl, rw, rl, nw, nl, beta, divergence="reverse_kl", alpha=0.5) -> float:
    d = f_prime(pw - rw, divergence, alpha) / nw - f_prime(pl - rl, divergence, alpha) / nl
    return -log_sigmoid(beta * d)


def smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def aot_batch(data: list[tuple], beta: float, eps: float) -> float:
    policy = sorted(pw - pl for pw, pl, _, _, _, _ in data)
    ref = sorted(rw - rl for _, _, rw, rl, _, _ in data)
    return sum(smoothed(beta * (a - c), eps) for a, c in zip(policy, ref)) / len(data)


def aot_unpaired_batch(data: list[tuple], beta: float, eps: float) -> float:
    chosen = sorted(pw - rw for pw, _, rw, _, _, _ in data)
    rejected = sorted(pl - rl for _, pl, _, rl, _, _ in data)
    return sum(smoothed(beta * (a - c), eps) for a, c in zip(chosen, rejected)) / len(data)


def cpo_batch(data: list[tuple], beta: float, eps: float, alpha: float) -> float:
    preference = sum(smoothed(beta * (pw - pl), eps) for pw, pl, _, _, _, _ in data) / len(data)
    nll = -sum(pw for pw, _, _, _, _, _ in data) / sum(nw for _, _, _, _, nw, _ in data)
    return preference + alpha * nll


def mean_of(per_pair, **kwargs):
    """A batch formula from a per-pair one."""
    return lambda data: sum(per_pair(*row, **kwargs) for row in data) / len(data)


#: (loss, batch formula on rows(...)); every loss with its hyperparameters away from the defaults.
CASES = {
    "exo": (lambda: EXOLoss(beta=0.2, label_smoothing=0.01), mean_of(exo, beta=0.2, eps=0.01)),
    "exo_default": (lambda: EXOLoss(), mean_of(exo, beta=0.1, eps=1e-3)),
    "nca": (lambda: NCALoss(beta=0.3), mean_of(nca, beta=0.3)),
    "sppo_hard": (lambda: SPPOHardLoss(beta=0.25), mean_of(sppo_hard, beta=0.25)),
    "aot": (lambda: AOTLoss(beta=0.2, label_smoothing=0.1), lambda d: aot_batch(d, 0.2, 0.1)),
    "aot_unpaired": (lambda: AOTUnpairedLoss(beta=0.2, label_smoothing=0.05), lambda d: aot_unpaired_batch(d, 0.2, 0.05)),
    "apo_zero": (lambda: APOZeroLoss(beta=0.15), mean_of(apo_zero, beta=0.15)),
    "apo_down": (lambda: APODownLoss(beta=0.15), mean_of(apo_down, beta=0.15)),
    "discopop": (lambda: DiscoPOPLoss(beta=0.1, tau=0.05), mean_of(discopop, beta=0.1, tau=0.05)),
    "discopop_tau": (lambda: DiscoPOPLoss(beta=0.3, tau=0.7), mean_of(discopop, beta=0.3, tau=0.7)),
    "dpop": (lambda: DPOPLoss(beta=0.1, lam=50.0), mean_of(dpop, beta=0.1, lam=50.0)),
    "dpop_small_lam": (lambda: DPOPLoss(beta=0.4, lam=0.5), mean_of(dpop, beta=0.4, lam=0.5)),
    "cpo": (lambda: CPOLoss(beta=0.2, label_smoothing=0.1, alpha=0.7), lambda d: cpo_batch(d, 0.2, 0.1, 0.7)),
    "cpo_default": (lambda: CPOLoss(), lambda d: cpo_batch(d, 0.1, 0.0, 1.0)),
    "sigmoid_norm": (lambda: NormalizedDPOLoss(beta=2.0), mean_of(sigmoid_norm, beta=2.0)),
}
UNSORTED = {"aot", "aot_unpaired"}  # no per-pair losses


def evaluate(loss, policy: SequenceLogProbs, reference: SequenceLogProbs):
    return loss(policy, reference if loss.needs_reference else None, {})


# -- values -------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", SHAPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_formula(case: str, batch: int) -> None:
    make, formula = CASES[case]
    loss = make()
    policy, reference = random_logps(batch, seed=batch + 100, scale=1.0)
    data = rows(policy, reference if loss.needs_reference else None)
    out = evaluate(loss, policy, reference)
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(formula(data), rel=1e-12, abs=1e-12)
    if case in UNSORTED:
        assert out.per_pair is None
    else:
        assert out.per_pair.shape == (batch,)
        assert out.per_pair.mean().item() == pytest.approx(out.loss.item(), rel=1e-13, abs=1e-13)
        if not case.startswith("cpo"):  # CPO's per-pair term holds a share of the batch's token mean
            per_pair = [formula([row]) for row in data]
            assert out.per_pair.tolist() == pytest.approx(per_pair, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("batch", SHAPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_losses_match_formula(divergence: str, batch: int) -> None:
    policy, reference = random_logps(batch, seed=batch + 200, scale=0.1)
    data = rows(policy, reference)
    alpha = 0.3
    losses = [
        (EXOLoss(beta=0.5, label_smoothing=0.02, divergence=divergence, divergence_alpha=alpha),
         mean_of(exo, beta=0.5, eps=0.02, divergence=divergence, alpha=alpha)),
        (DiscoPOPLoss(beta=0.5, tau=0.1, divergence=divergence, divergence_alpha=alpha),
         mean_of(discopop, beta=0.5, tau=0.1, divergence=divergence, alpha=alpha)),
        (NormalizedDPOLoss(beta=3.0, divergence=divergence, divergence_alpha=alpha),
         mean_of(sigmoid_norm, beta=3.0, divergence=divergence, alpha=alpha)),
    ]
    for loss, formula in losses:
        assert loss(policy, reference, {}).loss.item() == pytest.approx(formula(data), rel=1e-12, abs=1e-12), loss


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewards_and_reference_flags(case: str) -> None:
    loss = CASES[case][0]()
    policy, reference = random_logps(5, seed=17)
    out = evaluate(loss, policy, reference)
    beta = loss.beta
    if isinstance(loss, CPOLoss):
        assert not loss.needs_reference
        torch.testing.assert_close(out.chosen_rewards, beta * policy.chosen)
        torch.testing.assert_close(out.rejected_rewards, beta * policy.rejected)
        assert out.metrics["nll"].item() == pytest.approx(-policy.chosen.sum().item() / policy.counts[:5].sum().item())
    else:
        assert loss.needs_reference and loss.pairwise
        torch.testing.assert_close(out.chosen_rewards, beta * (policy.chosen - reference.chosen))
        torch.testing.assert_close(out.rejected_rewards, beta * (policy.rejected - reference.rejected))
        with pytest.raises(ValueError, match="reference"):
            loss(policy, None, {})
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


# -- gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4, 9])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_matches_finite_difference_of_formula(case: str, batch: int) -> None:
    """autograd of the loss w.r.t. the policy sums == central differences of the python formula."""
    make, formula = CASES[case]
    loss = make()
    policy, reference = random_logps(batch, seed=batch + 300, scale=0.5)
    sums = policy.sums.clone().requires_grad_(True)
    out = evaluate(loss, SequenceLogProbs(sums, policy.counts), reference)
    (grad,) = torch.autograd.grad(out.loss, sums)
    h = 1e-5
    for k in range(2 * batch):
        up, down = policy.sums.clone(), policy.sums.clone()
        up[k] += h
        down[k] -= h
        ref = reference if loss.needs_reference else None
        numeric = (formula(rows(SequenceLogProbs(up, policy.counts), ref))
                   - formula(rows(SequenceLogProbs(down, policy.counts), ref))) / (2 * h)
        assert grad[k].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9), (case, k)


def test_exo_gradient_is_analytic_and_vanishes_at_its_minimum() -> None:
    """dL/dz = sigmoid(z) sigmoid(-z) (z - log((1 - eps)/eps)); L = 0 at z = log((1 - eps)/eps)."""
    beta, eps = 0.3, 0.02
    policy, reference = random_logps(6, seed=4, scale=0.5)
    sums = policy.sums.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(EXOLoss(beta, eps)(SequenceLogProbs(sums, policy.counts), reference, {}).loss, sums)
    for i, (pw, pl, rw, rl, _, _) in enumerate(rows(policy, reference)):
        z = beta * ((pw - rw) - (pl - rl))
        dz = sigmoid(z) * sigmoid(-z) * (z - math.log((1 - eps) / eps)) * beta / 6
        assert grad[i].item() == pytest.approx(dz, rel=1e-10) and grad[6 + i].item() == pytest.approx(-dz, rel=1e-10)
    target = math.log((1 - eps) / eps) / beta  # the margin d at the minimum
    at_min = SequenceLogProbs(torch.tensor([target, 0.0], dtype=torch.float64, requires_grad=True), torch.tensor([3, 4]))
    zero = SequenceLogProbs(torch.zeros(2, dtype=torch.float64), torch.tensor([3, 4]))
    out = EXOLoss(beta, eps)(at_min, zero, {})
    (grad,) = torch.autograd.grad(out.loss, at_min.sums)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-14) and grad.abs().max().item() < 1e-12


def test_sppo_hard_gradient_and_targets() -> None:
    beta = 0.2
    policy, reference = random_logps(5, seed=8)
    sums = policy.sums.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(SPPOHardLoss(beta)(SequenceLogProbs(sums, policy.counts), reference, {}).loss, sums)
    for i, (pw, pl, rw, rl, _, _) in enumerate(rows(policy, reference)):
        assert grad[i].item() == pytest.approx(2 * ((pw - rw) - 0.5 / beta) / 5, rel=1e-12)
        assert grad[5 + i].item() == pytest.approx(2 * ((pl - rl) + 0.5 / beta) / 5, rel=1e-12)
    on_target = SequenceLogProbs(reference.sums + torch.tensor([2.5] * 5 + [-2.5] * 5, dtype=torch.float64), policy.counts)
    assert SPPOHardLoss(beta)(on_target, reference, {}).loss.item() == pytest.approx(0.0, abs=1e-24)


def test_dpop_gradient_is_analytic() -> None:
    """z = beta (d - lam max(0, r_w - p_w)): dz/dp_w = beta (1 + lam [p_w < r_w]), dz/dp_l = -beta."""
    beta, lam = 0.1, 5.0
    policy, reference = random_logps(8, seed=10, scale=0.3)
    sums = policy.sums.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(DPOPLoss(beta, lam)(SequenceLogProbs(sums, policy.counts), reference, {}).loss, sums)
    below = 0
    for i, (pw, pl, rw, rl, _, _) in enumerate(rows(policy, reference)):
        z = beta * ((pw - rw) - (pl - rl) - lam * max(0.0, rw - pw))
        dl_dz = -sigmoid(-z) / 8
        below += pw < rw
        assert grad[i].item() == pytest.approx(dl_dz * beta * (1 + lam * (pw < rw)), rel=1e-12)
        assert grad[8 + i].item() == pytest.approx(-dl_dz * beta, rel=1e-12)
    assert 0 < below < 8  # both sides of the kink were exercised


def test_cpo_gradient_is_analytic() -> None:
    """d/dp_w = -beta s/B - alpha/N_w, d/dp_l = +beta s/B, s = (1-eps) sigmoid(-z) - eps sigmoid(z)."""
    beta, eps, alpha = 0.3, 0.1, 0.7
    policy, _ = random_logps(6, seed=12, scale=0.3)
    sums = policy.sums.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(CPOLoss(beta, eps, alpha)(SequenceLogProbs(sums, policy.counts), None, {}).loss, sums)
    tokens = sum(policy.counts[:6].tolist())
    for i, (pw, pl, _, _, _, _) in enumerate(rows(policy)):
        z = beta * (pw - pl)
        s = (1 - eps) * sigmoid(-z) - eps * sigmoid(z)
        assert grad[i].item() == pytest.approx(-beta * s / 6 - alpha / tokens, rel=1e-12)
        assert grad[6 + i].item() == pytest.approx(beta * s / 6, rel=1e-12)


def test_apo_gradient_directions_at_the_reference() -> None:
    """At pi = pi_ref: APO-zero raises chosen and lowers rejected; APO-down leaves chosen still
    (sigmoid'(0) - sigmoid'(0) = 0) and lowers rejected."""
    policy, _ = random_logps(4, seed=13)
    for loss, chosen_sign in ((APOZeroLoss(0.1), -1), (APODownLoss(0.1), 0)):
        sums = policy.sums.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(SequenceLogProbs(sums, policy.counts), policy, {}).loss, sums)
        if chosen_sign:
            assert (grad[:4] < 0).all()
        else:
            assert grad[:4].abs().max().item() < 1e-15
        torch.testing.assert_close(grad[4:], torch.full((4,), 0.1 * 0.25 / 4, dtype=torch.float64))


# -- reductions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", SHAPES)
def test_dpop_lam_zero_is_dpo_exactly(batch: int) -> None:
    policy, reference = random_logps(batch, seed=batch + 400)
    dpo = DPOLoss(beta=0.2)(policy, reference, {})
    dpop = DPOPLoss(beta=0.2, lam=0.0)(policy, reference, {})
    assert dpop.loss.item() == dpo.loss.item()
    assert torch.equal(dpop.per_pair, dpo.per_pair)


def test_dpop_without_a_likelihood_drop_is_dpo() -> None:
    policy, reference = random_logps(7, seed=14)
    raised = policy.sums.clone()
    raised[:7] = reference.sums[:7] + torch.rand(7, dtype=torch.float64)  # log pi(y_w) > log pi_ref(y_w)
    policy = SequenceLogProbs(raised, policy.counts)
    out = DPOPLoss(beta=0.2, lam=50.0)(policy, reference, {})
    assert out.loss.item() == pytest.approx(DPOLoss(beta=0.2)(policy, reference, {}).loss.item(), rel=1e-15)
    assert out.metrics["dpop_penalty"].abs().max().item() == 0.0


@pytest.mark.parametrize("batch", SHAPES)
def test_normalized_dpo_with_equal_lengths_is_dpo_on_means(batch: int) -> None:
    policy, reference = random_logps(batch, seed=batch + 500)
    n = 7
    counts = torch.full((2 * batch,), n)
    policy, reference = SequenceLogProbs(policy.sums, counts), SequenceLogProbs(reference.sums, counts)
    normalized = NormalizedDPOLoss(beta=1.5)(policy, reference, {})
    dpo = DPOLoss(beta=1.5)(SequenceLogProbs(policy.sums / n, counts), SequenceLogProbs(reference.sums / n, counts), {})
    assert normalized.loss.item() == pytest.approx(dpo.loss.item(), rel=1e-14)
    # with lengths 1 it is DPO on sums exactly
    ones = torch.ones(2 * batch, dtype=torch.long)
    assert (NormalizedDPOLoss(beta=0.1)(SequenceLogProbs(policy.sums, ones), reference, {}).loss.item()
            == pytest.approx(DPOLoss(beta=0.1)(policy, reference, {}).loss.item(), rel=1e-15))


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("loss_class", [AOTLoss, AOTUnpairedLoss])
def test_aot_batch_of_one_is_dpo_with_label_smoothing(loss_class, eps: float) -> None:
    for seed in range(5):
        policy, reference = random_logps(1, seed=seed)
        aot = loss_class(beta=0.1, label_smoothing=eps)(policy, reference, {}).loss.item()
        assert aot == pytest.approx(DPOLoss(beta=0.1, label_smoothing=eps)(policy, reference, {}).loss.item(), rel=1e-14)


@pytest.mark.parametrize("loss_class", [AOTLoss, AOTUnpairedLoss])
def test_aot_ignores_pair_order_and_is_dpo_when_the_orders_agree(loss_class) -> None:
    policy, reference = random_logps(12, seed=15)
    loss = loss_class(beta=0.1, label_smoothing=0.1)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    rows_perm = torch.cat([perm, perm + 12])
    shuffled = loss(SequenceLogProbs(policy.sums[rows_perm], policy.counts[rows_perm]),
                    SequenceLogProbs(reference.sums[rows_perm], reference.counts[rows_perm]), {})
    assert shuffled.loss.item() == pytest.approx(loss(policy, reference, {}).loss.item(), rel=1e-14)
    # orders agree: (paired) reference margins increase with policy margins; (unpaired) rejected
    # log-ratios increase with chosen ones. Then sorting pairs every term with its own pair: DPO.
    ref = reference.sums.clone()
    if loss_class is AOTLoss:
        ref[:12] = ref[12:] + 0.5 * (policy.sums[:12] - policy.sums[12:])
    else:
        ref[12:] = policy.sums[12:] - 0.5 * (policy.sums[:12] - ref[:12]) - 3.0
    reference = SequenceLogProbs(ref, reference.counts)
    dpo = DPOLoss(beta=0.1, label_smoothing=0.1)(policy, reference, {}).loss.item()
    assert loss(policy, reference, {}).loss.item() == pytest.approx(dpo, rel=1e-13)


def test_aot_sorting_changes_the_loss_when_orders_disagree() -> None:
    counts = torch.ones(4, dtype=torch.long)
    policy = SequenceLogProbs(torch.tensor([-1.0, -2.0, -3.0, -1.0], dtype=torch.float64), counts)  # margins 2, -1
    reference = SequenceLogProbs(torch.tensor([-5.0, -1.0, -1.0, -5.0], dtype=torch.float64), counts)  # margins -4, 4
    aot = AOTLoss(beta=1.0)(policy, reference, {}).loss.item()
    expected = (-log_sigmoid(-1.0 - -4.0) - log_sigmoid(2.0 - 4.0)) / 2  # sorted: (-1, 2) against (-4, 4)
    assert aot == pytest.approx(expected, rel=1e-14)
    assert aot != pytest.approx(DPOLoss(beta=1.0)(policy, reference, {}).loss.item())


def test_apo_is_the_papers_loss_plus_one() -> None:
    """TRL (and this library) add 1 to eq. 7 and eq. 8 of arXiv 2408.06266."""
    policy, reference = random_logps(6, seed=16, scale=0.2)
    beta = 0.3
    zero, down = [], []
    for pw, pl, rw, rl, _, _ in rows(policy, reference):
        r_w, r_l = beta * (pw - rw), beta * (pl - rl)
        zero.append(-sigmoid(r_w) + sigmoid(r_l))
        down.append(sigmoid(r_w) - sigmoid(r_w - r_l))
    assert APOZeroLoss(beta)(policy, reference, {}).loss.item() - 1 == pytest.approx(sum(zero) / 6, rel=1e-12, abs=1e-14)
    assert APODownLoss(beta)(policy, reference, {}).loss.item() - 1 == pytest.approx(sum(down) / 6, rel=1e-12, abs=1e-14)


def test_discopop_small_tau_switches_between_logistic_and_exponential() -> None:
    counts = torch.ones(6, dtype=torch.long)
    policy = SequenceLogProbs(torch.tensor([-1.0, -4.0, -2.0, -3.0, -1.0, -2.5], dtype=torch.float64), counts)
    reference = SequenceLogProbs(torch.zeros(6, dtype=torch.float64), counts)
    out = DiscoPOPLoss(beta=1.0, tau=1e-4)(policy, reference, {})
    # margins d = 2, -3, 0.5: exp(-d) where d > 0, -log sigmoid(d) where d < 0
    expected = [math.exp(-2.0), -log_sigmoid(-3.0), math.exp(-0.5)]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-12)


def test_cpo_alpha_zero_is_dpo_against_a_zero_reference() -> None:
    policy, _ = random_logps(9, seed=18)
    zero = SequenceLogProbs(torch.zeros_like(policy.sums), policy.counts)
    cpo = CPOLoss(beta=0.2, label_smoothing=0.1, alpha=0.0)(policy, None, {})
    dpo = DPOLoss(beta=0.2, label_smoothing=0.1)(policy, zero, {})
    assert cpo.loss.item() == pytest.approx(dpo.loss.item(), rel=1e-14)
    with_nll = CPOLoss(beta=0.2, label_smoothing=0.1, alpha=1.0)(policy, None, {}).loss.item()
    assert with_nll - cpo.loss.item() == pytest.approx(-policy.chosen.sum().item() / policy.counts[:9].sum().item(), rel=1e-12)


def test_cpo_nll_is_a_token_mean_not_a_mean_of_sequence_means() -> None:
    counts = torch.tensor([1, 9, 5, 5])
    policy = SequenceLogProbs(torch.tensor([-1.0, -9.0 * 3, -5.0, -5.0], dtype=torch.float64), counts)
    nll = CPOLoss(alpha=1.0)(policy, None, {}).metrics["nll"].item()
    assert nll == pytest.approx((1.0 + 27.0) / 10)  # not (1/1 + 27/9) / 2 = 2.0


# -- extreme inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_extreme_inputs_no_nan(case: str) -> None:
    loss = CASES[case][0]()
    sums = torch.tensor([-1e5, -1e-9, -3e4, -1e-9, -1e5, -2.0], dtype=torch.float64, requires_grad=True)
    ref = SequenceLogProbs(torch.tensor([-1e-9, -1e5, -1.0, -1e5, -1e-9, -1e5], dtype=torch.float64), torch.ones(6))
    out = evaluate(loss, SequenceLogProbs(sums, torch.tensor([1, 1, 1, 1, 1, 1])), ref)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(sums.grad).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loss_class", [EXOLoss, DiscoPOPLoss, NormalizedDPOLoss])
def test_divergences_at_extreme_log_ratios_are_finite(loss_class, divergence: str) -> None:
    for dtype in (torch.float64, torch.float32):
        sums = torch.tensor([0.0, -1e4, -1e4, 0.0], dtype=dtype, requires_grad=True)
        ref = SequenceLogProbs(torch.tensor([-1e4, 0.0, 0.0, -1e4], dtype=dtype), torch.ones(4))
        out = loss_class(beta=1.0, divergence=divergence)(SequenceLogProbs(sums, torch.tensor([1, 1, 1, 1])), ref, {})
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(sums.grad).all(), (divergence, dtype)


# -- arguments -----------------------------------------------------------------------------------
BAD_ARGUMENTS = [
    (EXOLoss, {"label_smoothing": 0.0}, "label_smoothing"),
    (EXOLoss, {"label_smoothing": 0.5}, "label_smoothing"),
    (EXOLoss, {"label_smoothing": -1e-3}, "label_smoothing"),
    (EXOLoss, {"label_smoothing": math.nan}, "label_smoothing"),
    (EXOLoss, {"beta": 0.0}, "beta"),
    (EXOLoss, {"divergence": "kl"}, "divergence"),
    (EXOLoss, {"divergence": "alpha_divergence", "divergence_alpha": 0.0}, "divergence_alpha"),
    (NCALoss, {"beta": -0.1}, "beta"),
    (SPPOHardLoss, {"beta": 0.0}, "beta"),
    (SPPOHardLoss, {"beta": math.inf}, "beta"),
    (AOTLoss, {"label_smoothing": 0.5}, "label_smoothing"),
    (AOTLoss, {"beta": -1.0}, "beta"),
    (AOTUnpairedLoss, {"label_smoothing": -0.1}, "label_smoothing"),
    (APOZeroLoss, {"beta": 0.0}, "beta"),
    (APODownLoss, {"beta": math.nan}, "beta"),
    (DiscoPOPLoss, {"tau": 0.0}, "tau"),
    (DiscoPOPLoss, {"tau": -0.05}, "tau"),
    (DiscoPOPLoss, {"beta": 0.0}, "beta"),
    (DiscoPOPLoss, {"divergence": "reverse-kl"}, "divergence"),
    (DPOPLoss, {"lam": -1.0}, "lam"),
    (DPOPLoss, {"lam": math.inf}, "lam"),
    (DPOPLoss, {"beta": 0.0}, "beta"),
    (CPOLoss, {"alpha": -0.5}, "alpha"),
    (CPOLoss, {"label_smoothing": 0.5}, "label_smoothing"),
    (CPOLoss, {"beta": 0.0}, "beta"),
    (NormalizedDPOLoss, {"beta": 0.0}, "beta"),
    (NormalizedDPOLoss, {"divergence": "tv"}, "divergence"),
    (NormalizedDPOLoss, {"divergence_alpha": -0.5}, "divergence_alpha"),
]


@pytest.mark.parametrize("loss_class,kwargs,key", BAD_ARGUMENTS, ids=lambda v: getattr(v, "__name__", None))
def test_bad_arguments_name_the_recipe_key(loss_class, kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"model\.init_args\.loss\.init_args\.{key} must"):
        loss_class(**kwargs)


def test_exo_refuses_zero_smoothing_saying_why() -> None:
    with pytest.raises(ValueError, match=r"label_smoothing must be in \(0, 0\.5\).*1e-3.*got 0\.0"):
        EXOLoss(label_smoothing=0.0)


def test_only_difference_losses_take_a_divergence() -> None:
    takes = {EXOLoss, DiscoPOPLoss, NormalizedDPOLoss}
    for cls in takes | {NCALoss, SPPOHardLoss, AOTLoss, AOTUnpairedLoss, APOZeroLoss, APODownLoss, DPOPLoss, CPOLoss}:
        params = inspect.signature(cls.__init__).parameters
        assert (("divergence" in params) and ("divergence_alpha" in params)) == (cls in takes), cls
        assert inspect.signature(cls.__init__).parameters["beta"].default == 0.1, cls
    assert EXOLoss().label_smoothing == 1e-3 and DiscoPOPLoss().tau == 0.05 and DPOPLoss().lam == 50.0
    assert CPOLoss().alpha == 1.0 and CPOLoss().label_smoothing == 0.0
