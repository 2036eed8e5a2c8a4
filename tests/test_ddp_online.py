"""Online DPO, iterative DPO and LogCompletions under 2-process DDP on CPU (gloo).

Online DPO samples on each process, so a 2-process run cannot equal one process sampling the
union of the prompts (the samples depend on the seed and the batch each process samples). What
is the same, and tested: process ``r``'s samples and pairs are what one process gives for those
prompts with process ``r``'s seed; the update is the one a single process makes on the union of
both processes' pairs (unequal pair counts and a process whose samples all tie included); the
logged training and validation figures are those of the union. Iterative DPO's rounds are
sampled by generation batch (seeded by the batch, not the process) and gathered, so 2 processes
train on exactly the pairs and global batches of one process and end with its weights.

One launch of 2 processes fits the three 2-process recipes in turn (``tests/plugins/ranks.py``),
one single-process launch fits iterative DPO's 1-process twin."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PLUGINS_DIR, ROOT, ddp_recipe, last_val_metrics, launch_fits, tiny_spec, write_jsonl, write_recipe
from dpo_lightning.data.collator import PairCollator
from dpo_lightning.generation import (
    SCORE_COLUMNS, Samples, SamplingSpec, generation_seed, judge_and_pair, left_padded, pair_rows,
)
from dpo_lightning.judges import FunctionJudge
from dpo_lightning.modules import OnlinePreferenceModule

pytestmark = pytest.mark.slow
sys.path.insert(0, str(PLUGINS_DIR))  # the judges' functions (online_ranks:...) import here too

ONLINE_STEPS = 2
LR = 0.5
CONSTANT_LR = {"class_path": "dpo_lightning.optim.WarmupDecayLR", "init_args": {"warmup": 0, "decay": "constant"}}
ONLINE_SAMPLING = {"num_samples": 3, "pairs": "all", "max_new_tokens": 8}
LOG_PROMPTS = ["Review the lamp.", "Describe the kettle.", "What do you think of this tent?"]


def prompt_rows(name: str, n: int) -> list[dict]:
    with (ROOT / "data" / "sentiment" / name).open() as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def online_recipe(folder: Path, files: dict[str, str], judge: str) -> dict:
    """Online DPO on 2 processes, 2 prompts each a step (4 a global step), ``ONLINE_STEPS`` SGD
    steps at a constant lr, one validation at the end over 4 prompts (2 a process)."""
    recipe = ddp_recipe(folder, files["train"], files["val"], devices=2, global_batch=4, steps=ONLINE_STEPS)
    init = recipe["model"]["init_args"]
    recipe["model"]["class_path"] = "dpo_lightning.modules.OnlinePreferenceModule"
    init.update(judge={"class_path": "dpo_lightning.judges.FunctionJudge", "init_args": {"path": judge}},
                sampling=dict(ONLINE_SAMPLING), scheduler=CONSTANT_LR)
    recipe["data"] = {"class_path": "dpo_lightning.data.PromptDataModule", "init_args": {
        "train_data": files["train"], "val_data": files["val"], "max_length": 64, "batch_size": 2,
        "eval_batch_size": 2, "group_by_length": False}}
    recipe["trainer"]["callbacks"] = [{"class_path": "online_ranks.RecordOnline", "init_args": {"folder": str(folder)}}]
    return recipe


def iterative_recipe(folder: Path, files: dict[str, str], devices: int) -> dict:
    """Iterative DPO, 2 rounds over 6 prompts (3 samples each, best vs worst: 6 pairs a round in
    2 global batches of 3, split 2 + 1 over 2 processes), 2 validation pairs a process."""
    recipe = ddp_recipe(folder, files["train"], files["val"], devices=devices, global_batch=4, steps=-1)
    recipe["trainer"].update(max_steps=-1, max_epochs=2, reload_dataloaders_every_n_epochs=1, val_check_interval=None,
                             check_val_every_n_epoch=2)
    recipe["trainer"]["callbacks"] = [{"class_path": "online_ranks.RecordRounds", "init_args": {"folder": str(folder)}}]
    recipe["model"]["class_path"] = "dpo_lightning.modules.IterativePreferenceModule"
    recipe["model"]["init_args"].update(scheduler=CONSTANT_LR, reference={"reset": "per_round"})
    recipe["data"] = {"class_path": "dpo_lightning.iterative.IterativePairsDataModule", "init_args": {
        "train_data": files["iterative_train"], "val_data": files["val"], "max_length": 64,
        "batch_size": 4 // devices, "eval_batch_size": 2, "group_by_length": False, "generation_batch_size": 2,
        "judge": {"class_path": "dpo_lightning.judges.FunctionJudge", "init_args": {"path": "online_ranks:distinct"}},
        "sampling": {"num_samples": 3, "pairs": "best_vs_worst", "max_new_tokens": 8}}}
    return recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ddp_online")
    files = {
        "train": write_jsonl(tmp / "prompts.jsonl", prompt_rows("pair_prompts.jsonl", 8)),
        "iterative_train": write_jsonl(tmp / "iterative_prompts.jsonl", prompt_rows("pair_prompts.jsonl", 6)),
        "val": write_jsonl(tmp / "val_prompts.jsonl", prompt_rows("eval_prompts.jsonl", 4)),
    }
    folders = {name: tmp / name for name in ("online", "tied", "iterative-2", "iterative-1")}
    online = online_recipe(folders["online"], files, "online_ranks:coarse_length")
    online["trainer"]["callbacks"].append({"class_path": "dpo_lightning.callbacks.LogCompletions", "init_args": {
        "prompts": LOG_PROMPTS, "max_new_tokens": 8, "judge": {
            "class_path": "dpo_lightning.judges.FunctionJudge", "init_args": {"path": "online_ranks:coarse_length"}}}})
    tied = online_recipe(folders["tied"], files, "online_ranks:tied_on_rank_one")
    tied["trainer"]["limit_val_batches"] = 0
    two = [write_recipe(tmp / "online.yaml", online), write_recipe(tmp / "tied.yaml", tied),
           write_recipe(tmp / "iterative-2.yaml", iterative_recipe(folders["iterative-2"], files, 2))]
    one = [write_recipe(tmp / "iterative-1.yaml", iterative_recipe(folders["iterative-1"], files, 1))]
    for paths, name in ((two, "2"), (one, "1")):
        out = launch_fits(paths, timeout=480)
        (tmp / f"log-{name}.txt").write_text(out.stdout + out.stderr)
        assert out.returncode == 0, out.stderr[-4000:]
    return folders


def records(folder: Path) -> list[dict]:
    reports = [json.loads((folder / f"online_rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in reports)
    return reports


def fresh_module(judge: str) -> OnlinePreferenceModule:
    """The recipe's module as the run built it (seed 0 weights, SGD at ``LR``), in one process."""
    return OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge(judge), sampling=SamplingSpec(**ONLINE_SAMPLING))


