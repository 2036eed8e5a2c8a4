"""``share_prompt``: the shared-prompt layout equals the plain one for every listed architecture;
``auto`` (the default) decides per model and batch; ``true`` is refused where it would change values."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIG, TOKENIZER_DIR, rows, tiny_recipe, tiny_spec, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.data import PairCollator
from dpo_lightning.models import ModelSpec, load_causal_lm
from dpo_lightning.modules import model_logprobs
from dpo_lightning.modules.logprobs import SHARED_PROMPT_MODEL_TYPES, shared_prompt_is_exact, shared_prompt_model_logprobs


def tiny_model(tokenizer, model_type: str = "llama", **config):
    spec = ModelSpec(config={**TINY_CONFIG, "model_type": model_type, **config}, tokenizer=TOKENIZER_DIR, seed=4,
                     attn_implementation="sdpa")
    return load_causal_lm(spec, tokenizer)


@pytest.mark.parametrize("model_type", sorted(SHARED_PROMPT_MODEL_TYPES))
def test_every_listed_architecture_gives_the_plain_layout_in_the_shared_one(tokenizer, model_type: str) -> None:
    model = tiny_model(tokenizer, model_type).double()
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    assert shared_prompt_is_exact(model, batch["input_ids"].shape[1])
    plain = model_logprobs(model, batch)
    grads_plain = torch.autograd.grad(plain.sums.sum(), list(model.parameters()), allow_unused=True)
    shared = shared_prompt_model_logprobs(model, batch, chunk_size=5)
    grads_shared = torch.autograd.grad(shared.sums.sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(shared.sums, plain.sums, rtol=0, atol=1e-10)
    assert torch.equal(shared.counts, plain.counts)
    for (name, _), a, b in zip(model.named_parameters(), grads_shared, grads_plain):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # float32 norms: see test_chunked_logprobs


def test_gpt2_is_not_listed_because_the_shared_layout_changes_its_values(tokenizer) -> None:
    model = tiny_model(tokenizer, "gpt2").double()
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    assert not shared_prompt_is_exact(model, batch["input_ids"].shape[1])
    assert not torch.allclose(shared_prompt_model_logprobs(model, batch).sums, model_logprobs(model, batch).sums)


def test_share_prompt_auto_decides_per_model_and_batch(tokenizer) -> None:
    from dpo_lightning.losses import DPOLoss, KTOLoss
    from dpo_lightning.modules import PreferenceModule

    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    width = batch["input_ids"].shape[1]
    module = PreferenceModule(model=tiny_spec(), loss=DPOLoss())
    selector = module.logprob_selector
    assert selector.share_prompt == "auto" and selector.pairs
    assert selector.shares_prompt(module.policy, batch)
    assert not selector.shares_prompt(module.policy, {"input_ids": batch["input_ids"].to("meta")})  # CPU only
    assert not PreferenceModule(model=tiny_spec(), loss=KTOLoss()).logprob_selector.shares_prompt(module.policy, batch)
    assert not PreferenceModule(model=tiny_spec(), share_prompt=False).logprob_selector.shares_prompt(module.policy, batch)
    assert not PreferenceModule(model=tiny_spec(), logprobs="full").logprob_selector.chunked(module.policy)
    assert not selector.shares_prompt(tiny_model(tokenizer, "gpt2"), batch)
    # a sliding window shorter than the batch: the shared layout's mask has none, so not shared
    assert not selector.shares_prompt(tiny_model(tokenizer, "mistral", sliding_window=width - 1), batch)
    assert selector.shares_prompt(tiny_model(tokenizer, "mistral", sliding_window=width), batch)
    assert not selector.shares_prompt(tiny_model(tokenizer, "qwen2", use_sliding_window=True, sliding_window=4,
                                                 max_window_layers=0), batch)
    eager = tiny_model(tokenizer)
    eager.config._attn_implementation = "flash_attention_2"
    assert not selector.shares_prompt(eager, batch)
    # where auto declines, the values are the plain layout's
    windowed = tiny_model(tokenizer, "mistral", sliding_window=3).double()
    torch.testing.assert_close(selector(windowed, batch).sums, model_logprobs(windowed, batch).sums, rtol=0, atol=1e-10)


def test_training_with_share_prompt_auto_equals_the_plain_layout(tmp_path, pair_files, monkeypatch) -> None:
    from dpo_lightning.modules import logprobs

    shared_calls = []
    original = logprobs.shared_prompt_model_logprobs
    monkeypatch.setattr(logprobs, "shared_prompt_model_logprobs", lambda *a, **k: shared_calls.append(1) or original(*a, **k))

    def fit(name: str, **model_args):
        r = tiny_recipe(tmp_path / name, *pair_files, optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
                        **model_args)
        r["trainer"].update(max_steps=3, limit_val_batches=0)
        r["data"]["init_args"].update(data_args)
        return run(["fit", "--config", write_recipe(tmp_path / f"{name}.yaml", r)])

    # length grouping orders batches by the width each layout runs at (tested below), so the
    # values are compared on the same uniformly shuffled order
    data_args = {"group_by_length": False}
    auto = fit("auto", share_prompt="auto")  # the default, spelled out in YAML
    assert len(shared_calls) == 6  # 3 steps x (policy + reference)
    plain = fit("plain", share_prompt=False)
    assert len(shared_calls) == 6
    assert auto.model.logprob_selector.share_prompt == "auto" and plain.model.logprob_selector.share_prompt is False
    for a, b in zip(auto.model.policy.parameters(), plain.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # the recipe as shipped (length-grouped): the CPU run groups pairs by prompt + both completions
    data_args = {}
    grouped = fit("grouped")
    rows = grouped.datamodule.train_dataset
    both = [len(p) + len(c) + len(r) for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])]
    assert grouped.datamodule.train_sampler().lengths.tolist() == both


def test_share_prompt_true_is_refused_where_it_would_change_the_values(tokenizer) -> None:
    from dpo_lightning.modules import LogProbSelector

    with pytest.raises(ValueError, match=r"share_prompt needs an architecture whose values it is tested to keep .*'gpt2' is not one"):
        LogProbSelector(share_prompt=True).check(tiny_model(tokenizer, "gpt2"), pairwise=True)
    LogProbSelector(share_prompt=True).check(tiny_model(tokenizer, "llama"), pairwise=True)  # listed: accepted


@pytest.mark.parametrize(
    ("options", "expected"),
    [({}, "shared_on_cpu"), ({"share_prompt": True}, "shared"), ({"share_prompt": False}, "separate"),
     ({"logprobs": "full"}, "separate")],
)
def test_the_module_tells_the_data_module_how_pairs_will_run(options: dict, expected: str) -> None:
    from dpo_lightning.contract import DataRequirements, PairRows
    from dpo_lightning.losses import DPOLoss, KTOLoss
    from dpo_lightning.modules import PreferenceModule

    requirements = PreferenceModule(model=tiny_spec(), loss=DPOLoss(), **options).data_requirements
    assert requirements.pair_rows is PairRows(expected)
    assert requirements == DataRequirements()  # it orders batches; it does not change what is tokenized
    assert PreferenceModule(model=tiny_spec(), loss=KTOLoss()).data_requirements.pair_rows is PairRows.SEPARATE
    gpt2 = ModelSpec(config={**TINY_CONFIG, "model_type": "gpt2"}, tokenizer=TOKENIZER_DIR)
    assert PreferenceModule(model=gpt2, loss=DPOLoss()).data_requirements.pair_rows is PairRows.SEPARATE


def test_length_grouping_uses_the_width_a_pair_runs_at(tmp_path, pair_files) -> None:
    """With the shared layout a pair is one row of prompt + chosen + rejected tokens; grouping by
    prompt + longest completion (the plain layout's width) would leave ~13% of the shared rows'
    positions padding on the benchmark's data. ``SHARED_ON_CPU`` groups by the sum under a CPU
    trainer and by the longest completion without one."""
    import lightning as L

    from dpo_lightning.contract import DataRequirements, PairRows
    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.models import load_tokenizer

    train, val = pair_files
    data = PreferenceDataModule(train_data=train, val_data=val, batch_size=4, max_length=128)
    tokenizer = load_tokenizer(tiny_spec())
    data.connect(tokenizer, DataRequirements())
    data.setup("fit")
    rows = data.train_dataset
    prompt = [len(x) for x in rows["prompt_ids"]]
    chosen, rejected = [len(x) for x in rows["chosen_ids"]], [len(x) for x in rows["rejected_ids"]]
    longest = [p + max(c, r) for p, c, r in zip(prompt, chosen, rejected)]
    both = [p + c + r for p, c, r in zip(prompt, chosen, rejected)]
    assert longest != both
    assert data.row_lengths(rows) == longest

    data.connect(tokenizer, DataRequirements(pair_rows=PairRows.SHARED))
    assert data.splits  # not re-tokenized: only the order of batches depends on it
    assert data.row_lengths(rows) == both
    assert data.train_sampler().lengths.tolist() == both

    data.connect(tokenizer, DataRequirements(pair_rows=PairRows.SHARED_ON_CPU))
    assert data.row_lengths(rows) == longest  # no trainer: the device is unknown
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    data.trainer = trainer
    assert data.row_lengths(rows) == both
