"""BCO: both losses against float64 formulas written from the paper (and TRL's ``bco_pair``), the
running reward shift (updates, eval mode, state_dict, DDP), the ``UNPAIRED`` layout and a fit."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import log_sigmoid, quickstart_rows, random_logps, tiny_spec, write_jsonl
from dpo_lightning.contract import BatchLayout, DataRequirements
from dpo_lightning.data import PreferenceDataModule, UnpairedCollator, UnpairedDataModule
from dpo_lightning.losses import KTOLoss, SequenceLogProbs
from dpo_lightning.losses.bco import BCOLoss, BCOPairLoss
from dpo_lightning.models import load_tokenizer
from dpo_lightning.modules import PreferenceModule, ReferenceSpec


def unpaired_logps(n: int, seed: int) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    """``(n,)`` policy and reference sums, one per unpaired row."""
    policy, reference = random_logps(n, seed)
    return (SequenceLogProbs(policy.sums[:n], policy.counts[:n]), SequenceLogProbs(reference.sums[:n], reference.counts[:n]))


def random_labels(n: int, seed: int) -> list[bool]:
    g = torch.Generator().manual_seed(1000 + seed)
    return [bool(x) for x in torch.rand(n, generator=g) < 0.5]


def bco_reference(h: list[float], labels: list[bool], beta: float, wd: float, wu: float, delta: float) -> float:
    """The paper's BCO loss on unpaired rows, python floats: mean over rows of
    ``-log sigmoid(beta h - delta)`` (desirable) or ``-log sigmoid(-(beta h - delta))`` (undesirable)."""
    losses = [wd * -log_sigmoid(beta * x - delta) if y else wu * -log_sigmoid(-(beta * x - delta)) for x, y in zip(h, labels)]
    return sum(losses) / len(losses)


def bco_pair_reference(h_w: list[float], h_l: list[float], beta: float, delta: float) -> list[float]:
    """Per-pair ``-log sigmoid(beta h_w - delta) - log sigmoid(-(beta h_l - delta))``, python floats."""
    return [-log_sigmoid(beta * w - delta) - log_sigmoid(-(beta * l - delta)) for w, l in zip(h_w, h_l)]


def log_ratios(policy: SequenceLogProbs, reference: SequenceLogProbs) -> list[float]:
    return [p - r for p, r in zip(policy.sums.tolist(), reference.sums.tolist())]


# -- values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4, 33])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("reward_shift", [False, True])
def test_bco_pair_matches_float64_formula(batch: int, beta: float, reward_shift: bool) -> None:
    policy, reference = random_logps(batch, seed=batch)
    h = log_ratios(policy, reference)
    h_w, h_l = h[:batch], h[batch:]
    # a fresh loss in training mode: delta is this batch's mean reward over both sides
    delta = sum(beta * x for x in h) / (2 * batch) if reward_shift else 0.0
    out = BCOPairLoss(beta, reward_shift=reward_shift)(policy, reference, {})
    expected = bco_pair_reference(h_w, h_l, beta, delta)
    assert out.per_pair.dtype == torch.float64 and out.per_pair.shape == (batch,)
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / batch, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * x for x in h_w], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([beta * x for x in h_l], rel=1e-12)
    assert not out.chosen_rewards.requires_grad
    if reward_shift:
        assert out.metrics["reward_shift"].item() == pytest.approx(delta, rel=1e-12)
    else:
        assert "reward_shift" not in out.metrics


@pytest.mark.parametrize("batch", [1, 4, 33])
@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33), (2.0, 0.7, 1.0)])
@pytest.mark.parametrize("labels", ["random", "all_desirable", "all_undesirable"])
def test_bco_matches_float64_formula(batch: int, beta: float, wd: float, wu: float, labels: str) -> None:
    policy, reference = unpaired_logps(batch, seed=batch)
    label = {"random": random_labels(batch, batch), "all_desirable": [True] * batch, "all_undesirable": [False] * batch}[labels]
    h = log_ratios(policy, reference)
    delta = sum(beta * x for x in h) / batch  # fresh loss, training mode: the first step's batch mean
    out = BCOLoss(beta, wd, wu)(policy, reference, {"label": torch.tensor(label)})
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(bco_reference(h, label, beta, wd, wu, delta), rel=1e-12)
    assert out.metrics["reward_shift"].item() == pytest.approx(delta, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * x for x, y in zip(h, label) if y], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([beta * x for x, y in zip(h, label) if not y], rel=1e-12)
    assert out.chosen_logps.tolist() == [x for x, y in zip(policy.sums.tolist(), label) if y]
    assert out.rejected_logps.tolist() == [x for x, y in zip(policy.sums.tolist(), label) if not y]
    assert out.per_pair is None
    # in eval mode a fresh loss has delta = 0
    loss = BCOLoss(beta, wd, wu).eval()
    out = loss(policy, reference, {"label": torch.tensor(label)})
    assert out.loss.item() == pytest.approx(bco_reference(h, label, beta, wd, wu, 0.0), rel=1e-12)


def test_bco_pair_without_shift_is_trls_bco_pair() -> None:
    """TRL 1.16 ``DPOTrainer`` with ``loss_type="bco_pair"`` (dpo_trainer.py), written out as TRL does it."""
    policy, reference = random_logps(16, seed=7)
    beta = 0.3
    chosen_logps, rejected_logps = policy.sums.chunk(2, dim=0)
    ref_chosen_logps, ref_rejected_logps = reference.sums.chunk(2, dim=0)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    per_sequence_loss = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    trl_loss = per_sequence_loss.mean()
    loss = BCOPairLoss(beta)
    for _ in range(3):  # no state: every call (train or eval) is the same
        out = loss(policy, reference, {})
        assert torch.allclose(out.loss, trl_loss, rtol=1e-14, atol=0) and torch.allclose(out.per_pair, per_sequence_loss)
    assert dict(loss.state_dict()) == {}


def test_requirements_and_bad_arguments() -> None:
    assert BCOLoss().data_requirements == DataRequirements(BatchLayout.UNPAIRED, ())
    assert BCOPairLoss().data_requirements == DataRequirements(BatchLayout.PAIRS, ())
    assert not BCOLoss().pairwise and BCOPairLoss().pairwise and BCOLoss().needs_reference
    for bad in ({"beta": 0.0}, {"desirable_weight": -1.0}, {"undesirable_weight": float("nan")}):
        with pytest.raises(ValueError, match="model.init_args.loss.init_args"):
            BCOLoss(**bad)
    policy, reference = random_logps(3, seed=0)  # 2B rows: the KL layout, not BCO's
    with pytest.raises(ValueError, match="one log-prob per labelled row"):
        BCOLoss()(policy, reference, {"label": torch.tensor([True, False, True])})
    with pytest.raises(KeyError, match="label"):
        BCOLoss()(policy, reference, {})


# -- gradients ---------------------------------------------------------------------------------
def test_gradients_match_the_formula_and_the_shift_is_detached() -> None:
    beta, wd, wu = 0.5, 1.0, 1.5
    policy, reference = unpaired_logps(6, seed=3)
    label = [True, False, True, True, False, False]
    sums = policy.sums.clone().requires_grad_(True)
    out = BCOLoss(beta, wd, wu)(SequenceLogProbs(sums, policy.counts), reference, {"label": torch.tensor(label)})
    (grad,) = torch.autograd.grad(out.loss, sums)
    r = [beta * x for x in log_ratios(policy, reference)]
    delta = sum(r) / len(r)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # d/ds of w_d * -log sigmoid(beta s - delta) = -w_d beta sigmoid(-(beta s - delta)); delta is a constant
    expected = [(-wd * beta * sig(-(x - delta)) if y else wu * beta * sig(x - delta)) / len(r) for x, y in zip(r, label)]
    assert grad.tolist() == pytest.approx(expected, rel=1e-10)
    assert all(g < 0 for g, y in zip(grad, label) if y) and all(g > 0 for g, y in zip(grad, label) if not y)

    policy, reference = random_logps(5, seed=4)
    sums = policy.sums.clone().requires_grad_(True)
    out = BCOPairLoss(beta, reward_shift=True)(SequenceLogProbs(sums, policy.counts), reference, {})
    (grad,) = torch.autograd.grad(out.loss, sums)
    r = [beta * x for x in log_ratios(policy, reference)]
    delta = sum(r) / len(r)
    expected = [-beta * sig(-(x - delta)) / 5 for x in r[:5]] + [beta * sig(x - delta) / 5 for x in r[5:]]
    assert grad.tolist() == pytest.approx(expected, rel=1e-10)
    assert (grad[:5] < 0).all() and (grad[5:] > 0).all()


@pytest.mark.parametrize("make", [lambda: BCOLoss(0.4, 1.0, 1.3), lambda: BCOPairLoss(0.4, reward_shift=True), lambda: BCOPairLoss(0.4)])
def test_gradcheck(make) -> None:
    loss = make()
    if loss.shift is not None:
        loss.shift.load_state_dict({"mean": torch.tensor(0.25, dtype=torch.float64), "count": torch.tensor(3.0, dtype=torch.float64)})
    loss.eval()  # a fixed delta: gradcheck calls the loss many times
    policy, reference = random_logps(4, seed=11)
    batch = {"label": torch.tensor([True, False, False, True, True, False, True, False])}

    def f(sums: torch.Tensor) -> torch.Tensor:
        return loss(SequenceLogProbs(sums, policy.counts), reference, batch).loss

    assert torch.autograd.gradcheck(f, (policy.sums.clone().requires_grad_(True),))


# -- the running reward shift ------------------------------------------------------------------
def test_running_shift_is_the_mean_of_every_row_seen() -> None:
    """Unequal batches: ``delta`` is the mean over every training row so far, so a short batch
    weighs by its rows (TRL's former BCOTrainer), not as a whole step."""
    beta = 0.2
    loss = BCOLoss(beta)
    rewards_seen, last = [], None
    for step, n in enumerate((4, 7, 2)):
        policy, reference = unpaired_logps(n, seed=20 + step)
        label = random_labels(n, step) if n > 2 else [True, False]
        h = log_ratios(policy, reference)
        rewards_seen += [beta * x for x in h]
        delta = sum(rewards_seen) / len(rewards_seen)  # updated before use
        out = loss(policy, reference, {"label": torch.tensor(label)})
        assert out.metrics["reward_shift"].item() == pytest.approx(delta, rel=1e-12)
        assert out.loss.item() == pytest.approx(bco_reference(h, label, beta, 1.0, 1.0, delta), rel=1e-12)
        last = delta
    assert loss.shift.count.item() == 13 and loss.shift.mean.item() == pytest.approx(last, rel=1e-12)
    assert loss.shift.mean.dtype == loss.shift.count.dtype == torch.float64


def test_pair_shift_weighs_each_step_once() -> None:
    """BCOPairLoss(reward_shift=True) folds each step's batch mean in with weight 1, as TRL's
    former ``bco_pair``: ``self.running.update(torch.cat((chosen_rewards, rejected_rewards), 0).mean())``."""
    beta = 0.2
    pair = BCOPairLoss(beta, reward_shift=True)
    means = []
    for step, b in enumerate((3, 5, 1)):
        policy, reference = random_logps(b, seed=40 + step)
        h = log_ratios(policy, reference)
        means.append(sum(beta * x for x in h) / (2 * b))
        delta = sum(means) / len(means)
        out = pair(policy, reference, {})
        assert out.metrics["reward_shift"].item() == pytest.approx(delta, rel=1e-12)
        assert out.per_pair.tolist() == pytest.approx(bco_pair_reference(h[:b], h[b:], beta, delta), rel=1e-12)
    assert pair.shift.count.item() == 3


def test_eval_mode_reads_the_shift_and_never_moves_it() -> None:
    loss = BCOLoss(0.1)
    train_policy, train_reference = unpaired_logps(5, seed=1)
    label = torch.tensor([True, False, True, False, True])
    loss(train_policy, train_reference, {"label": label})
    mean, count = loss.shift.mean.clone(), loss.shift.count.clone()
    loss.eval()
    policy, reference = unpaired_logps(5, seed=2)
    for _ in range(3):
        out = loss(policy, reference, {"label": label})
        assert out.metrics["reward_shift"].item() == mean.item()
    assert torch.equal(loss.shift.mean, mean) and torch.equal(loss.shift.count, count)
    h = log_ratios(policy, reference)
    assert out.loss.item() == pytest.approx(bco_reference(h, label.tolist(), 0.1, 1.0, 1.0, mean.item()), rel=1e-12)
    loss.train()
    loss(policy, reference, {"label": label})
    assert loss.shift.count.item() == 10  # two training batches of 5 rows


def test_state_dict_round_trip_restores_the_shift() -> None:
    label = torch.tensor([True, False, False, True])
    batches = [unpaired_logps(4, seed=s) for s in range(5)]
    original = BCOLoss(0.3)
    for policy, reference in batches[:3]:
        original(policy, reference, {"label": label})
    state = original.state_dict()
    assert set(state) == {"shift.mean", "shift.count"} and state["shift.count"].item() == 12
    resumed = BCOLoss(0.3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.shift.mean, original.shift.mean) and resumed.shift.count.item() == 12
    for policy, reference in batches[3:]:  # continuing gives the same losses and shift
        a, b = original(policy, reference, {"label": label}), resumed(policy, reference, {"label": label})
        assert a.loss.item() == b.loss.item() and a.metrics["reward_shift"].item() == b.metrics["reward_shift"].item()
    pair = BCOPairLoss(reward_shift=True)
    pair(*random_logps(3, seed=0), {})
    assert set(pair.state_dict()) == {"shift.mean", "shift.count"}


def test_shift_stays_float64_under_dtype_casts_and_skips_nonfinite_batches() -> None:
    loss = BCOLoss(0.1)
    for step in range(300):  # past 256: where a bf16 count would stop
        policy, reference = unpaired_logps(2, seed=step)
        loss(policy, reference, {"label": torch.tensor([True, False])})
    mean = loss.shift.mean.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float(), lambda m: m.to("cpu")):
        cast(loss)
        assert loss.shift.mean.dtype == loss.shift.count.dtype == torch.float64
        assert torch.equal(loss.shift.mean, mean) and loss.shift.count.item() == 600
    policy, reference = unpaired_logps(2, seed=0)
    bad = SequenceLogProbs(torch.tensor([float("nan"), -1.0], dtype=torch.float64), policy.counts)
    loss(bad, reference, {"label": torch.tensor([True, False])})  # its loss is NaN; the shift is untouched
    assert torch.equal(loss.shift.mean, mean) and loss.shift.count.item() == 600