def union_batch(batches: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """The ``PAIRS`` batch of every pair both processes formed in one step (rank 0's, then rank 1's)."""
    rows = []
    for b in batches:
        samples = Samples(b["prompt_ids"], b["completion_ids"], b["has_eos"], [""] * len(b["completion_ids"]),
                          b["prompts"], ONLINE_SAMPLING["num_samples"], b["row_ids"])
        rows += pair_rows(samples, [tuple(p) for p in b["pairs"]], torch.tensor(b["scores"]), b["row_ids"])
    return PairCollator(pad, columns=SCORE_COLUMNS)(rows)


def sgd_on_union(module: OnlinePreferenceModule, reports: list[dict]) -> dict[str, torch.Tensor]:
    """One process's SGD steps on the union of both processes' recorded pairs, step by step."""
    module.train()
    policy = module.policy
    for step in range(ONLINE_STEPS):
        batches = [next(b for b in r["batches"] if b["step"] == step) for r in reports]
        with_pairs = [b for b in batches if b["pairs"]]
        policy.zero_grad()
        loss, _ = module.step(union_batch(with_pairs, module.tokenizer.pad_token_id), module.train_metrics)
        loss.backward()
        with torch.no_grad():
            for p in policy.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
    return {k: v.detach() for k, v in policy.state_dict().items()}


def assert_weights(export: Path, expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    got = load_file(str(export / "model.safetensors"))
    assert got.keys() <= expected.keys() and got
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=atol, msg=key)
    initial = fresh_module("online_ranks:distinct").policy.state_dict()
    assert max(float((got[k] - initial[k]).abs().max()) for k in got) > 1e-4  # training moved them


def train_rows(folder: Path) -> list[dict]:
    (metrics,) = folder.rglob("metrics.csv")
    return [r for r in csv.DictReader(metrics.open()) if r.get("train/online/pairs")]


# -- online DPO ----------------------------------------------------------------------------------
def test_each_rank_samples_its_own_prompts_with_its_own_seed(runs) -> None:
    reports = records(runs["online"])
    for step in range(ONLINE_STEPS):
        ids = [next(b for b in r["batches"] if b["step"] == step)["row_ids"] for r in reports]
        assert len(ids[0]) == len(ids[1]) == 2 and not set(ids[0]) & set(ids[1])  # the sampler splits the prompts
    every = sorted(i for r in reports for b in r["batches"] for i in b["row_ids"])
    assert every == list(range(8))  # one epoch of 8 prompts: each sampled once, by one process
    module = fresh_module("online_ranks:coarse_length")
    for rank, report in enumerate(reports):
        first = report["batches"][0]
        assert first["seed"] == generation_seed(0, 0, 0, 0, rank)  # seed_everything 0, train stage, step 0, batch 0
        batch = {**left_padded(first["prompt_ids"], module.tokenizer.pad_token_id), "prompt": first["prompts"],
                 "row_id": torch.tensor(first["row_ids"])}
        samples = module.sample(batch, ONLINE_SAMPLING["num_samples"], first["seed"])
        assert samples.completion_ids == first["completion_ids"]  # one process, that seed: the same samples
        judged = judge_and_pair(module.judge, samples, module.sampling)
        assert judged.scores.double().tolist() == first["scores"]
        assert [list(p) for p in judged.pairs] == first["pairs"] and judged.ties == first["ties"]
    # with the other rank's seed the same prompts sample differently: the seed is per rank
    other = module.sample({**left_padded(reports[0]["batches"][0]["prompt_ids"], module.tokenizer.pad_token_id),
                           "prompt": reports[0]["batches"][0]["prompts"]}, 3, reports[1]["batches"][0]["seed"])
    assert other.completion_ids != reports[0]["batches"][0]["completion_ids"]


def test_online_update_is_one_process_on_the_union_of_both_ranks_pairs(runs) -> None:
    reports = records(runs["online"])
    counts = [[len(b["pairs"]) for b in r["batches"]] for r in reports]
    assert counts[0] != counts[1] and all(counts[0] + counts[1]), counts  # unequal pair counts: weighting matters
    expected = sgd_on_union(fresh_module("online_ranks:coarse_length"), reports)
    assert_weights(runs["online"] / "export", expected)


def test_online_training_metrics_are_those_of_the_union(runs) -> None:
    reports = records(runs["online"])
    rows = train_rows(runs["online"])
    assert [int(r["step"]) for r in rows] == list(range(ONLINE_STEPS))
    for step, row in enumerate(rows):
        batches = [next(b for b in r["batches"] if b["step"] == step) for r in reports]
        scores = [s for b in batches for s in b["scores"]]
        lengths = [len(c) for b in batches for c in b["completion_ids"]]
        k = ONLINE_SAMPLING["num_samples"]
        chosen = [b["scores"][i * k + c] for b in batches for i, c, _ in b["pairs"]]
        rejected = [b["scores"][i * k + r] for b in batches for i, _, r in b["pairs"]]
        expected = {
            "pairs": len(chosen), "tied_pairs": sum(b["ties"] for b in batches),
            "score_mean": sum(scores) / len(scores), "completion_length": sum(lengths) / len(lengths),
            "eos_fraction": sum(e for b in batches for e in b["has_eos"]) / len(lengths),
            "score_chosen": sum(chosen) / len(chosen), "score_rejected": sum(rejected) / len(rejected),
        }
        for name, value in expected.items():
            assert float(row[f"train/online/{name}"]) == pytest.approx(value, rel=1e-6), (step, name)
        assert float(row["train/online/skipped_steps"]) == 0.0


def test_online_validation_metrics_are_reduced_over_both_ranks(runs) -> None:
    reports = records(runs["online"])
    (path,) = runs["online"].rglob("metrics.csv")
    row = [r for r in csv.DictReader(path.open()) if r.get("val/score")][-1]
    local = [r["validations"][-1] for r in reports]
    for name in ("score", "kl", "completion_length", "eos_fraction"):
        sums, weights = [v[name][0] for v in local], [v[name][1] for v in local]
        assert weights == [2.0, 2.0]  # 4 validation prompts, one sample each, 2 a process
        assert float(row[f"val/{name}"]) == pytest.approx(sum(sums) / sum(weights), rel=1e-6, abs=1e-7), name
    assert local[0] != local[1]  # the processes sampled different prompts: the reduction is seen


def test_a_rank_whose_samples_all_tie_does_not_hang_and_weighs_nothing(runs) -> None:
    reports = records(runs["tied"])
    assert all(not b["pairs"] for b in reports[1]["batches"]) and all(b["pairs"] for b in reports[0]["batches"])
    rows = train_rows(runs["tied"])
    assert [float(r["train/online/skipped_steps"]) for r in rows] == [0.0] * ONLINE_STEPS  # rank 0's pairs train
    # the update is rank 0's pairs' mean (the global batch), not half of it as an unweighted DDP average gives
    expected = sgd_on_union(fresh_module("online_ranks:tied_on_rank_one"), reports)
    assert_weights(runs["tied"] / "export", expected)


def test_log_completions_is_written_once_by_rank_zero(runs) -> None:
    files = sorted(runs["online"].rglob("completions/step_*.jsonl"))
    assert [f.name for f in files] == [f"step_{ONLINE_STEPS}.jsonl"], files  # one validation, one file
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["prompt"] for r in rows] == LOG_PROMPTS  # each prompt once: no second process's rows
    assert all(r["step"] == ONLINE_STEPS and isinstance(r["score"], float) for r in rows)


