"""Iterative DPO: rounds of sampling from the current policy, judging, pairing and one epoch of
training, with the reference reset at round boundaries; through the CLI on the shipped recipe."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from conftest import ROOT, tiny_spec
from dpo_lightning.cli import run
from dpo_lightning.experiments.sentiment import score as sentiment
from dpo_lightning.generation import SamplingSpec
from dpo_lightning.iterative import (
    TRAIN_STAGE, IterativePairsDataModule, RoundPairs, RoundLoader, RoundSampler, plan_batches,
)
from dpo_lightning.judges import FunctionJudge
from dpo_lightning.losses import DPOLoss, IPOLoss, KTOLoss, LossOutput, ODPOLoss, SimPOLoss
from dpo_lightning.lora import LoraSpec
from dpo_lightning.modules import PreferenceModule, ReferenceSpec, ReferenceUpdate
from dpo_lightning.modules.iterative import IterativePreferenceModule, RoundReference

SENTIMENT = "dpo_lightning.experiments.sentiment:score"
PROMPTS = [{"prompt": p} for p in (
    "Write a short review of the lamp.", "What do you think of this kettle?", "Review the desk.",
    "Describe your experience with the tent.", "Review the chair you bought last month.", "What do you think of this phone?",
)]


def by_length(prompt, completion) -> float:  # a judge that rarely ties on a random model's samples
    return float(len(completion)) + (0.5 if "lamp" in str(prompt) else 0.0)


class Snapshot(Callback):
    """The policy's weights at the end of round 1 (after its last step and validation)."""

    def __init__(self) -> None:
        self.policy: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            self.policy = {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()}


class RecordingODPO(ODPOLoss):
    def forward(self, policy, reference, batch) -> LossOutput:
        self.seen = getattr(self, "seen", []) + [{k: v.detach().clone() for k, v in batch.items()}]
        return super().forward(policy, reference, batch)


def fit(root: Path, *extra: str):
    """The shipped recipe (base + iterative_dpo: CSV logger, LogCompletions, checkpoints), sized
    down: 8 prompts, 4 pairs a batch (2 steps a round), 8 new tokens, a constant learning rate
    (so that runs of different lengths share a schedule)."""
    return run([
        "fit", "--config", str(ROOT / "recipes" / "base.yaml"), "--config", str(ROOT / "recipes" / "iterative_dpo.yaml"),
        "--data.init_args.max_rows", "8", "--data.init_args.batch_size", "4", "--data.init_args.sampling.max_new_tokens", "8",
        "--trainer.callbacks.init_args.num_prompts", "2", "--trainer.callbacks.init_args.max_new_tokens", "8",
        "--model.init_args.scheduler.init_args.warmup", "0", "--model.init_args.scheduler.init_args.decay", "constant",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
        "--model.init_args.export_dir", str(root / "model"), *extra,
    ])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    cli = fit(root, "--trainer.callbacks+=test_iterative.Snapshot")
    return root, cli


