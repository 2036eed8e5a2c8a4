"""TPO (issue 26, item 8): the loss against float64 formulas written from the paper and TRL's
TPOTrainer lines (values and gradients), the ``TRIPLES`` layout (encoder, collator, data module,
the error that names it) and a fit through the Python API; the recipe's 2-step CLI fit is
tests/test_recipes.py's."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, quickstart_rows, tiny_spec, write_jsonl
from dpo_lightning.contract import BatchLayout, DataRequirements
from dpo_lightning.data import PreferenceDataModule, TripleCollator, TripleDataModule
from dpo_lightning.losses import SequenceLogProbs, TPOLLoss, TPOLoss
from dpo_lightning.modules import NoReference, PreferenceModule
from test_losses_dpo import log_sigmoid


def triple_logps(b: int, seed: int, scale: float = 0.5) -> SequenceLogProbs:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 20, (3 * b,), generator=g)
    return SequenceLogProbs(-scale * torch.rand(3 * b, generator=g, dtype=torch.float64) * counts, counts)


def smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def tpo_formula(logps: SequenceLogProbs, beta: float, eps: float, alpha: float, gamma: float | None = None) -> float:
    """TPO (arXiv 2405.16681): mean over triples of the (smoothed) Bradley-Terry term on the
    chosen-minus-rejected log-likelihood (per-token means and margin gamma for TPO-L), plus alpha
    times the gold completions' token-mean NLL. Python floats."""
    s, c = logps.sums.tolist(), logps.counts.tolist()
    b = len(s) // 3
    pref = 0.0
    for i in range(b):
        if gamma is None:
            pref += smoothed(beta * (s[i] - s[b + i]), eps)
        else:
            pref += smoothed(beta * (s[i] / c[i] - s[b + i] / c[b + i]) - gamma, eps)
    nll = -sum(s[2 * b :]) / sum(c[2 * b :])
    return pref / b + alpha * nll


CASES = {
    "tpo": (lambda: TPOLoss(beta=0.3, label_smoothing=0.1, alpha=0.7), dict(beta=0.3, eps=0.1, alpha=0.7)),
    "tpo_default": (lambda: TPOLoss(), dict(beta=0.01, eps=0.0, alpha=1.0)),
    "tpo_l": (lambda: TPOLLoss(beta=2.0, gamma=0.4, label_smoothing=0.05, alpha=0.5), dict(beta=2.0, eps=0.05, alpha=0.5, gamma=0.4)),
}


@pytest.mark.parametrize("b", [1, 4, 11])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tpo_matches_float64_formula(case: str, b: int) -> None:
    make, kwargs = CASES[case]
    logps = triple_logps(b, seed=b + 7)
    out = make()(logps, None, {})
    assert out.loss.item() == pytest.approx(tpo_formula(logps, **kwargs), rel=1e-12)
    assert out.per_pair.shape == (b,) and out.per_pair.mean().item() == pytest.approx(out.loss.item(), rel=1e-13)
    scored = logps.means if case == "tpo_l" else logps.sums
    torch.testing.assert_close(out.chosen_rewards, kwargs["beta"] * scored[:b])
    torch.testing.assert_close(out.rejected_rewards, kwargs["beta"] * scored[b : 2 * b])
    assert torch.equal(out.chosen_logps, logps.sums[:b]) and torch.equal(out.rejected_logps, logps.sums[b : 2 * b])


@pytest.mark.parametrize("case", sorted(CASES))
def test_tpo_gradient_matches_finite_difference(case: str) -> None:
    make, kwargs = CASES[case]
    logps = triple_logps(3, seed=30)
    sums = logps.sums.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(make()(SequenceLogProbs(sums, logps.counts), None, {}).loss, sums)
    h = 1e-6
    for k in range(9):
        up, down = logps.sums.clone(), logps.sums.clone()
        up[k] += h
        down[k] -= h
        numeric = (tpo_formula(SequenceLogProbs(up, logps.counts), **kwargs)
                   - tpo_formula(SequenceLogProbs(down, logps.counts), **kwargs)) / (2 * h)
        assert grad[k].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("loss_type", ["sigmoid", "tpo-l"])
