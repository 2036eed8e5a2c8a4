"""Loss options on top of the losses: mixtures (MPO), the chosen-response NLL, LD-DPO, WPO,
against float64 formulas; TR-DPO's moving reference and a mixture in a real 2-step fit."""

from __future__ import annotations

import csv
import math
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from conftest import log_sigmoid, random_logps, tiny_recipe, tiny_spec, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.losses import DPOLoss, IPOLoss, KTOLoss, ODPOLoss, ORPOLoss, SimPOLoss
from dpo_lightning.contract import BatchLayout
from dpo_lightning.losses.base import LossNeeds, LossOutput, PreferenceLoss, SequenceLogProbs
from dpo_lightning.losses.bco import BCOPairLoss
from dpo_lightning.losses.length import LengthDesensitized, length_desensitized
from dpo_lightning.losses.mixture import MixtureLoss, component_name
from dpo_lightning.losses.rpo import ChosenNLLLoss, WithChosenNLL
from dpo_lightning.losses.weighting import WPOWeighted
from dpo_lightning.modules import PreferenceModule
from dpo_lightning.modules.reference import MovingReference, ReferenceSpec, ReferenceUpdate

SHAPES = [1, 4, 16]
SCORES = {"score_chosen": torch.tensor([2.0, 3.0, 1.5, 4.0], dtype=torch.float64),
          "score_rejected": torch.tensor([1.0, 0.5, 1.0, 2.0], dtype=torch.float64)}


class PerRowLoss(PreferenceLoss):
    """A loss that is not a mean over pairs (like AOT, which sorts its pairs): no ``per_pair``."""

    def forward(self, policy, reference, batch) -> LossOutput:
        sorted_margin, _ = torch.sort(policy.chosen - policy.rejected)
        loss = -torch.nn.functional.logsigmoid(sorted_margin).mean()
        return LossOutput(loss, policy.chosen.detach(), policy.rejected.detach())


def token_logps(batch: int, seed: int, width: int = 14, scale: float = 3.0) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    """Policy and reference with per-token values ``(2B, width)``: each row's completion is a
    run of random length at a random offset (prompt before, padding after or before)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * batch, width, dtype=torch.bool)
    for row in range(2 * batch):
        length = int(torch.randint(1, width - 2, (1,), generator=g))
        start = int(torch.randint(0, width - length + 1, (1,), generator=g))
        mask[row, start : start + length] = True

    def make() -> SequenceLogProbs:
        tokens = torch.zeros(mask.shape, dtype=torch.float64)
        tokens[mask] = -scale * torch.rand(int(mask.sum()), generator=g, dtype=torch.float64)
        return SequenceLogProbs(tokens.sum(-1), mask.sum(-1), tokens, mask)

    return make(), make()


def row_tokens(logps: SequenceLogProbs, row: int) -> list[float]:
    """The completion tokens' log-probs of one row, in order, as python floats."""
    return [v.item() for v, m in zip(logps.tokens[row], logps.token_mask[row]) if m]


def ld_sums(logps: SequenceLogProbs, alpha: float) -> list[float]:
    """LD-DPO's per-row log-probs written out: the first min(|y_w|, |y_l|) tokens fully, the rest * alpha."""
    b = logps.sums.shape[0] // 2
    out = [0.0] * (2 * b)
    for i in range(b):
        w, l = row_tokens(logps, i), row_tokens(logps, b + i)
        shared = min(len(w), len(l))
        for row, values in ((i, w), (b + i, l)):
            out[row] = sum(values[:shared]) + alpha * sum(values[shared:])
    return out