@pytest.mark.slow
def test_two_rounds_through_the_cli(straight) -> None:
    root, cli = straight
    module, dm, trainer = cli.model, cli.datamodule, cli.trainer
    assert isinstance(module, IterativePreferenceModule) and isinstance(dm, IterativePairsDataModule)
    assert trainer.current_epoch == 2 and trainer.global_step == 4  # 2 rounds of 2 steps
    log_dir = Path(trainer.log_dir)
    # per-round values in the CSV logger's metrics, as the data module computed them
    with (log_dir / "metrics.csv").open() as f:
        logged = [r for r in csv.DictReader(f) if r.get("round/index")]
    assert [float(r["round/index"]) for r in logged] == [1.0, 2.0] and len(dm.history) == 2
    for row, values in zip(logged, dm.history):
        for name in ("round/score_mean", "round/pairs", "round/tied"):
            assert float(row[name]) == pytest.approx(values[name])
        assert values["round/pairs"] + values["round/tied"] == 8  # best_vs_worst: one pair or one tie per prompt
    # each round's pairs are written as a dataset, scored by the judge
    for n, values in ((1, dm.history[0]), (2, dm.history[1])):
        rows = read_jsonl(log_dir / "rounds" / f"round_{n}.jsonl")
        assert len(rows) == values["round/pairs"]
        for r in rows:
            assert r["score_chosen"] == pytest.approx(sentiment(r["chosen"]), abs=1e-6) and r["score_chosen"] > r["score_rejected"]
            assert r["score_rejected"] == pytest.approx(sentiment(r["rejected"]), abs=1e-6)
    # the reference was reset to the policy of the round boundary, and has not moved since
    snapshot = next(cb for cb in trainer.callbacks if isinstance(cb, Snapshot)).policy
    assert isinstance(module.reference, RoundReference) and module.reference_state()["round"] == 1
    reference = module.reference.network.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in snapshot.items())
    assert any(not torch.equal(p, snapshot[k]) for k, p in module.policy.state_dict().items())  # round 2 trained
    # round 2's pairs are what the policy after round 1 samples (not the SFT model's)
    served = dm.round_rows
    trained = {k: v.clone() for k, v in module.policy.state_dict().items()}
    try:
        module.policy.load_state_dict(snapshot)
        assert dm.sample_split("train", TRAIN_STAGE, 1).rows == served
        module.policy.load_state_dict(load_file(str(ROOT / "data" / "tiny-llama" / "model.safetensors")), strict=False)
        assert dm.sample_split("train", TRAIN_STAGE, 1).rows != served
        # and a different seed samples other pairs from the same policy
        module.policy.load_state_dict(snapshot)
        dm.sampling.seed = 12345
        assert dm.sample_split("train", TRAIN_STAGE, 1).rows != served
    finally:
        dm.sampling.seed = None
        module.policy.load_state_dict(trained)
    # LogCompletions (in the recipe) wrote its table after each validation
    assert sorted(p.name for p in (log_dir / "completions").glob("*.jsonl")) == ["step_0.jsonl", "step_2.jsonl", "step_4.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["round_boundary", "mid_round"])
def test_resumed_runs_sample_and_train_as_the_uninterrupted_one(straight, tmp_path, stop: str) -> None:
    """Same seed, same run: a run stopped at the end of round 1 (or one step into round 2) and
    resumed from its checkpoint samples the same pairs and ends with the same weights."""
    root, cli = straight
    if stop == "round_boundary":
        first = fit(tmp_path, "--trainer.max_epochs", "1")
        assert first.trainer.global_step == 2
    else:
        first = fit(tmp_path, "--trainer.max_steps", "3",
                    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                    "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_last", "true")
        assert first.trainer.global_step == 3 and first.datamodule.round_index == 1
    resumed = fit(tmp_path, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 4
    a = load_file(str(root / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert resumed.datamodule.round_rows == cli.datamodule.round_rows
    assert [h["round/pairs"] for h in resumed.datamodule.history] == [h["round/pairs"] for h in cli.datamodule.history]
    reference, expected = resumed.model.reference.network.state_dict(), cli.model.reference.network.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in expected.items())
    straight_logs = Path(cli.trainer.log_dir)
    first_logs = Path(first.trainer.log_dir)
    assert read_jsonl(first_logs / "rounds" / "round_1.jsonl") == read_jsonl(straight_logs / "rounds" / "round_1.jsonl")
    if stop == "round_boundary":  # round 2 was sampled by the resumed run, from the restored policy
        resumed_logs = Path(resumed.trainer.log_dir)
        assert read_jsonl(resumed_logs / "rounds" / "round_2.jsonl") == read_jsonl(straight_logs / "rounds" / "round_2.jsonl")


class RecordingIPO(IPOLoss):
    def forward(self, policy, reference, batch) -> LossOutput:
        self.seen = getattr(self, "seen", []) + [{k: v.detach().clone() for k, v in batch.items()}]
        return super().forward(policy, reference, batch)


@pytest.mark.parametrize("loss_class", [RecordingODPO, RecordingIPO])
def test_pairwise_losses_train_on_the_judged_pairs(tmp_path, loss_class) -> None:
    """Any pairwise loss; ODPO's offset reads the judge's scores of each pair."""
    L.seed_everything(0)
    loss = loss_class(beta=0.1, alpha=1.0, offset_fn="identity") if loss_class is RecordingODPO else loss_class(beta=0.1)
    module = IterativePreferenceModule(model=tiny_spec(), loss=loss, optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
    judge = FunctionJudge("test_iterative:by_length")
    dm = IterativePairsDataModule(train_data=list(PROMPTS), judge=judge,
                                  sampling=SamplingSpec(num_samples=3, pairs="all", max_new_tokens=6),
                                  max_length=64, batch_size=4)
    dm.connect(module.tokenizer, module.data_requirements)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, reload_dataloaders_every_n_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, dm)
    steps = dm.steps_per_round()
    assert steps == 5 and trainer.global_step == steps  # ceil(6 prompts * 3 pairs / 4)
    seen = loss.seen
    assert len(seen) == steps and sum(b["row_id"].numel() for b in seen) >= len(dm.round_rows)
    tokenizer = module.tokenizer
    for batch in seen:
        n = batch["row_id"].numel()
        assert 1 <= n <= 4 and (batch["score_chosen"] > batch["score_rejected"]).all()
        prompts = [PROMPTS[i]["prompt"] for i in batch["row_id"].tolist()]
        for side, rows in (("score_chosen", range(n)), ("score_rejected", range(n, 2 * n))):
            texts = [tokenizer.decode(batch["input_ids"][r][batch["completion_mask"][r].bool()], skip_special_tokens=True)
                     for r in rows]
            assert batch[side].tolist() == pytest.approx(judge.score(prompts, texts).tolist())
    if loss_class is RecordingODPO:
        assert trainer.callback_metrics["train/offset"].item() > 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_batches_are_planned_evenly_and_resume_only_within_their_round() -> None:
    batches = plan_batches(10, 4, seed=0)
    assert [len(b) for b in batches] == [3, 3, 2, 2] and sorted(i for b in batches for i in b) == list(range(10))
    assert plan_batches(10, 4, seed=0) == batches and plan_batches(10, 4, seed=1) != batches
    assert sorted(len(b) for b in plan_batches(3, 5, seed=0)) == [1] * 5  # repeated to fill every batch
    # 2 processes: global batch j is one process's batch j, split 2 + 1 / 2 + 2 in order
    whole, split = plan_batches(7, 2, seed=3), plan_batches(7, 2, seed=3, world_size=2)
    assert [len(b) for b in split] == [2, 2, 2, 1] and [split[0] + split[1], split[2] + split[3]] == whole
    assert [len(b) for b in plan_batches(3, 2, seed=0, world_size=2)] == [1] * 4  # a pair for every process
    sampler = RoundSampler(plan_batches(8, 4, seed=0), num_replicas=2, rank=1)
    assert len(sampler) == 2 and list(sampler) == plan_batches(8, 4, seed=0)[1::2]
    rows = RoundPairs([{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2], "row_id": i,
                      "score_chosen": 1.0, "score_rejected": 0.0} for i in range(4)])
    from dpo_lightning.data import PairCollator

    def loader(round_index: int) -> RoundLoader:
        return RoundLoader(rows, RoundSampler(plan_batches(4, 2, seed=0)), PairCollator(0, ("score_chosen",)), round_index)

    first = loader(0)
    it = iter(first)
    next(it)
    state = first.state_dict()
    assert state["batches_consumed"] == 1 and state["round"] == 0
    same, other = loader(0), loader(1)
    same.load_state_dict(state)
    other.load_state_dict(state)
    assert len(list(same)) == 1 and len(list(other)) == 2
    with pytest.raises(ValueError, match="world_size: checkpoint 2"):
        loader(0).load_state_dict({**state, "world_size": 2})


def one_epoch(tmp_path: Path, epochs: int = 1) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))