def _shift_worker(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    loss = BCOLoss(beta=1.0)
    deltas = []
    # step 1: rank 0 holds rewards [1, 2, 3], rank 1 holds [-2]: the global batch mean is 4 / 4 = 1
    # step 2: rank 0 holds [4], rank 1 holds [0, 2]: 6 / 3 = 2; delta = (4 + 6) / 7, every row seen
    steps = {0: ([1.0, 2.0, 3.0], [4.0]), 1: ([-2.0], [0.0, 2.0])}[rank]
    for values in steps:
        sums = torch.tensor(values, dtype=torch.float64)
        labels = torch.tensor([i % 2 == 0 for i in range(len(values))])
        out_ = loss(SequenceLogProbs(sums, torch.ones(len(values))), SequenceLogProbs(torch.zeros_like(sums), torch.ones(len(values))),
                    {"label": labels})
        deltas.append(out_.metrics["reward_shift"].item())
    loss.eval()  # eval calls make no collective call (one rank alone would hang otherwise)
    if rank == 0:
        loss(SequenceLogProbs(torch.zeros(1, dtype=torch.float64), torch.ones(1)),
             SequenceLogProbs(torch.zeros(1, dtype=torch.float64), torch.ones(1)), {"label": torch.tensor([True])})
    out[rank] = (deltas, loss.shift.count.item())
    dist.destroy_process_group()


@pytest.mark.slow
def test_shift_is_the_same_on_every_rank() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_shift_worker, args=(2, port, out), nprocs=2, join=True)
    assert out[0] == out[1]
    deltas, count = out[0]
    assert deltas == pytest.approx([1.0, 10 / 7]) and count == 7