# -- MixtureLoss --------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", SHAPES)
def test_mixture_is_the_weighted_sum_of_its_components(batch: int) -> None:
    policy, reference = random_logps(batch, seed=batch + 70)
    parts = [SimPOLoss(beta=2.0, gamma=0.5), DPOLoss(beta=0.1), ChosenNLLLoss(), IPOLoss(beta=0.2)]
    weights = [0.3, 0.8, 1.0, 0.0]
    mixture = MixtureLoss(parts, weights)
    out = mixture(policy, reference, {})
    alone = [p(policy, reference if p.needs_reference else None, {}) for p in parts]
    expected = sum(w * o.loss.item() for w, o in zip(weights, alone))
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(out.per_pair, sum(w * o.per_pair for w, o in zip(weights, alone)), rtol=1e-12, atol=0)
    assert mixture.names == ("sim_po", "dpo", "chosen_nll", "ipo")
    for name, o in zip(mixture.names, alone):  # every component's value, detached, under its name
        value = out.metrics[f"loss_{name}"]
        assert value.shape == () and not value.requires_grad and value.item() == o.loss.item()
    # the rewards and log-probs are the first reference-using component's (DPO's), not SimPO's
    assert mixture.reporter == 1 and mixture.needs_reference
    assert torch.equal(out.chosen_rewards, alone[1].chosen_rewards)
    assert torch.equal(out.rejected_rewards, alone[1].rejected_rewards)
    free = MixtureLoss([SimPOLoss(), ChosenNLLLoss()])
    assert not free.needs_reference and free.reporter == 0
    assert torch.equal(free(policy, None, {}).chosen_rewards, SimPOLoss()(policy, None, {}).chosen_rewards)


def test_mixture_of_one_weight_one_loss_is_the_loss_exactly() -> None:
    policy, reference = random_logps(8, seed=3)
    for loss in (DPOLoss(beta=0.3, label_smoothing=0.1), SimPOLoss(), ORPOLoss()):
        grads = []
        for wrapped in (loss, MixtureLoss([loss], [1.0])):
            sums = policy.sums.clone().requires_grad_(True)
            out = wrapped(SequenceLogProbs(sums, policy.counts), reference if loss.needs_reference else None, {})
            (grad,) = torch.autograd.grad(out.loss, sums)
            grads.append((out.loss.detach(), grad, out.per_pair.detach()))
        (a, ga, pa), (b, gb, pb) = grads
        assert torch.equal(a, b) and torch.equal(ga, gb) and torch.equal(pa, pb), type(loss).__name__


def test_mixture_names_metrics_and_needs() -> None:
    policy, reference = random_logps(4, seed=9)
    assert [component_name(x) for x in (DPOLoss(), ChosenNLLLoss(), BCOPairLoss(), WithChosenNLL(DPOLoss()))] == [
        "dpo", "chosen_nll", "bco_pair", "with_chosen_nll"]
    repeated = MixtureLoss([DPOLoss(0.1), DPOLoss(0.5), DPOLoss(1.0)])
    assert repeated.names == ("dpo", "dpo_2", "dpo_3")
    assert set(repeated(policy, reference, {}).metrics) == {"loss_dpo", "loss_dpo_2", "loss_dpo_3"}
    # a metric two components report is prefixed by the component's name; one reported once is not
    mixed = MixtureLoss([ODPOLoss(alpha=0.5), ODPOLoss(alpha=1.0), ORPOLoss()], names=["odpo_a", "odpo_b", "orpo"])
    out = mixed(policy, reference, SCORES)
    assert set(out.metrics) == {"odpo_a/offset", "odpo_b/offset", "nll", "log_odds_ratio",
                                "loss_odpo_a", "loss_odpo_b", "loss_orpo"}
    torch.testing.assert_close(out.metrics["odpo_b/offset"], ODPOLoss(alpha=1.0)(policy, reference, SCORES).metrics["offset"])
    # needs: the union
    assert mixed.score_columns == ("score_chosen", "score_rejected") and mixed.needs_reference
    assert not mixed.needs_token_logprobs
    assert MixtureLoss([DPOLoss(), LengthDesensitized(DPOLoss(), 0.5)]).needs_token_logprobs
    assert MixtureLoss([DPOLoss(), LengthDesensitized(DPOLoss(), 0.5)]).needs_reference_tokens
    assert MixtureLoss([SimPOLoss(), ChosenNLLLoss()]).score_columns == ()
    assert MixtureLoss([KTOLoss(), KTOLoss(beta=0.2)]).batch_layout == KTOLoss.batch_layout
    # per_pair only when every component gives one
    assert MixtureLoss([DPOLoss(), PerRowLoss()])(policy, reference, {}).per_pair is None