def test_sampling_settings_and_judge_are_checked_with_the_recipe_key() -> None:
    with pytest.raises(ValueError, match="data.init_args.sampling.num_samples must be"):
        IterativePairsDataModule(train_data=list(PROMPTS), judge=FunctionJudge(SENTIMENT), sampling=SamplingSpec(num_samples=1))
    with pytest.raises(TypeError, match="data.init_args.judge must be"):
        IterativePairsDataModule(train_data=list(PROMPTS), judge=sentiment)


def test_a_per_round_reference_refuses_what_it_cannot_copy_into() -> None:
    with pytest.raises(ValueError, match="per_round.*lora"):
        IterativePreferenceModule(model=tiny_spec(), lora=LoraSpec(r=4))
    with pytest.raises(ValueError, match=r"per_round.*reference\.update"):
        IterativePreferenceModule(model=tiny_spec(), reference=ReferenceSpec(update=ReferenceUpdate()))
    with pytest.raises(ValueError, match="SimPOLoss uses no reference"):
        IterativePreferenceModule(model=tiny_spec(), loss=SimPOLoss())
    assert not isinstance(IterativePreferenceModule(model=tiny_spec(), reference=ReferenceSpec(reset="never")).reference, RoundReference)


def test_connect_refuses_unpaired_losses_and_columns_the_judge_does_not_give() -> None:
    module = IterativePreferenceModule(model=tiny_spec(), loss=DPOLoss())
    dm = IterativePairsDataModule(train_data=list(PROMPTS), judge=FunctionJudge(SENTIMENT), max_length=64)
    with pytest.raises(ValueError, match="dpo_lightning.data.UnpairedDataModule"):
        dm.connect(module.tokenizer, KTOLoss().data_requirements)

    class NeedsMargin(DPOLoss):
        score_columns = ("margin",)

    with pytest.raises(ValueError, match=r"reads \['margin'\]"):
        dm.connect(module.tokenizer, NeedsMargin().data_requirements)