def test_tpo_is_trls_tpo_trainer(loss_type: str) -> None:
    """TRL's ``TPOTrainer._compute_loss`` (trl/experimental/tpo/tpo_trainer.py), on per-token values::

        if self.loss_type in ("ipo", "tpo-l"):
            completion_lengths = shift_completion_mask.sum(dim=1).clamp(min=1)
            logps = per_token_logps.sum(dim=1) / completion_lengths
        else:
            logps = per_token_logps.sum(dim=1)
        logps_chunks = logps.chunk(n_branches, dim=0)
        chosen_logps, rejected_logps = logps_chunks[0], logps_chunks[1]
        delta_score = chosen_logps - rejected_logps
        if self.loss_type == "sigmoid":
            per_sequence_loss = (
                -F.logsigmoid(self.beta * delta_score) * (1 - self.label_smoothing)
                - F.logsigmoid(-self.beta * delta_score) * self.label_smoothing
            )
        elif self.loss_type == "tpo-l":
            gamma_logratios = self.tpo_l_gamma / self.beta
            shifted_delta = delta_score - gamma_logratios
            per_sequence_loss = (... the same on shifted_delta ...)
        loss = per_sequence_loss.mean()
        ...
            nll_loss = F.cross_entropy(ref_logits[ref_mask], ref_labels[ref_mask])
            loss = loss + self.tpo_alpha * nll_loss

    (``F.cross_entropy`` over the gold tokens is minus their mean log-prob.)
    """
    beta, eps, alpha, gamma = 0.5, 0.1, 0.8, 0.3
    g = torch.Generator().manual_seed(5)
    b, t = 4, 7
    mask = torch.rand(3 * b, t, generator=g) < 0.7
    mask[:, 0] = True
    per_token_logps = -torch.rand(3 * b, t, generator=g, dtype=torch.float64) * mask
    sums, counts = per_token_logps.sum(1), mask.sum(1)
    logps = sums / counts.clamp(min=1) if loss_type == "tpo-l" else sums
    chosen_logps, rejected_logps, _ = logps.chunk(3, dim=0)
    delta_score = chosen_logps - rejected_logps
    if loss_type == "tpo-l":
        delta_score = delta_score - gamma / beta
    per_sequence_loss = (-F.logsigmoid(beta * delta_score) * (1 - eps) - F.logsigmoid(-beta * delta_score) * eps)
    nll_loss = -per_token_logps[2 * b :][mask[2 * b :]].mean()
    trl = per_sequence_loss.mean() + alpha * nll_loss
    loss = TPOLLoss(beta, gamma, eps, alpha) if loss_type == "tpo-l" else TPOLoss(beta, eps, alpha)
    assert loss(SequenceLogProbs(sums, counts), None, {}).loss.item() == pytest.approx(trl.item(), rel=1e-12)


def test_tpo_declares_triples_and_refuses_other_layouts() -> None:
    loss = TPOLoss()
    assert loss.data_requirements == DataRequirements(BatchLayout.TRIPLES, ())
    assert not loss.needs_reference and not loss.pairwise
    with pytest.raises(ValueError, match="'triples' layout.*TripleDataModule"):
        loss(SequenceLogProbs(torch.zeros(4, dtype=torch.float64), torch.ones(4)), None, {})
    for bad, key in (({"beta": 0.0}, "beta"), ({"alpha": -1.0}, "alpha"), ({"label_smoothing": 0.5}, "label_smoothing")):
        with pytest.raises(ValueError, match=rf"model\.init_args\.loss\.init_args\.{key} must"):
            TPOLoss(**bad)
    with pytest.raises(ValueError, match=r"model\.init_args\.loss\.init_args\.gamma must"):
        TPOLLoss(gamma=-0.1)


# -- the TRIPLES layout ---------------------------------------------------------------------
def test_triple_collator_lays_out_chosen_rejected_gold() -> None:
    rows = [
        {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2], "gold_ids": [8, 9, 2], "row_id": 0},
        {"prompt_ids": [1, 4, 4], "chosen_ids": [10, 2], "rejected_ids": [11, 12, 2], "gold_ids": [13, 2], "row_id": 3},
    ]
    batch = TripleCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, 2, 0, 0], [1, 4, 4, 10, 2, 0],
        [1, 5, 7, 2, 0, 0], [1, 4, 4, 11, 12, 2],
        [1, 5, 8, 9, 2, 0], [1, 4, 4, 13, 2, 0],
    ]
    assert batch["completion_mask"][4].tolist() == [0, 0, 1, 1, 1, 0]
    assert batch["row_id"].tolist() == [0, 3]