def test_mixture_refuses_bad_settings() -> None:
    key = "model.init_args.loss.init_args"
    with pytest.raises(ValueError, match=rf"{key}.losses must hold at least one loss"):
        MixtureLoss([])
    with pytest.raises(ValueError, match=rf"{key}.losses\[1\] \(KTOLoss\) trains on batch layout 'unpaired_with_kl'.*losses\[0\] \(DPOLoss\)"):
        MixtureLoss([DPOLoss(), KTOLoss()])
    with pytest.raises(ValueError, match=rf"{key}.weights has 1 values for 2 losses"):
        MixtureLoss([DPOLoss(), ChosenNLLLoss()], [1.0])
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match=rf"{key}.weights\[1\] must be >= 0 and finite"):
            MixtureLoss([DPOLoss(), ChosenNLLLoss()], [1.0, bad])
    with pytest.raises(ValueError, match=rf"{key}.names has 1 values for 2 losses"):
        MixtureLoss([DPOLoss(), ChosenNLLLoss()], names=["a"])
    with pytest.raises(ValueError, match=rf"{key}.names must be unique; repeated: a"):
        MixtureLoss([DPOLoss(), ChosenNLLLoss()], names=["a", "a"])
    with pytest.raises(ValueError, match=rf"{key}.names\[0\] must be a non-empty string"):
        MixtureLoss([DPOLoss()], names=[""])
    with pytest.raises(TypeError, match=rf"{key}.losses\[0\] must be a PreferenceLoss"):
        MixtureLoss([torch.nn.Linear(1, 1)])


def test_mixture_with_every_weight_zero_is_refused() -> None:
    """All-zero weights give a zero loss and gradient: nothing would train and the base model would
    be exported with exit 0. One weight > 0 is enough."""
    key = "model.init_args.loss.init_args"
    for weights in ([0.0], [0.0, 0.0], [0, 0.0]):
        losses = [DPOLoss(), ChosenNLLLoss()][: len(weights)]
        with pytest.raises(ValueError, match=rf"{key}.weights are all 0 \({re.escape(str(weights))}\): the mixture's loss "
                                             r"and gradient would be 0.*give at least one loss a weight > 0"):
            MixtureLoss(losses, weights)
    assert MixtureLoss([DPOLoss(), ChosenNLLLoss()], [0.0, 1e-3]).weights == (0.0, 1e-3)


def test_mixture_with_every_weight_zero_is_refused_from_a_recipe(tmp_path, pair_files) -> None:
    recipe = tiny_recipe(tmp_path, *pair_files, loss={
        "class_path": "dpo_lightning.losses.MixtureLoss",
        "init_args": {"weights": [0.0, 0.0], "losses": [
            {"class_path": "dpo_lightning.losses.DPOLoss"}, {"class_path": "dpo_lightning.losses.ChosenNLLLoss"}]},
    })
    with pytest.raises(ValueError, match=r"model.init_args.loss.init_args.weights are all 0 \(\[0.0, 0.0\]\)"):
        run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    assert not (tmp_path / "export").exists()


# -- ChosenNLLLoss and WithChosenNLL -----------------------------------------------------------------
@pytest.mark.parametrize("batch", SHAPES)
def test_chosen_nll_is_the_token_mean_over_the_batch(batch: int) -> None:
    policy, _ = random_logps(batch, seed=batch + 80)
    chosen = [(policy.sums[i].item(), policy.counts[i].item()) for i in range(batch)]
    tokens = ChosenNLLLoss()
    assert not tokens.needs_reference and tokens.pairwise
    out = tokens(policy, None, {})
    expected = -sum(s for s, _ in chosen) / sum(n for _, n in chosen)  # TRL: -logps[chosen_mask].mean()
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.per_pair.shape == (batch,) and out.per_pair.mean().item() == pytest.approx(expected, rel=1e-12)
    sequences = ChosenNLLLoss(average="sequences")(policy, None, {})
    per_sequence = sum(-s / n for s, n in chosen) / batch  # the RPO paper's: a mean of per-response means
    assert sequences.loss.item() == pytest.approx(per_sequence, rel=1e-12)
    if len({n for _, n in chosen}) > 1:
        assert out.loss.item() != pytest.approx(per_sequence, rel=1e-6)  # not the same thing
    with pytest.raises(ValueError, match="average must be 'tokens' or 'sequences'"):
        ChosenNLLLoss(average="rows")