# -- iterative DPO --------------------------------------------------------------------------------
def test_iterative_ranks_train_on_the_same_rounds_as_one_process(runs) -> None:
    one = json.loads((runs["iterative-1"] / "rounds_rank0.json").read_text())
    two = [json.loads((runs["iterative-2"] / f"rounds_rank{r}.json").read_text()) for r in range(2)]
    assert [len(t["rounds"]) for t in two] == [2, 2] and len(one["rounds"]) == 2
    for n in range(2):
        digests = {t["rounds"][n]["digest"] for t in two} | {one["rounds"][n]["digest"]}
        assert len(digests) == 1, n  # every process holds the round's pairs, equal to one process's
        assert one["rounds"][n]["pairs"] == 6
        # global batch j of 2 processes = batch j of one process, split 2 + 1
        for j, whole in enumerate(one["rounds"][n]["batches"]):
            parts = [t["rounds"][n]["batches"][j] for t in two]
            assert [len(p) for p in parts] == [2, 1] and parts[0] + parts[1] == whole
    for n in (1, 2):  # the round files (rank 0 writes them) are equal
        a = next(runs["iterative-1"].rglob(f"rounds/round_{n}.jsonl")).read_text()
        b = [p.read_text() for p in runs["iterative-2"].rglob(f"rounds/round_{n}.jsonl")]
        assert b == [a]


def test_iterative_two_rounds_end_with_one_process_weights(runs) -> None:
    a = load_file(str(runs["iterative-1"] / "export" / "model.safetensors"))
    b = load_file(str(runs["iterative-2"] / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    m1, m2 = last_val_metrics(runs["iterative-1"]), last_val_metrics(runs["iterative-2"])
    for name in ("val/loss", "val/rewards/chosen", "val/rewards/rejected", "val/rewards/margins"):
        assert m1[name] == pytest.approx(m2[name], rel=1e-4, abs=1e-6), name
    assert round(m1["val/rewards/accuracy"] * 4) == round(m2["val/rewards/accuracy"] * 4)  # a count of 4 pairs
