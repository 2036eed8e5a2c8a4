"""Every offline recipe shape under 2-process DDP on CPU (gloo) against one process on the same
global batch: KTO, BCO, a precomputed reference, TR-DPO's moving reference, SFT and a reward
model; and offline DPO sharded by FSDP over 2 CPU processes. One launch of 2 processes fits
all seven recipes in turn (``tests/plugins/ranks.py``), one single-process launch fits their
1-process twins; each test reads what its pair of runs left."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    ROOT, TINY_CONFIG, TOKENIZER_DIR, ddp_recipe, last_val_metrics, launch_fits, quickstart_rows, tiny_spec,
    write_jsonl, write_recipe,
)
from dpo_lightning.models import load_causal_lm, load_reward_model, load_tokenizer

pytestmark = pytest.mark.slow

SHAPES = ("kto", "bco", "precomputed", "tr_dpo", "sft", "reward", "fsdp")  # fsdp last: its patches stay
STEPS = 4


def shape_recipe(shape: str, folder: Path, files: dict[str, str], devices: int) -> dict:
    """The ``shape`` recipe for ``devices`` processes: 8 rows (pairs, unpaired rows or
    completions) a step in all, ``STEPS`` SGD steps, validation at the end."""
    recipe = ddp_recipe(folder, files["train"], files["val"], devices, global_batch=8, steps=STEPS)
    model, data = recipe["model"]["init_args"], recipe["data"]
    if shape == "kto":
        model["loss"] = {"class_path": "dpo_lightning.losses.KTOLoss", "init_args": {"beta": 0.1}}
        # a reference with wider random weights: its log-probs of the text are lower than the
        # policy's on average, so the KL estimate z_ref is mostly above its clamp at 0 (with a
        # copy of the policy it stays 0 for these 4 steps, and its averaging over ranks is unseen)
        model["reference"] = {"model": {"config": dict(TINY_CONFIG, initializer_range=0.1), "tokenizer": TOKENIZER_DIR,
                                        "seed": 1}}
        # one process builds the KL rows of each half of its batch as each of 2 processes does
        data["class_path"] = "ranks.BlockwiseKLDataModule" if devices == 1 else "dpo_lightning.data.UnpairedDataModule"
        if devices == 1:
            data["init_args"]["kl_block"] = 4
    elif shape == "bco":
        model["loss"] = {"class_path": "dpo_lightning.losses.BCOLoss", "init_args": {"beta": 0.1}}
        data["class_path"] = "dpo_lightning.data.UnpairedDataModule"
    elif shape == "precomputed":
        model["reference"] = {"precompute": True, "cache_dir": str(folder / "cache")}
    elif shape == "tr_dpo":
        model["reference"] = {"update": {"alpha": 0.5, "every_n_steps": 2}}
    elif shape == "sft":
        recipe["model"] = {"class_path": "dpo_lightning.modules.SFTModule", "init_args": {
            k: model[k] for k in ("model", "optimizer", "export_dir")}}
        data["class_path"] = "dpo_lightning.data.SFTDataModule"
        data["init_args"].update(train_data=files["sft_train"], val_data=files["sft_val"])
    elif shape == "fsdp" and devices > 1:  # offline DPO, policy and frozen reference sharded
        recipe["trainer"]["strategy"] = {"class_path": "ranks.CPUFSDPStrategy", "init_args": {
            "sharding_strategy": "FULL_SHARD",
            "auto_wrap_policy": ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]}}
    elif shape == "reward":
        recipe["model"] = {"class_path": "dpo_lightning.modules.RewardModule", "init_args": {
            k: model[k] for k in ("model", "optimizer", "export_dir")}}
    return recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """``{(shape, devices): run folder}`` for every shape with 1 and with 2 processes."""
    tmp = tmp_path_factory.mktemp("ddp_shapes")
    sft_rows = [json.loads(line) for line in (ROOT / "data" / "sentiment" / "sft_train.jsonl").open()]
    files = {
        "train": write_jsonl(tmp / "train.jsonl", quickstart_rows(32)),
        "val": write_jsonl(tmp / "val.jsonl", quickstart_rows(16, "val")),
        "sft_train": write_jsonl(tmp / "sft_train.jsonl", sft_rows[:32]),
        "sft_val": write_jsonl(tmp / "sft_val.jsonl", sft_rows[32:48]),
    }
    folders: dict[tuple[str, int], Path] = {}
    for devices in (1, 2):
        paths = []
        for shape in SHAPES:
            folder = tmp / f"{shape}-{devices}"
            recipe = shape_recipe(shape, folder, files, devices)
            recipe["trainer"]["callbacks"] = [{"class_path": "ranks.RankReport", "init_args": {"folder": str(folder)}}]
            paths.append(write_recipe(tmp / f"{shape}-{devices}.yaml", recipe))
            folders[(shape, devices)] = folder
        out = launch_fits(paths, timeout=420)
        assert out.returncode == 0, out.stderr[-4000:]
        (tmp / f"log-{devices}.txt").write_text(out.stdout + out.stderr)
    return folders


def rank_reports(folder: Path, replicated: bool = True) -> list[dict]:
    """Both ranks' :class:`ranks.RankReport` of a 2-process run; with ``replicated`` (not under
    FSDP, where each rank holds its shard) both hold the same trained weights, bit for bit."""
    reports = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in reports)
    assert (reports[0]["policy"] == reports[1]["policy"]) == replicated
    return reports


def assert_same_weights(one: Path, two: Path, reward: bool = False, atol: float = 1e-6) -> None:
    """The 1- and 2-process exports are equal within float32 summation order (``atol``), and
    training moved them away from the initial weights (so the comparison is not of two
    untouched models)."""
    a = load_file(str(one / "export" / "model.safetensors"))
    b = load_file(str(two / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=atol, msg=key)
    spec = tiny_spec()
    initial = (load_reward_model if reward else load_causal_lm)(spec, load_tokenizer(spec)).state_dict()
    moved = max(float((a[k] - initial[k]).abs().max()) for k in a if k in initial)
    assert moved > 1e-4, moved


def assert_same_val(one: Path, two: Path, names: tuple[str, ...]) -> None:
    """The named validation metrics (synced over the ranks by torchmetrics) agree."""
    m1, m2 = last_val_metrics(one), last_val_metrics(two)
    for name in names:
        assert abs(m1[name] - m2[name]) <= 1e-4 * max(1.0, abs(m1[name])), (name, m1[name], m2[name])


PAIR_METRICS = ("val/loss", "val/rewards/chosen", "val/rewards/rejected", "val/rewards/margins", "val/logps/chosen",
                "val/logps/rejected")


def test_kto_kl_estimate_is_averaged_over_both_ranks(runs) -> None:
    # same KL rows (each rank's half), so z_ref over both ranks = z_ref over the whole batch
    assert_same_weights(runs["kto", 1], runs["kto", 2])
    rank_reports(runs["kto", 2])
    (metrics,) = runs["kto", 2].rglob("metrics.csv")
    kl = [float(r["train/kl"]) for r in csv.DictReader(metrics.open()) if r["train/kl"]]
    assert len(kl) == STEPS and sum(k > 0 for k in kl) >= 2, kl  # z_ref above its clamp, so its averaging matters
    # validation batches are split row by row across ranks, so their KL rows (and the loss, which
    # reads z_ref) differ by design; the per-row values do not
    assert_same_val(runs["kto", 1], runs["kto", 2], ("val/rewards/chosen", "val/rewards/rejected", "val/logps/chosen",
                                                     "val/logps/rejected"))


def test_bco_running_shift_folds_in_every_ranks_rows(runs) -> None:
    assert_same_weights(runs["bco", 1], runs["bco", 2])
    one = json.loads((runs["bco", 1] / "rank0.json").read_text())
    ranks = rank_reports(runs["bco", 2])
    assert one["shift_count"] == 8 * STEPS  # rows folded in: both ranks' 4 a step
    for report in ranks:
        assert report["shift_count"] == one["shift_count"]
        assert abs(report["shift_mean"] - one["shift_mean"]) <= 1e-6 * max(1.0, abs(one["shift_mean"]))
    assert ranks[0]["shift_mean"] == ranks[1]["shift_mean"] and one["shift_mean"] != 0.0
    assert_same_val(runs["bco", 1], runs["bco", 2], ("val/loss", "val/rewards/chosen", "val/rewards/rejected",
                                                     "val/reward_shift"))


def test_precomputed_reference_is_written_once_and_read_by_both_ranks(runs) -> None:
    assert_same_weights(runs["precomputed", 1], runs["precomputed", 2])
    assert_same_val(runs["precomputed", 1], runs["precomputed", 2], PAIR_METRICS)
    ranks = rank_reports(runs["precomputed", 2])
    # rank 0 ran the reference over train (32 pairs) and val (16) in batches of 4; rank 1 read its file
    assert [r["batches_computed"] for r in ranks] == [8 + 4, 0]
    files = sorted(p.name for p in (runs["precomputed", 2] / "cache").rglob("*") if p.is_file())
    assert len(files) == 2 and not any(name.startswith(".") for name in files), files  # no temporary left
    single = {p.name: load_file(str(p))["logps"] for p in (runs["precomputed", 1] / "cache").rglob("*.safetensors")}
    for path in (runs["precomputed", 2] / "cache").rglob("*.safetensors"):
        torch.testing.assert_close(load_file(str(path))["logps"], single[path.name], rtol=1e-5, atol=1e-5)


def test_moving_reference_moves_the_same_on_both_ranks(runs) -> None:
    assert_same_weights(runs["tr_dpo", 1], runs["tr_dpo", 2])
    assert_same_val(runs["tr_dpo", 1], runs["tr_dpo", 2], PAIR_METRICS)
    ranks = rank_reports(runs["tr_dpo", 2])
    assert [r["reference_steps"] for r in ranks] == [STEPS, STEPS]
    assert ranks[0]["reference"] == ranks[1]["reference"]


def test_sft_token_weighted_loss_matches(runs) -> None:
    assert_same_weights(runs["sft", 1], runs["sft", 2])
    assert_same_val(runs["sft", 1], runs["sft", 2], ("val/loss", "val/perplexity"))
    rank_reports(runs["sft", 2])


def test_reward_model_matches(runs) -> None:
    # the last step's gradient norm is ~5 (the rewards separate): float32 summation-order
    # differences of ~1e-7 in it reach ~6e-6 in the embedding (values up to 0.17)
    assert_same_weights(runs["reward", 1], runs["reward", 2], reward=True, atol=2e-5)
    assert_same_val(runs["reward", 1], runs["reward", 2], ("val/loss", "val/rewards/chosen", "val/rewards/margins"))
    m1, m2 = last_val_metrics(runs["reward", 1]), last_val_metrics(runs["reward", 2])
    assert round(m1["val/rewards/accuracy"] * 16) == round(m2["val/rewards/accuracy"] * 16)  # a count of 16 pairs
    rank_reports(runs["reward", 2])


def test_fsdp_sharded_dpo_matches_one_process(runs) -> None:
    # full logits under FSDP against the chunked, shared-prompt path in one process: equal in value
    assert_same_weights(runs["fsdp", 1], runs["fsdp", 2])
    a = load_file(str(runs["fsdp", 1] / "export" / "model.safetensors"))
    b = load_file(str(runs["fsdp", 2] / "export" / "model.safetensors"))
    assert "lm_head.weight" not in b and sorted(a) == sorted(b)  # the tied head gathered as one tensor
    assert_same_val(runs["fsdp", 1], runs["fsdp", 2], PAIR_METRICS)
    m1, m2 = last_val_metrics(runs["fsdp", 1]), last_val_metrics(runs["fsdp", 2])
    assert round(m1["val/rewards/accuracy"] * 16) == round(m2["val/rewards/accuracy"] * 16)
    ranks = rank_reports(runs["fsdp", 2], replicated=False)  # each rank's parameters are its shard
    assert [r["fsdp_units"] for r in ranks] == [5, 5]  # the root and each decoder layer of policy and reference