# -- the UNPAIRED layout -----------------------------------------------------------------------
def test_unpaired_collator_has_one_row_per_labelled_completion() -> None:
    rows = [
        {"prompt_ids": [1, 5, 4], "completion_ids": [6, 2], "label": True, "row_id": 0},
        {"prompt_ids": [1, 5, 4], "completion_ids": [9, 10, 2], "label": False, "row_id": 1},
    ]
    batch = UnpairedCollator(pad_token_id=0, max_length=8, with_kl=False)(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 4, 6, 2, 0], [1, 5, 4, 9, 10, 2]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert batch["label"].tolist() == [True, False] and batch["label"].dtype == torch.bool
    assert batch["row_id"].tolist() == [0, 1]
    # one row, or rows sharing a prompt, are fine: there is no partner to find
    assert UnpairedCollator(0, 8, with_kl=False)(rows[:1])["input_ids"].shape == (1, 5)


def test_unpaired_data_module_follows_the_losss_layout(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", quickstart_rows(5))  # paired rows: 10 unpaired rows
    tokenizer = load_tokenizer(tiny_spec())
    dm = UnpairedDataModule(train_data=path, val_data=path, batch_size=4, eval_batch_size=3)
    assert dm.layout is BatchLayout.UNPAIRED_WITH_KL  # before connect: as before
    dm.connect(tokenizer, BCOLoss().data_requirements)
    assert dm.layout is BatchLayout.UNPAIRED
    dm.setup("fit")
    assert len(dm.train_dataset) == 10 and dm.train_dataset["label"] == [True, False] * 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["label"].shape == (4,)  # B rows, not 2B
    assert batch["attention_mask"].shape == batch["completion_mask"].shape == batch["input_ids"].shape
    assert not dm.train_dataloader().drop_last  # a last batch of one row is fine without KL rows
    val = list(dm.val_dataloader())  # 10 rows, 3 a batch: a last batch of 1 is fine too
    assert [b["input_ids"].shape[0] for b in val] == [3, 3, 3, 1]
    # the same module connected for KTO goes back to the KL layout
    dm.connect(tokenizer, KTOLoss().data_requirements)
    dm.setup("fit")
    assert dm.layout is BatchLayout.UNPAIRED_WITH_KL and next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 8
    with pytest.raises(ValueError, match="last batch of 1"):
        dm.val_dataloader()
    with pytest.raises(ValueError, match=r"'unpaired'.*PreferenceDataModule produces 'pairs'"):
        PreferenceDataModule(train_data=path).connect(tokenizer, BCOLoss().data_requirements)
    one_class = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": " a", "label": True}] * 3)
    dm = UnpairedDataModule(train_data=one_class, batch_size=2)
    dm.connect(tokenizer, BCOLoss().data_requirements)
    with pytest.raises(ValueError, match="only desirable; an unpaired loss"):
        dm.setup("fit")


def test_precomputed_reference_is_refused() -> None:
    with pytest.raises(ValueError, match=r"reference\.precompute needs a pairwise loss.*BCOLoss"):
        PreferenceModule(model=tiny_spec(), loss=BCOLoss(), reference=ReferenceSpec(precompute=True))


# -- a fit -------------------------------------------------------------------------------------
def bco_trainer(tmp_path, max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=1,
                     default_root_dir=tmp_path, callbacks=list(callbacks))


def bco_module() -> PreferenceModule:
    return PreferenceModule(model=tiny_spec(), loss=BCOLoss(beta=0.1), optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))