def test_with_chosen_nll_is_a_mixture_that_logs_as_before() -> None:
    policy, reference = random_logps(4, seed=81)
    for inner in (DPOLoss(beta=0.1), ODPOLoss(alpha=0.5), ORPOLoss()):
        wrapped = WithChosenNLL(inner, weight=0.5)
        assert isinstance(wrapped, MixtureLoss) and wrapped.inner is inner and wrapped.weight == 0.5
        out = wrapped(policy, reference, SCORES)
        plain = inner(policy, reference, SCORES)
        nll = -policy.chosen_means
        assert torch.equal(out.loss, plain.loss + 0.5 * nll.mean())  # the sum RPO always computed
        assert set(out.metrics) == set(plain.metrics) | {"nll"}  # no loss_* metrics added
        assert torch.equal(out.metrics["nll"], nll)
        assert torch.equal(out.chosen_rewards, plain.chosen_rewards)
        torch.testing.assert_close(out.per_pair, plain.per_pair + 0.5 * nll, rtol=1e-12, atol=0)  # so WPO can wrap RPO
    with pytest.raises(ValueError, match="init_args.loss must be a pairwise loss"):
        WithChosenNLL(KTOLoss())
    with pytest.raises(ValueError, match="init_args.weight must be >= 0"):
        WithChosenNLL(DPOLoss(), weight=-1.0)


# -- LD-DPO -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75])
def test_ld_dpo_matches_the_formula_from_per_token_values(batch: int, alpha: float) -> None:
    policy, reference = token_logps(batch, seed=batch * 7 + int(alpha * 10))
    beta = 0.2
    p, r = ld_sums(policy, alpha), ld_sums(reference, alpha)
    expected = [-log_sigmoid(beta * ((p[i] - r[i]) - (p[batch + i] - r[batch + i]))) for i in range(batch)]
    loss = LengthDesensitized(DPOLoss(beta=beta), ld_alpha=alpha)
    assert loss.needs_token_logprobs and loss.needs_reference and loss.needs_reference_tokens
    out = loss(policy, reference, {})
    assert out.loss.item() == pytest.approx(sum(expected) / batch, rel=1e-12)
    chosen_rewards = [beta * (p[i] - r[i]) for i in range(batch)]
    assert out.chosen_rewards.tolist() == pytest.approx(chosen_rewards, rel=1e-12)
    # a reference-free inner loss: only the policy's log-probs are reweighted; means divide by the full length
    simpo = LengthDesensitized(SimPOLoss(beta=2.0, gamma=0.5), ld_alpha=alpha)
    assert not simpo.needs_reference and not simpo.needs_reference_tokens
    n = policy.counts.tolist()
    expected = [-log_sigmoid(2.0 * p[i] / n[i] - 2.0 * p[batch + i] / n[batch + i] - 0.5) for i in range(batch)]
    assert simpo(policy, None, {}).loss.item() == pytest.approx(sum(expected) / batch, rel=1e-12)


