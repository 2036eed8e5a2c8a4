"""Every part of a run gives its own ``fingerprint()``; a checkpoint stores them merged, exactly as
the attribute-probing code before it did (so older checkpoints still resume); judges fingerprint
their settings; each module names the figures the CLI prints after fit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch

from conftest import quickstart_rows, tiny_spec, write_jsonl
from dpo_lightning.cli import DPOLightningCLI
from dpo_lightning.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from dpo_lightning.fingerprints import (
    CHECKPOINT_KEY, Fingerprinted, check_same_run, loss_fingerprint, run_fingerprint, spec_fingerprint,
    tokenizer_fingerprint,
)
from dpo_lightning.generation import SamplingSpec
from dpo_lightning.iterative import IterativePairsDataModule
from dpo_lightning.judges import FunctionJudge, FunctionPairwiseJudge, RewardModelJudge
from dpo_lightning.losses import DPOLoss, KTOLoss, SimPOLoss
from dpo_lightning.model_card import model_card
from dpo_lightning.models import load_reward_model, load_tokenizer
from dpo_lightning.modules import (
    AlignmentModule, IterativePreferenceModule, OnlinePreferenceModule, PreferenceModule, RewardModule, SFTModule,
)

SENTIMENT = "dpo_lightning.experiments.sentiment:score"
PAIRWISE = "test_fingerprints:prefer_longer"
PROMPTS = [{"prompt": p} for p in (
    "Write a short review of the lamp.", "What do you think of this kettle?", "Review the desk.",
    "Describe your experience with the tent.",
)]
BASE_KEYS = ["model", "tokenizer", "loss"]
OPTIMIZER_KEYS = ["optimizer", "scheduler"]


def prefer_longer(prompt, first, second) -> float:  # a pairwise judge this module's path names
    return 1.0 if len(first) > len(second) else 0.0 if len(first) < len(second) else 0.5


def by_length(prompt, completion) -> float:  # a pointwise judge that rarely ties
    return float(len(completion))


# -- the reference: run_fingerprint as it was before every part gave its own (copied verbatim) ------------
def _old_settings(obj: Any, skip: tuple[str, ...] = ()) -> str:
    values = obj.defaults if hasattr(obj, "defaults") and isinstance(obj.defaults, dict) else vars(obj)
    plain = {
        k: v for k, v in values.items()
        if not k.startswith("_") and k not in skip and isinstance(v, (int, float, str, bool, tuple, type(None)))
    }
    return type(obj).__name__ + json.dumps(plain, sort_keys=True, default=str)


def old_run_fingerprint(module: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    if getattr(module, "model_spec", None) is not None:
        out["model"] = spec_fingerprint(module.model_spec)
    if getattr(module, "tokenizer", None) is not None:
        out["tokenizer"] = tokenizer_fingerprint(module.tokenizer)
    if getattr(module, "loss", None) is not None:
        out["loss"] = repr(module.loss) + json.dumps(
            {k: v for k, v in vars(module.loss).items()
             if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool))},  # mode, not a setting
            sort_keys=True,
        )
    if getattr(module, "judge", None) is not None:
        out["judge"] = _old_settings(module.judge)
    datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    if getattr(datamodule, "data_fingerprint", None):
        out["train_data"] = datamodule.data_fingerprint
    out.update(getattr(module, "optimizer_id", {}) or {})
    return out


# -- helpers --------------------------------------------------------------------------------------------
def adamw(params):
    return torch.optim.AdamW(params, lr=0.01)


def fit_and_save(module: AlignmentModule, datamodule: L.LightningDataModule, path: Path, **trainer_args) -> dict[str, str]:
    """Fit one step on the CPU, save a checkpoint the way Lightning does and return its run record."""
    datamodule.connect(module.tokenizer, module.data_requirements)
    options = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, default_root_dir=str(path.parent))
    trainer = L.Trainer(**{**options, **trainer_args})
    trainer.fit(module, datamodule)
    trainer.save_checkpoint(path)
    # this test's own file; weights_only=False: the Python API's hyperparameters hold a ModelSpec
    return torch.load(path, weights_only=False)[CHECKPOINT_KEY]


def pair_data(tmp_path: Path) -> PreferenceDataModule:
    return PreferenceDataModule(train_data=write_jsonl(tmp_path / "pairs.jsonl", quickstart_rows(8)), max_length=64,
                                batch_size=4)


def online(judge=None, **kwargs) -> OnlinePreferenceModule:
    kwargs.setdefault("optimizer", adamw)
    kwargs.setdefault("sampling", SamplingSpec(max_new_tokens=4))
    return OnlinePreferenceModule(model=tiny_spec(), judge=judge or FunctionJudge(SENTIMENT), **kwargs)


# -- the stored record is what it was ------------------------------------------------------------------
def test_offline_dpo_record_is_the_old_one(tmp_path) -> None:
    L.seed_everything(0)
    module = PreferenceModule(model=tiny_spec(), loss=DPOLoss(beta=0.2), optimizer=adamw)
    datamodule = pair_data(tmp_path)
    saved = fit_and_save(module, datamodule, tmp_path / "dpo.ckpt")
    assert list(saved) == BASE_KEYS + ["train_data"] + OPTIMIZER_KEYS
    assert list(saved.items()) == list(old_run_fingerprint(module).items())  # same keys, order and strings
    assert saved["train_data"] == datamodule.data_fingerprint and '"beta": 0.2' in saved["loss"]


def test_online_record_with_its_judge_is_the_old_one(tmp_path) -> None:
    L.seed_everything(0)
    # 4 samples per prompt: the sentiment judge gives random text's samples equal scores often,
    # and a step without one pair fails the run (sampling is not part of the record)
    module = online(FunctionJudge(SENTIMENT), sampling=SamplingSpec(num_samples=4, max_new_tokens=4))
    datamodule = PromptDataModule(train_data=list(PROMPTS), max_length=64, batch_size=4)
    saved = fit_and_save(module, datamodule, tmp_path / "online.ckpt")
    assert list(saved) == BASE_KEYS + ["judge", "train_data"] + OPTIMIZER_KEYS
    assert list(saved.items()) == list(old_run_fingerprint(module).items())
    assert saved["judge"] == f'FunctionJudge{{"arguments": "completion", "path": "{SENTIMENT}"}}'


def test_sft_record_is_the_old_one(tmp_path) -> None:
    L.seed_everything(0)
    module = SFTModule(model=tiny_spec(), optimizer=adamw)
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in quickstart_rows(8)]
    datamodule = SFTDataModule(train_data=write_jsonl(tmp_path / "sft.jsonl", rows), max_length=64, batch_size=4)
    saved = fit_and_save(module, datamodule, tmp_path / "sft.ckpt")
    assert list(saved) == ["model", "tokenizer", "train_data"] + OPTIMIZER_KEYS  # no loss to name
    assert list(saved.items()) == list(old_run_fingerprint(module).items())


def test_reward_and_iterative_records_are_the_old_ones(tmp_path) -> None:
    L.seed_everything(0)
    reward = RewardModule(model=tiny_spec(), optimizer=adamw)
    saved = fit_and_save(reward, pair_data(tmp_path), tmp_path / "reward.ckpt")
    assert list(saved) == BASE_KEYS + ["train_data"] + OPTIMIZER_KEYS
    assert list(saved.items()) == list(old_run_fingerprint(reward).items())
    iterative = IterativePreferenceModule(model=tiny_spec(), optimizer=adamw)
    rounds = IterativePairsDataModule(train_data=list(PROMPTS), judge=FunctionJudge("test_fingerprints:by_length"),
                                      sampling=SamplingSpec(num_samples=2, max_new_tokens=4), max_length=64, batch_size=4)
    saved = fit_and_save(iterative, rounds, tmp_path / "iterative.ckpt", max_epochs=1, reload_dataloaders_every_n_epochs=1)
    assert list(saved) == BASE_KEYS + ["train_data"] + OPTIMIZER_KEYS  # the judge is in the data's fingerprint
    assert list(saved.items()) == list(old_run_fingerprint(iterative).items())
    assert "by_length" in saved["train_data"] and '"num_samples": 2' in saved["train_data"]


# -- each part's own keys ---------------------------------------------------------------------------------
@pytest.mark.parametrize("build, keys", [
    (lambda: SFTModule(model=tiny_spec()), ["model", "tokenizer"]),
    (lambda: PreferenceModule(model=tiny_spec()), BASE_KEYS),
    (lambda: PreferenceModule(model=tiny_spec(), loss=KTOLoss()), BASE_KEYS),
    (lambda: RewardModule(model=tiny_spec()), BASE_KEYS),
    (lambda: IterativePreferenceModule(model=tiny_spec()), BASE_KEYS),
    (lambda: online(optimizer=None), BASE_KEYS + ["judge"]),
], ids=["sft", "dpo", "kto", "reward", "iterative", "online"])
def test_each_module_fingerprints_its_own_parts(build, keys) -> None:
    module = build()
    assert isinstance(module, Fingerprinted)
    before = module.fingerprint()
    assert list(before) == keys
    assert before["model"] == spec_fingerprint(tiny_spec()) and before["tokenizer"] == tokenizer_fingerprint(module.tokenizer)
    if "loss" in keys:
        assert before["loss"] == loss_fingerprint(module.objective()) and before["loss"].startswith(repr(module.objective()))
    module.configure_optimizers()  # unattached: the optimizer as configured, the default schedule
    after = module.fingerprint()
    assert after["optimizer"].startswith("AdamW{") and '"lr": 1e-06' in after["optimizer"]
    assert after["scheduler"].startswith("WarmupDecayLR{")
    record = module.run_record()  # no trainer: no data module to merge
    assert record == after and list(record) == keys + OPTIMIZER_KEYS


def test_a_data_module_fingerprints_its_train_data_once_set_up(tmp_path) -> None:
    module = PreferenceModule(model=tiny_spec())
    datamodule = pair_data(tmp_path)
    assert isinstance(datamodule, Fingerprinted) and datamodule.fingerprint() == {}  # nothing tokenized yet
    datamodule.connect(module.tokenizer, module.data_requirements)
    datamodule.setup("fit")
    assert datamodule.fingerprint() == {"train_data": datamodule.data_fingerprint}
    longer = PreferenceDataModule(train_data=datamodule.train_data, max_length=96, batch_size=4)
    longer.connect(module.tokenizer, module.data_requirements)
    longer.setup("fit")
    assert longer.fingerprint()["train_data"] != datamodule.data_fingerprint  # tokenization settings count
    merged = run_fingerprint(module, datamodule)
    assert list(merged) == BASE_KEYS + ["train_data"] and merged["train_data"] == datamodule.data_fingerprint


def test_merging_parts_that_disagree_is_an_error() -> None:
    class Part:
        def __init__(self, value: str) -> None:
            self.value = value

        def fingerprint(self) -> dict[str, str]:
            return {"train_data": self.value}

    assert run_fingerprint(Part("a"), Part("a")) == {"train_data": "a"}
    with pytest.raises(ValueError, match=r"two parts give 'train_data': 'a' and, from Part, 'b'"):
        run_fingerprint(Part("a"), Part("b"))
    # a key outside the library's own is ordered last and named in a refused resume
    assert list(run_fingerprint(Part("x"), SimpleNamespace(fingerprint=lambda: {"mine": "1", "model": "m"}))) == [
        "model", "train_data", "mine"]
    with pytest.raises(ValueError, match=r"mine: .*\(resume with the same mine\)"):
        check_same_run({"mine": "1"}, {"mine": "2"})


# -- judges -------------------------------------------------------------------------------------------------
def test_a_judges_fingerprint_follows_its_settings(tmp_path) -> None:
    judge = FunctionJudge(SENTIMENT)
    assert judge.fingerprint() == {"judge": f'FunctionJudge{{"arguments": "completion", "path": "{SENTIMENT}"}}'}
    assert FunctionJudge(SENTIMENT).fingerprint() == judge.fingerprint()  # a function is not part of it
    other_arguments = FunctionJudge(SENTIMENT, arguments="prompt_completion")
    other_path = FunctionJudge("test_fingerprints:by_length")
    assert len({str(j.fingerprint()) for j in (judge, other_arguments, other_path)}) == 3
    with pytest.raises(ValueError, match=r"judge: checkpoint -> now: arguments 'completion' -> 'prompt_completion' "
                                         r"\(resume with the same model.init_args.judge\)"):
        check_same_run(online(judge).run_record(), online(other_arguments).run_record())
    pairwise = FunctionPairwiseJudge(PAIRWISE)
    assert pairwise.fingerprint() == {"judge": f'FunctionPairwiseJudge{{"path": "{PAIRWISE}"}}'}
    spec = tiny_spec(seed=3)
    tokenizer = load_tokenizer(spec)
    load_reward_model(spec, tokenizer).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    small, large = (RewardModelJudge(str(tmp_path / "rm"), batch_size=n).fingerprint()["judge"] for n in (2, 8))
    assert small == f'RewardModelJudge{{"batch_size": 2, "name_or_path": "{tmp_path / "rm"}"}}'
    assert large.replace('"batch_size": 8', '"batch_size": 2') == small


# -- the summary printed after fit --------------------------------------------------------------------------
def print_summary(module: AlignmentModule, before: dict[str, float], after: dict[str, float], capsys) -> list[str]:
    """Run the CLI's ``after_fit`` on ``module`` with a validation before step 1 (covering the whole
    validation set) and one after step 2; the printed lines."""
    module.validation_history = [{"step": 0, "sanity_check": True, **before}, {"step": 2, "sanity_check": False, **after}]
    trainer = SimpleNamespace(global_step=2, global_rank=0, num_sanity_val_steps=3, num_val_batches=[3])
    DPOLightningCLI.after_fit(SimpleNamespace(model=module, trainer=trainer, datamodule=None))
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("build, expected", [
    (lambda: SFTModule(model=tiny_spec()), {"loss": "val/loss"}),
    (lambda: PreferenceModule(model=tiny_spec()), {"rewards/accuracy": "val/rewards/accuracy"}),
    (lambda: PreferenceModule(model=tiny_spec(), loss=SimPOLoss()), {"rewards/accuracy": "val/rewards/accuracy"}),
    (lambda: PreferenceModule(model=tiny_spec(), loss=KTOLoss()),
     {"rewards/chosen": "val/rewards/chosen (desirable rows)", "rewards/rejected": "val/rewards/rejected (undesirable rows)"}),
    (lambda: RewardModule(model=tiny_spec()), {"rewards/accuracy": "val/rewards/accuracy"}),
    (lambda: IterativePreferenceModule(model=tiny_spec()), {"rewards/accuracy": "val/rewards/accuracy"}),
    (lambda: online(), {"score": "val/score", "kl": "val/kl"}),
], ids=["sft", "dpo", "simpo", "kto", "reward", "iterative", "online"])
def test_each_module_names_its_summary_figures(build, expected, capsys) -> None:
    module = build()
    assert module.summary_metrics() == expected
    before = {key: 0.0 for key in expected} | {"loss": 0.6931}
    after = {key: 0.25 * (i + 1) for i, key in enumerate(expected)} | {"loss": 0.5}
    lines = print_summary(module, before, after, capsys)
    assert lines == [f"{label}: {before[key]:.2f} -> {after[key]:.2f}" for key, label in expected.items()]


def test_the_summary_leaves_out_what_validation_did_not_measure(capsys) -> None:
    """A pairwise judge gives no per-sample score: the online summary is the KL alone."""
    module = online(FunctionPairwiseJudge(PAIRWISE))
    assert print_summary(module, {"kl": 0.0, "completion_length": 4.0}, {"kl": 0.25, "completion_length": 3.0},
                         capsys) == ["val/kl: 0.00 -> 0.25"]


def test_the_model_card_reads_the_recorded_recipe_and_the_objective() -> None:
    module = SFTModule(model=tiny_spec())
    module.record_recipe("seed_everything: 0\n")
    card = model_card(module, module.tokenized_data(), module.recipe)
    assert card.endswith("## Recipe\n\n```yaml\nseed_everything: 0\n```\n")
    assert "**Objective:**" not in card and "**Data:**" not in card  # SFT names no loss; no trainer, no data
    dpo = model_card(PreferenceModule(model=tiny_spec(), loss=DPOLoss(beta=0.2)))
    assert '* **Objective:** `DPOLoss` {"beta": 0.2, "label_smoothing": 0.0' in dpo and "## Recipe" not in dpo