def test_bco_fits_two_steps_on_paired_data(tmp_path, pair_files) -> None:
    """The Python API: BCOLoss, a paired dataset through UnpairedDataModule, one connect call."""
    L.seed_everything(0)
    module = bco_module()
    data = UnpairedDataModule(train_data=pair_files[0], val_data=pair_files[1], max_length=64, batch_size=4)
    data.connect(module.tokenizer, module.data_requirements)
    rows_seen: list[int] = []
    module.policy.get_decoder().register_forward_hook(lambda m, args, kwargs, out: rows_seen.append(kwargs["input_ids"].shape[0]),
                                                      with_kwargs=True)
    trainer = bco_trainer(tmp_path, max_steps=2)
    trainer.fit(module, data)
    assert trainer.global_step == 2 and len(data.train_dataset) == 64  # 32 pairs -> 64 rows
    assert rows_seen and set(rows_seen) == {4}  # B rows a forward, no KL rows
    assert module.loss.shift.count.item() == 8  # two training steps of 4 rows; validation moved nothing
    assert math.isfinite(trainer.callback_metrics["train/reward_shift"].item())
    sanity = module.validation_history[0]  # before step 1: the shift is still 0
    assert sanity["sanity_check"] and sanity["reward_shift"] == 0.0 and "rewards/accuracy" not in sanity


