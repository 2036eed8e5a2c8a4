"""f-DPO divergences (arXiv 2309.16240) and ODPO's log-ratio offset, against float64 formulas
written here from the papers."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import log_sigmoid, quick, random_logps
from dpo_lightning.losses import DPOLoss, HingeLoss, IPOLoss, ODPOLoss, RobustDPOLoss, SequenceLogProbs
from dpo_lightning.losses.base import divergence_scores

DIVERGENCES = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


def f_prime(log_u: float, divergence: str, alpha: float) -> float:
    """f'(u) of the f-DPO paper's Table 1 (constants as TRL keeps them), one python float."""
    u = math.exp(log_u)
    if divergence == "reverse_kl":
        return math.log(u)
    if divergence == "forward_kl":
        return 1 - 1 / u
    if divergence == "js_divergence":
        return math.log(2 * u / (1 + u))
    return (1 - u ** (-alpha)) / alpha


def per_pair(policy: SequenceLogProbs, reference: SequenceLogProbs):
    b = policy.sums.shape[0] // 2
    for i in range(b):
        yield (policy.sums[i].item() - reference.sums[i].item(), policy.sums[b + i].item() - reference.sums[b + i].item(),
               policy.counts[i].item(), policy.counts[b + i].item())


def small_logps(batch: int, seed: int) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    """Log-ratios within +-3 nats, where every f'(u) is well inside float64's range."""
    policy, reference = random_logps(batch, seed)
    g = torch.Generator().manual_seed(seed + 100)
    shifted = reference.sums + 6 * torch.rand(2 * batch, generator=g, dtype=torch.float64) - 3
    return SequenceLogProbs(shifted, policy.counts), SequenceLogProbs(reference.sums, reference.counts)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("batch", [1, 4, 33])
def test_dpo_family_with_each_divergence_matches_formula(divergence: str, batch: int) -> None:
    policy, reference = small_logps(batch, seed=batch + 3)
    beta, alpha, eps = 0.3, 0.4, 0.1
    pairs = [(f_prime(hw, divergence, alpha) - f_prime(hl, divergence, alpha), nw, nl, hw, hl)
             for hw, hl, nw, nl in per_pair(policy, reference)]
    kwargs = {"divergence": divergence, "divergence_alpha": alpha}
    dpo = DPOLoss(beta=beta, **kwargs)(policy, reference, {})
    assert dpo.loss.item() == pytest.approx(sum(-log_sigmoid(beta * d) for d, *_ in pairs) / batch, rel=1e-12)
    cdpo = DPOLoss(beta=beta, label_smoothing=eps, **kwargs)(policy, reference, {})
    expected = [-(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d) for d, *_ in pairs]
    assert cdpo.loss.item() == pytest.approx(sum(expected) / batch, rel=1e-12)
    robust = RobustDPOLoss(beta=beta, label_smoothing=eps, **kwargs)(policy, reference, {})
    expected = [(-(1 - eps) * log_sigmoid(beta * d) + eps * log_sigmoid(-beta * d)) / (1 - 2 * eps) for d, *_ in pairs]
    assert robust.loss.item() == pytest.approx(sum(expected) / batch, rel=1e-12)
    hinge = HingeLoss(beta=beta, **kwargs)(policy, reference, {})
    assert hinge.loss.item() == pytest.approx(sum(max(0.0, 1 - beta * d) for d, *_ in pairs) / batch, rel=1e-12, abs=1e-15)
    ipo = IPOLoss(beta=beta, **kwargs)(policy, reference, {})
    expected = [(f_prime(hw, divergence, alpha) / nw - f_prime(hl, divergence, alpha) / nl - 1 / (2 * beta)) ** 2
                for _, nw, nl, hw, hl in pairs]
    assert ipo.loss.item() == pytest.approx(sum(expected) / batch, rel=1e-12)
    # per_pair is the unreduced loss of each pair
    torch.testing.assert_close(dpo.per_pair.mean(), dpo.loss)
    # the implicit reward stays beta * log-ratio, whatever the divergence
    torch.testing.assert_close(dpo.chosen_rewards, beta * (policy.chosen - reference.chosen))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradient_of_each_divergence_matches_its_derivative(divergence: str) -> None:
    """d/d(log u) of f'(u): reverse KL 1, forward KL 1/u, JS 1/(1+u), alpha u^(-alpha)."""
    alpha = 0.3
    log_u = torch.linspace(-4, 4, 17, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(divergence_scores(log_u, divergence, alpha).sum(), log_u)
    u = log_u.detach().exp()
    expected = {"reverse_kl": torch.ones_like(u), "forward_kl": 1 / u, "js_divergence": 1 / (1 + u),
                "alpha_divergence": u ** (-alpha)}[divergence]
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)


