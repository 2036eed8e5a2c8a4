"""LogCompletions: completions of a few prompts after validations, written as jsonl under the
log dir and logged to the loggers that hold tables (TensorBoard text, W&B tables)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import MagicMock

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from conftest import tiny_spec
from dpo_lightning.callbacks import LogCompletions, markdown_table
from dpo_lightning.data import PreferenceDataModule, SFTDataModule
from dpo_lightning.generation import SamplingSpec
from dpo_lightning.judges import FunctionJudge, FunctionPairwiseJudge
from dpo_lightning.modules import OnlinePreferenceModule, PreferenceModule, RewardModule, SFTModule

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Review the desk."}]
PROMPTS = ["Write a short review of the lamp.", CHAT, "What do you think of this kettle?", "Review the tent."]


def by_length(prompt, completion) -> float:
    return float(len(completion)) + (0.5 if isinstance(prompt, list) else 0.0)


def judge() -> FunctionJudge:
    return FunctionJudge("test_callbacks:by_length")


def trainer(tmp_path: Path, callback: LogCompletions, logger, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_steps=2, val_check_interval=2, limit_val_batches=1,
                   num_sanity_val_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[callback], logger=logger)
    return L.Trainer(**{**options, **kwargs})


def pair_data(module, pair_files, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(train_data=pair_files[0], val_data=pair_files[1], max_length=64, batch_size=4, **kwargs)
    dm.connect(module.tokenizer, module.data_requirements)
    return dm


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_csv_logger_gets_jsonl_tables_scored_by_the_judge(tmp_path, pair_files) -> None:
    L.seed_everything(0)
    module = PreferenceModule(model=tiny_spec(), optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
    callback = LogCompletions(prompts=PROMPTS, num_prompts=3, max_new_tokens=6, judge=judge(), batch_size=2)
    fit = trainer(tmp_path, callback, CSVLogger(str(tmp_path / "logs")))
    fit.fit(module, pair_data(module, pair_files))
    folder = Path(fit.log_dir) / "completions"
    assert folder.parent == Path(fit.loggers[0].log_dir)
    assert sorted(p.name for p in folder.iterdir()) == ["step_0.jsonl", "step_2.jsonl"]  # sanity check, then step 2
    rows = read_jsonl(folder / "step_2.jsonl")
    assert len(rows) == 3 and [r["prompt"] for r in rows] == PROMPTS[:3] and all(r["step"] == 2 for r in rows)
    assert [r["score"] for r in rows] == pytest.approx(judge().score(PROMPTS[:3], [r["completion"] for r in rows]).tolist())
    # greedy: what generate(do_sample=False) gives from the trained policy, prompt by prompt; the
    # conversation went through the chat template with the generation prompt
    tokenizer = module.tokenizer
    chat_ids = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
    assert callback.prompt_ids[1] == chat_ids
    module.eval()
    for ids, row in zip(callback.prompt_ids, rows):
        with torch.no_grad():
            out = module.policy.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=6,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert row["completion"] == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert callback.state_dict() == {"validations": 2}


def test_tensorboard_gets_a_markdown_table(tmp_path, pair_files, monkeypatch) -> None:
    import lightning.fabric.loggers.tensorboard as fabric_tensorboard

    monkeypatch.setattr(fabric_tensorboard, "_TENSORBOARD_AVAILABLE", True)  # the writer is mocked below

    class MockedTensorBoard(TensorBoardLogger):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.writer = MagicMock()

        @property
        def experiment(self):
            return self.writer

        def log_hyperparams(self, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            pass

    module = PreferenceModule(model=tiny_spec())
    logger = MockedTensorBoard(str(tmp_path / "tb"))
    callback = LogCompletions(prompts=PROMPTS, num_prompts=2, max_new_tokens=4, judge=judge(), key="samples")
    trainer(tmp_path, callback, logger).validate(module, pair_data(module, pair_files), verbose=False)
    (call,) = logger.writer.add_text.call_args_list
    tag, text = call.args
    assert tag == "samples" and call.kwargs == {"global_step": 0}
    lines = text.splitlines()
    assert lines[0] == "| prompt | completion | score |" and len(lines) == 2 + 2
    assert lines[3].startswith("| system: Be brief.<br>user: Review the desk. |")  # a conversation, one cell
    rows = read_jsonl(Path(logger.log_dir) / "completions" / "step_0.jsonl")  # and the jsonl, always
    assert text == markdown_table(rows)


def test_wandb_gets_a_table(tmp_path) -> None:
    callback = LogCompletions(prompts=["a", "b"], num_prompts=2)
    logger = MagicMock(spec=WandbLogger)
    rows = [{"prompt": "a", "completion": "x|y", "score": 1.0}, {"prompt": CHAT, "completion": "z", "score": None}]
    fake_trainer = MagicMock(loggers=[logger])
    callback.publish(fake_trainer, rows, step=7)
    logger.log_table.assert_called_once_with(
        key="completions", columns=["prompt", "completion", "score"],
        data=[["a", "x|y", 1.0], ["system: Be brief.\nuser: Review the desk.", "z", None]], step=7,
    )
    assert "x\\|y" in markdown_table(rows)


def test_sft_and_online_modules_generate_and_every_n_val_counts(tmp_path) -> None:
    sft = SFTModule(model=tiny_spec())
    online = OnlinePreferenceModule(model=tiny_spec(), judge=judge(), sampling=SamplingSpec(max_new_tokens=4))
    for module in (sft, online):
        callback = LogCompletions(prompts=PROMPTS, num_prompts=2, max_new_tokens=4, do_sample=True, seed=3)
        callback.setup(MagicMock(), module, "fit")
        first, again = callback.completions(module), callback.completions(module)
        assert len(first) == 2 and first == again and all(r["score"] is None for r in first)  # fixed seed
    callback = LogCompletions(prompts=PROMPTS, num_prompts=1, max_new_tokens=2, every_n_val=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert LogCompletions(prompts=str(prompts), num_prompts=3).prompts == PROMPTS[:3]
    sft_data = SFTDataModule(train_data=[{"prompt": "Review the lamp.", "completion": " Fine."}] * 4,
                             val_data=[{"prompt": "Review the lamp.", "completion": " Fine."}] * 4, max_length=32, batch_size=2)
    sft_data.connect(sft.tokenizer, sft.data_requirements)
    fit = trainer(tmp_path, callback, False)
    for _ in range(3):
        fit.validate(sft, sft_data, verbose=False)
    assert sorted(p.name for p in (tmp_path / "completions").iterdir()) == ["step_0.jsonl"]  # no logger: default_root_dir
    assert callback.validations == 3 and callback.last_path == tmp_path / "completions" / "step_0.jsonl"


def test_refused_for_reward_modules_and_pairwise_judges(tmp_path, pair_files) -> None:
    module = RewardModule(model=tiny_spec())
    callback = LogCompletions(prompts=PROMPTS, num_prompts=1)
    with pytest.raises(TypeError, match="RewardModule trains .*does not generate"):
        trainer(tmp_path, callback, False).validate(module, pair_data(module, pair_files), verbose=False)
    with pytest.raises(TypeError, match="compares two completions"):
        LogCompletions(prompts=PROMPTS, judge=FunctionPairwiseJudge("test_online:prefer_longer"))
    with pytest.raises(ValueError, match="num_prompts must be an int >= 1"):
        LogCompletions(prompts=PROMPTS, num_prompts=0)
    with pytest.raises(ValueError, match=r"prompts: prompt 1 is neither"):
        LogCompletions(prompts=["ok", {"text": "no"}])
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        LogCompletions(prompts=PROMPTS, max_new_tokens=200).setup(MagicMock(), PreferenceModule(model=tiny_spec()), "fit")


# -- ExportSnapshots ----------------------------------------------------------------------------
def test_snapshots_through_the_cli_are_the_policy_at_each_step(tmp_path, pair_files) -> None:
    from safetensors.torch import load_file

    from conftest import tiny_recipe, write_recipe
    from dpo_lightning.cli import run

    recipe = tiny_recipe(tmp_path, *pair_files)
    recipe["trainer"].update(max_steps=4, accumulate_grad_batches=2, callbacks=[
        {"class_path": "dpo_lightning.callbacks.ExportSnapshots",
         "init_args": {"dirpath": str(tmp_path / "snapshots"), "every_n_steps": 2}}])
    run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    folders = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert folders == ["step-000002", "step-000004"]  # once each, though 2 micro-batches make a step
    final = load_file(str(tmp_path / "export" / "model.safetensors"))
    last = load_file(str(tmp_path / "snapshots" / "step-000004" / "model.safetensors"))
    middle = load_file(str(tmp_path / "snapshots" / "step-000002" / "model.safetensors"))
    assert final.keys() == last.keys() == middle.keys()
    assert all(torch.equal(final[k], last[k]) for k in final)  # the last snapshot is the final policy
    assert any(not torch.equal(final[k], middle[k]) for k in final)  # two more steps moved it
    assert (tmp_path / "snapshots" / "step-000002" / "reference.json").exists()  # evaluate/validate find the reference


def test_snapshot_interval_must_be_a_positive_integer() -> None:
    from dpo_lightning.callbacks import ExportSnapshots

    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="ExportSnapshots every_n_steps must be an integer >= 1"):
            ExportSnapshots(dirpath="x", every_n_steps=bad)
