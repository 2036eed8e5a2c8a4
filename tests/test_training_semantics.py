"""Training semantics: dropout whatever the model's source, exact validation means, KTO's KL
rows, the learning-rate schedule, cache keys that cover the code."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
import transformers

from conftest import TOKENIZER_DIR, quickstart_rows, rows, tiny_recipe, tiny_spec, write_jsonl, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.data import PairCollator, PreferenceDataModule, UnpairedCollator, UnpairedDataModule
from dpo_lightning.losses import DPOLoss
from dpo_lightning.models import ModelSpec, load_causal_lm, load_tokenizer
from dpo_lightning.modules import PreferenceModule, ReferenceSpec
from dpo_lightning.optim import WarmupDecayLR


def dropout_spec(tmp_path, source: str) -> ModelSpec:
    """A tiny Llama with attention dropout 0.5, built from a config or loaded from a folder."""
    spec = tiny_spec()
    spec.config["attention_dropout"] = 0.5
    if source == "config":
        return spec
    tokenizer = load_tokenizer(spec)
    load_causal_lm(spec, tokenizer).save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    return ModelSpec(name_or_path=str(tmp_path / "saved"))


@pytest.mark.parametrize("source", ["config", "path"])
def test_dropout_is_the_same_for_every_model_source(tmp_path, source) -> None:
    batch = PairCollator(pad_token_id=0)(rows())
    on = PreferenceModule(model=dropout_spec(tmp_path, source), disable_dropout=False)
    off = PreferenceModule(model=dropout_spec(tmp_path, source))  # default: disabled
    assert on.policy.training and off.policy.training  # both train, loaded or built
    with torch.no_grad():
        a, b = on.logprobs(on.policy, batch).sums, on.logprobs(on.policy, batch).sums
        assert not torch.equal(a, b)  # dropout on: two passes differ
        a, b = off.logprobs(off.policy, batch).sums, off.logprobs(off.policy, batch).sums
        assert torch.equal(a, b)
        reference = off.reference.logprobs(off.policy, batch, off.logprobs).sums
    torch.testing.assert_close(a, reference, rtol=0, atol=1e-5)  # step 0: policy == reference


def validate(pair_file: str, eval_batch_size: int) -> dict[str, float]:
    """Validation metrics of a policy against another model as reference (rewards differ by pair)."""
    module = PreferenceModule(model=tiny_spec(seed=4), reference=ReferenceSpec(model=tiny_spec(seed=5)), loss=DPOLoss(beta=0.5))
    data = PreferenceDataModule(train_data=pair_file, val_data=pair_file, max_length=64, eval_batch_size=eval_batch_size)
    data.connect(module.tokenizer, module.data_requirements)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, data, verbose=False)
    return metrics


def test_validation_metrics_are_exact_per_row_means_whatever_the_batch_size(tmp_path) -> None:
    path = write_jsonl(tmp_path / "v.jsonl", quickstart_rows(13))
    per_pair = validate(path, 1)
    # the per-pair mean of the DPO formula, in float64
    module = PreferenceModule(model=tiny_spec(seed=4), reference=ReferenceSpec(model=tiny_spec(seed=5)), loss=DPOLoss(beta=0.5))
    data = PreferenceDataModule(train_data=path, max_length=64, eval_batch_size=13)
    data.connect(module.tokenizer, module.data_requirements)
    data.setup("fit")
    batch = next(iter(data.ordered_loader("train")))
    with torch.no_grad():
        pi, ref = module.logprobs(module.policy, batch), module.reference.logprobs(module.policy, batch, module.logprobs)
    d = (pi.chosen.double() - ref.chosen.double()) - (pi.rejected.double() - ref.rejected.double())
    expected = -torch.nn.functional.logsigmoid(0.5 * d)
    assert expected.std() > 0.01  # the pairs' losses differ, so the weighting matters
    assert per_pair["val/loss"] == pytest.approx(float(expected.mean()), abs=1e-5)
    for size in (5, 13):  # 5: a short last batch of 3
        other = validate(path, size)
        for name in ("val/loss", "val/rewards/accuracy", "val/rewards/margins", "val/logps/chosen"):
            assert other[name] == pytest.approx(per_pair[name], rel=1e-5, abs=1e-6), name


def test_kto_kl_rows_never_use_their_own_prompt(tmp_path) -> None:
    pairs = write_jsonl(tmp_path / "p.jsonl", quickstart_rows(6))
    dm = UnpairedDataModule(train_data=pairs, val_data=pairs, tokenizer=TOKENIZER_DIR, batch_size=4, eval_batch_size=4)
    dm.setup("fit")
    for batch in dm.ordered_loader("val"):  # rows 2k, 2k+1 share pair k's prompt
        n = batch["label"].numel()
        ids = batch["input_ids"]
        prompts = [tuple(ids[i][~batch["completion_mask"][i].bool() & batch["attention_mask"][i].bool()].tolist()) for i in range(2 * n)]
        for i in range(n):
            kl_completion = ids[n + i][batch["completion_mask"][n + i].bool()].tolist()
            own = [ids[j][batch["completion_mask"][j].bool()].tolist() for j in range(n) if prompts[j] == prompts[i]]
            assert all(kl_completion != c[: len(kl_completion)] or len(kl_completion) == 0 for c in own)
    same = [{"prompt_ids": [1, 5], "completion_ids": [6, 2], "label": True, "row_id": i} for i in range(3)]
    with pytest.raises(ValueError, match="same prompt"):
        UnpairedCollator(0, 16)(same)


@pytest.mark.parametrize("decay, reference", [
    ("linear", transformers.get_linear_schedule_with_warmup),
    ("cosine", transformers.get_cosine_schedule_with_warmup),
])
def test_schedule_equals_transformers(decay, reference) -> None:
    def lrs(make) -> list[float]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
        scheduler = make(opt)
        out = []
        for _ in range(20):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        return out

    ours = lrs(lambda o: WarmupDecayLR(o, total_steps=20, warmup=0.2, decay=decay))
    theirs = lrs(lambda o: reference(o, num_warmup_steps=4, num_training_steps=20))
    assert ours[0] == 0.0
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_learning_rate_is_logged_every_step(tmp_path, pair_files) -> None:
    recipe = tiny_recipe(tmp_path, *pair_files)
    recipe["trainer"].update(max_steps=4, log_every_n_steps=1,
                             logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}})
    run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    (metrics,) = list((tmp_path / "logs").rglob("metrics.csv"))
    lrs = [float(r["train/lr"]) for r in csv.DictReader(metrics.open()) if r.get("train/lr")]
    # 10% warmup of 4 steps rounds to 0 steps: linear decay from 0.01 over 4 steps
    assert lrs == pytest.approx([0.01, 0.0075, 0.005, 0.0025])


def test_tokenization_and_reference_caches_are_keyed_by_their_code(tmp_path, monkeypatch) -> None:
    import datasets

    from dpo_lightning.data import tokenization
    from dpo_lightning.modules import reference_cache

    path = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(8))

    def cache_files() -> list[str]:
        dm = PreferenceDataModule(train_data=path, tokenizer=TOKENIZER_DIR)
        dm.setup("fit")
        return [f["filename"] for f in dm.train_dataset.cache_files], dm.train_dataset

    first, dataset = cache_files()
    assert cache_files()[0] == first  # same code: the cache is read
    before = reference_cache.cache_path(str(tmp_path), dataset, "ref", "tok")
    monkeypatch.setattr(tokenization, "ENCODING_CODE_VERSION", "changed")
    assert cache_files()[0] != first  # changed tokenization code: tokenized anew
    monkeypatch.setattr(reference_cache, "LOGPROB_CODE_VERSION", "changed")
    assert reference_cache.cache_path(str(tmp_path), dataset, "ref", "tok") != before
    assert isinstance(dataset, datasets.Dataset)


def test_validate_then_fit_on_the_same_module(tmp_path) -> None:
    """A notebook's order: measure the start with trainer.validate, then train. The validation
    metrics reset under validate's inference mode must still accept fit's updates, and fit's
    validation starts from zero (its figures are those of a fresh module)."""
    path = write_jsonl(tmp_path / "v.jsonl", quickstart_rows(8))

    def fresh() -> tuple[PreferenceModule, PreferenceDataModule]:
        module = PreferenceModule(model=tiny_spec(seed=4), loss=DPOLoss(beta=0.5))
        data = PreferenceDataModule(train_data=path, val_data=path, max_length=64, batch_size=4, eval_batch_size=4)
        data.connect(module.tokenizer, module.data_requirements)
        return module, data

    def trainer() -> L.Trainer:
        return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, max_steps=2, num_sanity_val_steps=0, default_root_dir=tmp_path)

    module, data = fresh()
    (before,) = trainer().validate(module, data, verbose=False)
    assert before["val/rewards/accuracy"] == 0.0  # policy == reference: every pair a tie
    fitted = trainer()
    fitted.fit(module, data)
    alone_module, alone_data = fresh()
    alone = trainer()
    alone.fit(alone_module, alone_data)
    assert fitted.callback_metrics["val/loss"].item() == pytest.approx(alone.callback_metrics["val/loss"].item(), abs=1e-6)