def triples(n: int, split: str = "train") -> list[dict]:
    return [{**{k: r[k] for k in ("prompt", "chosen", "rejected")}, "gold": " It is superb and brilliant."}
            for r in quickstart_rows(n, split)]


def test_triple_data_module_encodes_rows_and_counts_drops(tmp_path, tokenizer) -> None:
    rows = triples(6) + [{"prompt": "p", "chosen": " a", "rejected": " b"}, {"prompt": "p", "chosen": " a", "rejected": " b", "gold": " "}]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    dm = TripleDataModule(train_data=train, val_data=train, max_length=64, batch_size=3)
    dm.connect(tokenizer, DataRequirements(BatchLayout.TRIPLES))
    dm.setup("fit")
    assert len(dm.train_dataset) == 6
    assert dict(dm.reports["train"].dropped) == {"missing_field": 1, "empty_completion": 1}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 9
    gold = tokenizer(" It is superb and brilliant.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    row = batch["input_ids"][6][batch["completion_mask"][6].bool()].tolist()
    assert row == gold


def test_pairs_without_gold_fail_at_setup_naming_the_column(tmp_path, pair_files, tokenizer) -> None:
    dm = TripleDataModule(train_data=pair_files[0], val_data=pair_files[1], max_length=64, batch_size=2)
    dm.connect(tokenizer, DataRequirements(BatchLayout.TRIPLES))
    with pytest.raises(ValueError, match=r"\['gold'\] missing.*\{reference: gold\}"):
        dm.setup("fit")
    trl_style = write_jsonl(tmp_path / "trl.jsonl", [{**{k: v for k, v in r.items() if k != "gold"}, "reference": r["gold"]} for r in triples(4)])
    renamed = TripleDataModule(train_data=trl_style, val_data=trl_style, max_length=64, batch_size=2, columns={"reference": "gold"})
    renamed.connect(tokenizer, DataRequirements(BatchLayout.TRIPLES))
    renamed.setup("fit")
    assert len(renamed.train_dataset) == 4


def test_a_pair_data_module_with_tpo_names_the_triple_one(tmp_path, pair_files) -> None:
    module = PreferenceModule(model=tiny_spec(), loss=TPOLoss())
    assert isinstance(module.reference, NoReference)
    dm = PreferenceDataModule(train_data=pair_files[0], val_data=pair_files[1], max_length=64, batch_size=2)
    with pytest.raises(ValueError, match="TripleDataModule"):
        dm.connect(module.tokenizer, module.data_requirements)


def test_tpo_fits_and_logs_pair_metrics(tmp_path) -> None:
    L.seed_everything(0)
    train = write_jsonl(tmp_path / "train.jsonl", triples(16))
    val = write_jsonl(tmp_path / "val.jsonl", triples(8, "val"))
    module = PreferenceModule(model=tiny_spec(), loss=TPOLoss(beta=0.1), optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
    dm = TripleDataModule(train_data=train, val_data=val, max_length=64, batch_size=4)
    dm.connect(module.tokenizer, module.data_requirements)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert trainer.global_step == 2
    for key in ("train/rewards/accuracy", "train/rewards/margins", "train/nll", "train/loss"):
        assert math.isfinite(trainer.callback_metrics[key].item()), key


def test_make_triples_data_rewrites_the_shipped_files(tmp_path) -> None:
    shipped = {p.name: p.read_bytes() for p in (ROOT / "data" / "triples").glob("*.jsonl")}
    assert set(shipped) == {"train.jsonl", "val.jsonl"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_triples_data.py")], check=True, cwd=tmp_path)
    assert {p.name: p.read_bytes() for p in (ROOT / "data" / "triples").glob("*.jsonl")} == shipped
    first = json.loads(shipped["train.jsonl"].splitlines()[0])
    assert set(first) == {"prompt", "chosen", "rejected", "gold"}