def test_ld_alpha_one_is_the_inner_loss_and_zero_truncates_to_the_shared_length() -> None:
    policy, reference = token_logps(8, seed=5)
    inner = DPOLoss(beta=0.3)
    plain = inner(policy, reference, {})
    one = LengthDesensitized(inner, ld_alpha=1.0)(policy, reference, {})
    assert torch.equal(one.loss, plain.loss) and torch.equal(one.per_pair, plain.per_pair)
    torch.testing.assert_close(length_desensitized(policy, 1.0).sums, policy.sums, rtol=1e-14, atol=1e-14)

    def truncated(logps: SequenceLogProbs) -> SequenceLogProbs:
        """The tokens past each pair's shorter length dropped, by hand."""
        b = logps.sums.shape[0] // 2
        tokens = logps.tokens.clone()
        for i in range(b):
            shared = min(int(logps.counts[i]), int(logps.counts[b + i]))
            for row in (i, b + i):
                columns = logps.token_mask[row].nonzero().flatten()
                tokens[row, columns[shared:]] = 0.0
        return SequenceLogProbs(tokens.sum(-1), logps.counts, tokens, logps.token_mask)

    zero = LengthDesensitized(inner, ld_alpha=0.0)(policy, reference, {})
    expected = inner(truncated(policy), truncated(reference), {})
    torch.testing.assert_close(zero.loss, expected.loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(zero.per_pair, expected.per_pair, rtol=1e-13, atol=0)
    assert not torch.allclose(zero.loss, plain.loss)


def test_ld_dpo_gradient_reaches_the_tokens_weighted_by_alpha() -> None:
    policy, reference = token_logps(1, seed=11)
    tokens = policy.tokens.clone().requires_grad_(True)
    out = LengthDesensitized(DPOLoss(beta=0.5), ld_alpha=0.25)(
        SequenceLogProbs(policy.sums, policy.counts, tokens, policy.token_mask), reference, {})
    (grad,) = torch.autograd.grad(out.loss, tokens)
    assert (grad[~policy.token_mask] == 0).all()
    shared = int(policy.counts.min())
    for row in (0, 1):
        g = grad[row][policy.token_mask[row]]
        assert torch.allclose(g[:shared], g[0].expand(shared))  # every shared token alike
        torch.testing.assert_close(g[shared:], 0.25 * g[0].expand(len(g) - shared))  # the tail weighs alpha


def test_ld_dpo_refuses_what_it_cannot_compute() -> None:
    key = "model.init_args.loss.init_args"
    with pytest.raises(ValueError, match=rf"{key}.loss must be a pairwise loss"):
        LengthDesensitized(KTOLoss())
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=rf"{key}.ld_alpha must be in \[0, 1\]"):
            LengthDesensitized(DPOLoss(), bad)
    policy, reference = token_logps(2, seed=1)
    sums_only = SequenceLogProbs(reference.sums, reference.counts)
    for alpha in (0.5, 1.0):  # the same error whatever alpha
        with pytest.raises(ValueError, match="per-token reference log-probs.*reference.precompute"):
            LengthDesensitized(DPOLoss(), alpha)(policy, sums_only, {})
        with pytest.raises(ValueError, match="per-token policy log-probs"):
            LengthDesensitized(DPOLoss(), alpha)(SequenceLogProbs(policy.sums, policy.counts), reference, {})
    # a reference-free inner loss never reads the reference, so one without tokens is fine (a mixture passes it)
    mixture = MixtureLoss([DPOLoss(), LengthDesensitized(SimPOLoss(), 0.5)])
    assert torch.isfinite(mixture(policy, SequenceLogProbs(reference.sums, reference.counts), {}).loss)