def test_alpha_divergence_ends_are_reverse_and_forward_kl() -> None:
    """alpha -> 0 approaches reverse KL (log u); alpha = 1 is forward KL exactly (1 - 1/u)."""
    log_u = torch.linspace(-3, 3, 13, dtype=torch.float64)
    torch.testing.assert_close(divergence_scores(log_u, "alpha_divergence", 1.0), divergence_scores(log_u, "forward_kl"))
    torch.testing.assert_close(divergence_scores(log_u, "alpha_divergence", 1e-7), log_u, rtol=0, atol=1e-5)


def test_reverse_kl_is_dpo_exactly() -> None:
    policy, reference = random_logps(16, seed=5)
    plain = DPOLoss(beta=0.2)(policy, reference, {})
    explicit = DPOLoss(beta=0.2, divergence="reverse_kl", divergence_alpha=0.9)(policy, reference, {})
    assert torch.equal(plain.loss, explicit.loss)


def test_a_very_negative_log_ratio_stays_finite() -> None:
    """exp(-log u) is clamped at exp(80): a policy that dropped a response by 500 nats gives a
    large finite loss and gradient, never inf or NaN."""
    counts = torch.tensor([10, 10])
    policy = SequenceLogProbs(torch.tensor([-600.0, -50.0], requires_grad=True), counts)
    reference = SequenceLogProbs(torch.tensor([-100.0, -50.0]), counts)
    for divergence in ("forward_kl", "alpha_divergence"):
        out = DPOLoss(beta=0.1, divergence=divergence, divergence_alpha=1.0)(policy, reference, {})
        (grad,) = torch.autograd.grad(out.loss, policy.sums)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("bad", [{"divergence": "kl"}, {"divergence": "alpha_divergence", "divergence_alpha": 0.0},
                                 {"divergence": "alpha_divergence", "divergence_alpha": -0.5}])
def test_bad_divergence_settings_name_the_recipe_key(bad: dict) -> None:
    key = "divergence_alpha" if "divergence_alpha" in bad else "divergence"
    with pytest.raises(ValueError, match=rf"model\.init_args\.loss\.init_args\.{key} must"):
        DPOLoss(**bad)


@pytest.mark.parametrize("batch", [1, 4, 33])
def test_odpo_log_ratio_offset_matches_formula(batch: int) -> None:
    policy, reference = random_logps(batch, seed=batch + 41)
    g = torch.Generator().manual_seed(batch)
    s_w = torch.rand(batch, generator=g, dtype=torch.float64) + 0.05
    s_l = torch.rand(batch, generator=g, dtype=torch.float64) + 0.05  # some pairs inverted: negative offset
    beta, alpha = 0.2, 0.7
    expected = []
    for i, (hw, hl, _, _) in enumerate(per_pair(policy, reference)):
        delta = alpha * math.log(s_w[i].item() / s_l[i].item())
        expected.append(-log_sigmoid(beta * (hw - hl) - delta))
    out = ODPOLoss(beta=beta, alpha=alpha, offset_fn="log_ratio")(policy, reference, {"score_chosen": s_w, "score_rejected": s_l})
    assert out.loss.item() == pytest.approx(sum(expected) / batch, rel=1e-12)