def test_rounds_need_the_loader_rebuilt_every_epoch(tmp_path) -> None:
    module = IterativePreferenceModule(model=tiny_spec(), loss=DPOLoss())
    dm = IterativePairsDataModule(train_data=list(PROMPTS), judge=FunctionJudge(SENTIMENT), max_length=64)
    dm.connect(module.tokenizer, module.data_requirements)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs: 1"):
        one_epoch(tmp_path, epochs=2).fit(module, dm)


def test_a_round_whose_samples_all_tie_is_an_error(tmp_path) -> None:
    module = IterativePreferenceModule(model=tiny_spec(), loss=DPOLoss())
    tied = IterativePairsDataModule(train_data=list(PROMPTS), judge=FunctionJudge("test_iterative:constant"),
                                    sampling=SamplingSpec(num_samples=4, max_new_tokens=4), max_length=64)
    tied.connect(module.tokenizer, module.data_requirements)
    with pytest.raises(ValueError, match=r"round 1: no pairs: the judge gave every prompt's 4 samples the same score \(6 tied\)"):
        one_epoch(tmp_path).fit(module, tied)


def test_sampled_pairs_refuse_a_precomputed_reference(tmp_path) -> None:
    cached = PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(precompute=True, cache_dir=str(tmp_path / "cache")))
    dm = IterativePairsDataModule(train_data=list(PROMPTS), judge=FunctionJudge(SENTIMENT), max_length=64)
    dm.connect(cached.tokenizer, cached.data_requirements)
    with pytest.raises(ValueError, match=r"reference\.precompute: false"):
        one_epoch(tmp_path).fit(cached, dm)


def constant(completion) -> float:
    return 0.5