def test_bco_shift_is_checkpointed_and_resumed(tmp_path, pair_files) -> None:
    """A run stopped at step 2 and resumed ends with the shift of the run that never stopped."""

    class SaveAtTwo(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 2 and not (tmp_path / "mid.ckpt").exists():
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    L.seed_everything(0)
    module = bco_module()
    data = UnpairedDataModule(train_data=pair_files[0], val_data=pair_files[1], max_length=64, batch_size=4)
    data.connect(module.tokenizer, module.data_requirements)
    bco_trainer(tmp_path, max_steps=4, callbacks=[SaveAtTwo()]).fit(module, data)
    assert module.loss.shift.count.item() == 16
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)["state_dict"]  # our own file
    assert saved["loss.shift.count"].item() == 8 and saved["loss.shift.mean"].dtype == torch.float64

    L.seed_everything(0)
    resumed = bco_module()
    data.connect(resumed.tokenizer, resumed.data_requirements)
    trainer = bco_trainer(tmp_path, max_steps=4)
    trainer.fit(resumed, data, ckpt_path=str(tmp_path / "mid.ckpt"), weights_only=False)  # its hparams hold a ModelSpec
    assert trainer.global_step == 4 and resumed.loss.shift.count.item() == 16
    assert resumed.loss.shift.mean.item() == pytest.approx(module.loss.shift.mean.item(), rel=1e-6)