def test_ld_dpo_with_a_precomputed_reference_equals_the_live_one(tmp_path, pair_files) -> None:
    """The cache holds each response's sum beyond its pair's shared length as well, so LD-DPO
    trains on a precomputed reference as on the live one; a second run reads the cache."""
    loss = {"class_path": "dpo_lightning.losses.length.LengthDesensitized",
            "init_args": {"ld_alpha": 0.5, "loss": {"class_path": "dpo_lightning.losses.DPOLoss"}}}

    def fit(name: str, precompute: bool):
        recipe = tiny_recipe(tmp_path / name, *pair_files, loss=loss, reference={"precompute": precompute, "cache_dir": str(tmp_path / "cache")},
                             export_dir=str(tmp_path / name / "export"))
        return run(["fit", "--config", write_recipe(tmp_path / f"{name}.yaml", recipe)])

    from dpo_lightning.losses.length import beyond_shared_sums
    from dpo_lightning.modules import model_logprobs

    live, first = fit("live", False), fit("first", True)
    assert first.model.reference.source is None and first.model.reference.batches_computed > 0
    dm = first.datamodule
    assert {"reference_chosen_beyond_shared", "reference_rejected_beyond_shared"} <= set(dm.train_dataset.column_names)
    # the cached values are the reference's (the initial policy's) sums beyond the shared length
    batch = dm.collator()([dm.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        tail = beyond_shared_sums(model_logprobs(live.model.reference.network, batch, with_tokens=True))
    torch.testing.assert_close(batch["reference_chosen_beyond_shared"], tail[:4].float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(batch["reference_rejected_beyond_shared"], tail[4:].float(), rtol=1e-6, atol=1e-5)
    # training on them follows the live run (float32 sums rounded in another order: Adam may
    # amplify that on a parameter whose gradient is ~0, hence 1e-3)
    for a, b in zip(live.model.policy.parameters(), first.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    assert fit("second", True).model.reference.batches_computed == 0


# -- WPO --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", SHAPES)
def test_wpo_weights_pairs_by_length_normalised_policy_probability(batch: int) -> None:
    policy, reference = random_logps(batch, seed=batch + 90, scale=0.3)
    beta = 0.1
    expected, weights = [], []
    for i in range(batch):
        pw, pl = policy.sums[i].item(), policy.sums[batch + i].item()
        rw, rl = reference.sums[i].item(), reference.sums[batch + i].item()
        nw, nl = policy.counts[i].item(), policy.counts[batch + i].item()
        w = math.exp(pw / nw) * math.exp(pl / nl)
        weights.append(w)
        expected.append(w * -log_sigmoid(beta * ((pw - rw) - (pl - rl))))
    sums = policy.sums.clone().requires_grad_(True)
    out = WPOWeighted(DPOLoss(beta=beta), aligned=False)(SequenceLogProbs(sums, policy.counts), reference, {})
    assert out.loss.item() == pytest.approx(sum(expected) / batch, rel=1e-12)
    assert out.metrics["wpo_weight"].tolist() == pytest.approx(weights, rel=1e-12)
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-12)
    # the weights are constants: the gradient is the weighted DPO gradient
    (grad,) = torch.autograd.grad(out.loss, sums)
    plain_sums = policy.sums.clone().requires_grad_(True)
    plain = DPOLoss(beta=beta)(SequenceLogProbs(plain_sums, policy.counts), reference, {})
    (plain_grad,) = torch.autograd.grad((torch.tensor(weights, dtype=torch.float64) * plain.per_pair).mean(), plain_sums)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-12, atol=1e-15)


def test_wpo_refuses_losses_without_per_pair_values() -> None:
    policy, reference = random_logps(4, seed=2)
    with pytest.raises(ValueError, match=r"PerRowLoss gives no per-pair losses \(LossOutput.per_pair is None"):
        WPOWeighted(PerRowLoss())(policy, reference, {})
    aot = pytest.importorskip("dpo_lightning.losses.aot")
    with pytest.raises(ValueError, match=r"AOTLoss gives no per-pair losses"):
        WPOWeighted(aot.AOTLoss())(policy, reference, {})
    with pytest.raises(ValueError, match="init_args.loss must be a pairwise loss"):
        WPOWeighted(KTOLoss())
    wrapped = WPOWeighted(WithChosenNLL(ODPOLoss()), aligned=False)  # RPO gives per-pair losses; needs pass through
    assert wrapped.needs_reference and wrapped.score_columns == ("score_chosen", "score_rejected")
    assert torch.isfinite(wrapped(policy, reference, SCORES).loss)
    assert WPOWeighted(LengthDesensitized(DPOLoss(), 0.5)).needs_token_logprobs


# -- training: TR-DPO's moving reference and a mixture's metrics --------------------------------------
def fit(module: PreferenceModule, pair_files, tmp_path, callbacks=(), logger=False) -> L.Trainer:
    data = PreferenceDataModule(train_data=pair_files[0], val_data=pair_files[1], max_length=64, batch_size=4)
    data.connect(module.tokenizer, module.data_requirements)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks), default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    return trainer


def test_tr_dpo_reference_moves_at_the_update_step(tmp_path, pair_files) -> None:
    """every_n_steps=2: after step 1 the reference is the initial policy; after step 2 it is
    alpha * policy + (1 - alpha) * initial."""
    L.seed_everything(0)
    module = PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(update=ReferenceUpdate(alpha=0.5, every_n_steps=2)))
    assert isinstance(module.reference, MovingReference)
    initial = {k: v.clone() for k, v in module.reference.network.state_dict().items()}
    seen: list[tuple[dict, dict]] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            seen.append(({k: v.clone() for k, v in pl_module.reference.network.state_dict().items()},
                         {k: v.clone() for k, v in pl_module.policy.state_dict().items()}))

    fit(module, pair_files, tmp_path, [Record()])
    assert len(seen) == 2 and int(module.reference.steps) == 2
    (ref1, policy1), (ref2, policy2) = seen
    assert all(torch.equal(ref1[k], initial[k]) for k in initial)  # step 1: no update
    assert not all(torch.equal(policy1[k], initial[k]) for k in initial)  # though the policy moved
    for k in initial:  # step 2: the soft update towards the step-2 policy
        torch.testing.assert_close(ref2[k], 0.5 * policy2[k] + 0.5 * initial[k], rtol=0, atol=1e-6)
    assert not all(torch.equal(ref2[k], initial[k]) for k in initial)