def test_odpo_log_ratio_guards_zero_and_negative_scores() -> None:
    """Scores are floored at min_score_diff before the log: no NaN or inf for zero or negative scores."""
    policy, reference = random_logps(4, seed=2)
    s_w = torch.tensor([0.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    s_l = torch.tensor([1.0, 0.0, -3.0, 0.5], dtype=torch.float64)
    loss = ODPOLoss(alpha=1.0, offset_fn="log_ratio", min_score_diff=1e-2)
    out = loss(policy, reference, {"score_chosen": s_w, "score_rejected": s_l})
    expected = torch.tensor([math.log(1e-2), math.log(1e-2 / 1e-2), math.log(2 / 1e-2), 0.0], dtype=torch.float64)
    torch.testing.assert_close(out.metrics["offset"], expected)
    assert torch.isfinite(out.loss)


def test_odpo_alpha_zero_is_dpo_for_every_offset_form() -> None:
    policy, reference = random_logps(8, seed=9)
    scores = {"score_chosen": torch.rand(8, dtype=torch.float64), "score_rejected": torch.rand(8, dtype=torch.float64)}
    dpo = DPOLoss(beta=0.3)(policy, reference, {})
    for offset_fn in ("log", "log_ratio", "identity"):
        assert torch.equal(ODPOLoss(beta=0.3, alpha=0.0, offset_fn=offset_fn)(policy, reference, scores).loss, dpo.loss)


def test_odpo_with_a_divergence_matches_formula() -> None:
    policy, reference = small_logps(6, seed=13)
    s_w = torch.rand(6, dtype=torch.float64) + 1.0
    s_l = torch.rand(6, dtype=torch.float64)
    out = ODPOLoss(beta=0.5, alpha=0.5, divergence="js_divergence")(policy, reference, {"score_chosen": s_w, "score_rejected": s_l})
    expected = [
        -log_sigmoid(0.5 * (f_prime(hw, "js_divergence", 0.5) - f_prime(hl, "js_divergence", 0.5))
                     - 0.5 * math.log(s_w[i].item() - s_l[i].item()))
        for i, (hw, hl, _, _) in enumerate(per_pair(policy, reference))
    ]
    assert out.loss.item() == pytest.approx(sum(expected) / 6, rel=1e-12)


def test_a_divergence_on_a_loss_without_one_is_a_clear_cli_error() -> None:
    """SimPO is not built on the chosen-minus-rejected log-ratio difference: the one-line error
    says so and lists the losses that take a divergence."""
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run(
        [sys.executable, "-m", "dpo_lightning.cli", "fit", "--config", "recipes/base.yaml", "--config", "recipes/simpo.yaml",
         "--model.init_args.loss.init_args.divergence", "forward_kl", "--print_config"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.init_args.loss: Option 'divergence' is not accepted"), out.stderr[-1500:]
    assert "f-divergences apply only to losses built on the chosen-minus-rejected log-ratio difference: " in last
    assert "DPOLoss" in last and "IPOLoss" in last and "SimPOLoss" not in last


@pytest.mark.parametrize("recipe,options", [
    ("ipo", ["--model.init_args.loss.init_args.divergence", "js_divergence"]),
    ("hinge", ["--model.init_args.loss.init_args.divergence", "alpha_divergence",
               "--model.init_args.loss.init_args.divergence_alpha", "0.3"]),
    ("odpo", ["--model.init_args.loss.init_args.divergence", "forward_kl",
              "--model.init_args.loss.init_args.offset_fn", "log_ratio"]),
])
def test_options_train_a_shipped_recipe_two_steps(recipe: str, options: list[str], tmp_path) -> None:
    """The f-divergences and ODPO's log-ratio offset through the CLI on a shipped overlay."""

    from dpo_lightning.cli import run

    cli = run(quick(recipe, tmp_path, *options))
    assert cli.trainer.global_step == 2
    assert cli.model.loss.divergence == options[1]
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