def test_mixture_trained_two_steps_logs_each_component(tmp_path, pair_files) -> None:
    L.seed_everything(0)
    loss = MixtureLoss([DPOLoss(beta=0.1), BCOPairLoss(beta=0.1), ChosenNLLLoss()], [0.8, 0.2, 1.0])
    module = PreferenceModule(model=tiny_spec(), loss=loss)
    logger = CSVLogger(str(tmp_path / "logs"), name="mpo")
    trainer = fit(module, pair_files, tmp_path, logger=logger)
    assert trainer.global_step == 2
    got = trainer.callback_metrics
    names = ("train/loss_dpo", "train/loss_bco_pair", "train/loss_chosen_nll")
    assert all(name in got for name in names), sorted(got)
    combined = 0.8 * got[names[0]] + 0.2 * got[names[1]] + 1.0 * got[names[2]]
    torch.testing.assert_close(got["train/loss"], combined, rtol=1e-5, atol=1e-6)  # the last step's values
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r.get("train/loss_dpo")]
    assert len(steps) == 2 and all(r["train/loss_chosen_nll"] and r["train/loss_bco_pair"] for r in steps)


def test_gradients_of_chosen_nll_and_wpo_match_their_formulas() -> None:
    """d/d sum_w of TRL's token-mean NLL is -1 / sum(len(y_w)) for every chosen row and 0 for the
    rejected; WPO's gradient is w_i / B times the inner pair loss's gradient (w carries none)."""
    policy, reference = random_logps(5, seed=77, scale=0.3)
    sums = policy.sums.clone().requires_grad_(True)
    live = SequenceLogProbs(sums, policy.counts)
    (grad,) = torch.autograd.grad(ChosenNLLLoss()(live, None, {}).loss, sums)
    expected = torch.zeros_like(sums)
    expected[:5] = -1.0 / policy.counts[:5].sum().item()
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)

    beta = 0.3
    (grad,) = torch.autograd.grad(WPOWeighted(DPOLoss(beta=beta), aligned=False)(live, reference, {}).loss, sums)
    expected = torch.zeros_like(sums)
    for i in range(5):
        hw = sums[i].item() - reference.sums[i].item()
        hl = sums[5 + i].item() - reference.sums[5 + i].item()
        w = math.exp(sums[i].item() / policy.counts[i].item() + sums[5 + i].item() / policy.counts[5 + i].item())
        slope = -beta * (1 - 1 / (1 + math.exp(-beta * (hw - hl))))  # d/dd of -log sigmoid(beta d)
        expected[i], expected[5 + i] = w * slope / 5, -w * slope / 5
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


# -- what a loss needs, as one value --------------------------------------------------------------
def test_a_plain_loss_needs_what_its_class_attributes_declare() -> None:
    class Tokens(DPOLoss):
        needs_token_logprobs = True
        score_columns = ("margin",)

    assert DPOLoss().needs == LossNeeds()
    assert SimPOLoss().needs == LossNeeds(reference=False)
    assert Tokens().needs == LossNeeds(columns=("margin",), token_logprobs=True)
    assert KTOLoss().needs.layout is BatchLayout.UNPAIRED_WITH_KL


def test_wrappers_combine_their_parts_needs() -> None:
    mixed = MixtureLoss([SimPOLoss(), ODPOLoss(), LengthDesensitized(DPOLoss(), 0.5)])
    assert mixed.needs == LossNeeds(reference=True, columns=("score_chosen", "score_rejected"), token_logprobs=True,
                                    reference_tokens=True)
    assert (mixed.needs_reference, mixed.score_columns, mixed.needs_reference_tokens) == (
        True, ("score_chosen", "score_rejected"), True)
    assert LengthDesensitized(SimPOLoss()).needs == LossNeeds(reference=False, token_logprobs=True)
    assert WPOWeighted(ODPOLoss(), aligned=False).needs == ODPOLoss().needs
    assert WPOWeighted(ODPOLoss()).needs == LossNeeds(columns=("score_chosen", "score_rejected"), square_mass=True)
    assert not MixtureLoss([WPOWeighted(DPOLoss()), SimPOLoss()]).needs.square_mass  # only the outermost loss asks


def test_needs_of_losses_with_different_layouts_cannot_be_combined() -> None:
    with pytest.raises(ValueError, match=r"share one batch layout, got \['pairs', 'unpaired_with_kl'\]"):
        LossNeeds.union([DPOLoss().needs, KTOLoss().needs])
