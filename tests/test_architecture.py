"""The seams: the model -> data contract, reference strategies (the moving one resumed after a
kill), one log-prob selector with optional per-token values."""

from __future__ import annotations

import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import load_file

from conftest import TOKENIZER_DIR, cli, resume_recipe, rows, tiny_recipe, tiny_spec, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.contract import BatchLayout, DataRequirements
from dpo_lightning.data import PairCollator, PreferenceDataModule, SFTDataModule, UnpairedDataModule
from dpo_lightning.losses import DPOLoss, KTOLoss, LossOutput, ODPOLoss, PreferenceLoss, SimPOLoss
from dpo_lightning.models import load_causal_lm, load_tokenizer
from dpo_lightning.modules import (
    FrozenCopy,
    LogProbSelector,
    MovingReference,
    NoReference,
    PreferenceModule,
    ReferenceSpec,
    ReferenceUpdate,
    SFTModule,
)
from dpo_lightning.modules.logprobs import chunked_model_logprobs, model_logprobs, shared_prompt_model_logprobs


# -- the contract ------------------------------------------------------------------------------
def test_requirements_come_from_the_loss() -> None:
    assert DPOLoss().data_requirements == DataRequirements(BatchLayout.PAIRS, ())
    assert ODPOLoss().data_requirements == DataRequirements(BatchLayout.PAIRS, ("score_chosen", "score_rejected"))
    assert KTOLoss().data_requirements.layout is BatchLayout.UNPAIRED_WITH_KL
    assert SFTModule(model=tiny_spec()).data_requirements == DataRequirements(BatchLayout.COMPLETIONS)


def test_connect_refuses_another_layout_and_names_the_class() -> None:
    tokenizer = load_tokenizer(tiny_spec())
    dm = PreferenceDataModule(train_data="x.jsonl")
    with pytest.raises(ValueError, match=r"'unpaired_with_kl'.*data.class_path: dpo_lightning.data.UnpairedDataModule"):
        dm.connect(tokenizer, KTOLoss().data_requirements)
    with pytest.raises(ValueError, match=r"dpo_lightning.data.SFTDataModule"):
        UnpairedDataModule(train_data="x.jsonl").connect(tokenizer, DataRequirements(BatchLayout.COMPLETIONS))
    with pytest.raises(ValueError, match=r"dpo_lightning.data.PreferenceDataModule"):
        SFTDataModule(train_data="x.jsonl").connect(tokenizer, DataRequirements(BatchLayout.PAIRS))


def test_python_api_fit_with_one_connect_call(tmp_path, pair_files) -> None:
    """The Python API's whole run: module, data module, one connect call, Trainer."""
    L.seed_everything(0)
    module = PreferenceModule(model=tiny_spec(), loss=DPOLoss(beta=0.1),
                              optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
    data = PreferenceDataModule(train_data=pair_files[0], val_data=pair_files[1], max_length=64, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    with pytest.raises(ValueError, match=r"call datamodule.connect\(module.tokenizer, module.data_requirements\)"):
        trainer.fit(module, data)
    data.connect(module.tokenizer, module.data_requirements)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.fit(module, data)
    assert trainer.global_step == 2 and data.tokenizer is module.tokenizer
    assert data.reports["train"].rows_kept == 32


def test_add_columns_carries_them_into_batches(tmp_path, pair_files) -> None:
    dm = PreferenceDataModule(train_data=pair_files[0], tokenizer=TOKENIZER_DIR, batch_size=4, eval_batch_size=4)
    dm.setup("fit")
    n = len(dm.train_dataset)
    dm.add_columns("train", {"reference_chosen": [float(i) for i in range(n)], "reference_rejected": [-1.0] * n})
    batch = next(iter(dm.ordered_loader("train")))
    assert batch["reference_chosen"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert batch["reference_rejected"].tolist() == [-1.0] * 4
    with pytest.raises(ValueError, match="has 3 values for the 32 rows"):
        dm.add_columns("train", {"x": [1.0, 2.0, 3.0]})


def test_a_loss_that_still_says_paired_gets_a_clear_error() -> None:
    with pytest.raises(TypeError, match="replaced by `batch_layout`"):
        type("OldLoss", (PreferenceLoss,), {"paired": False, "forward": lambda self, p, r, b: None})


# -- reference strategies -----------------------------------------------------------------------
def test_strategy_is_chosen_from_the_recipe() -> None:
    assert isinstance(PreferenceModule(model=tiny_spec(), loss=SimPOLoss()).reference, NoReference)
    frozen = PreferenceModule(model=tiny_spec()).reference
    assert isinstance(frozen, FrozenCopy) and not frozen.training
    assert all(not p.requires_grad for p in frozen.parameters())
    moving = PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(update=ReferenceUpdate(alpha=0.5, every_n_steps=2))).reference
    assert isinstance(moving, MovingReference)
    with pytest.raises(ValueError, match=r"model.init_args.reference.update is set but the loss uses no reference"):
        PreferenceModule(model=tiny_spec(), loss=SimPOLoss(), reference=ReferenceSpec(update=ReferenceUpdate()))
    with pytest.raises(ValueError, match=r"model.init_args.reference.update.alpha must be in \(0, 1\]"):
        PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(update=ReferenceUpdate(alpha=0.0)))
    with pytest.raises(ValueError, match="cannot be precomputed"):
        PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(update=ReferenceUpdate(), precompute=True))


def test_moving_reference_soft_update_in_float64() -> None:
    policy = load_causal_lm(tiny_spec(seed=1), load_tokenizer(tiny_spec())).double()
    reference = MovingReference(load_causal_lm(tiny_spec(seed=2), load_tokenizer(tiny_spec())).double(), policy,
                                ReferenceUpdate(alpha=0.25, every_n_steps=3))
    before = [p.clone() for p in reference.network.parameters()]
    reference.after_optimizer_step(policy)
    reference.after_optimizer_step(policy)
    for p, b in zip(reference.network.parameters(), before):
        assert torch.equal(p, b)  # steps 1, 2: no update
    reference.after_optimizer_step(policy)  # step 3: ref <- 0.25 * policy + 0.75 * ref
    for p, b, q in zip(reference.network.parameters(), before, policy.parameters()):
        torch.testing.assert_close(p, 0.25 * q + 0.75 * b, rtol=0, atol=1e-15)
    assert int(reference.steps) == 3
    hard = MovingReference(load_causal_lm(tiny_spec(seed=2), load_tokenizer(tiny_spec())).double(), policy,
                           ReferenceUpdate(alpha=1.0, every_n_steps=1))
    hard.after_optimizer_step(policy)
    assert all(torch.equal(p, q) for p, q in zip(hard.network.parameters(), policy.parameters()))


@pytest.mark.slow
def test_moving_reference_is_resumed_after_a_kill_to_the_same_weights(tmp_path, pair_files) -> None:
    """TR-DPO's reference moves every 2 steps; a run killed at step 5 and resumed from the step-3
    checkpoint ends with the uninterrupted run's policy and reference."""
    def recipe(name: str, kill_at: int | None) -> str:
        path = resume_recipe(tmp_path, name, *pair_files, kill_at=kill_at)
        import yaml

        r = yaml.safe_load(open(path))
        r["model"]["init_args"]["reference"] = {"update": {"alpha": 0.5, "every_n_steps": 2}}
        return write_recipe(tmp_path / f"{name}.yaml", r)

    straight = cli("fit", "--config", recipe("straight", None))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = cli("fit", "--config", recipe("killed", 5))
    assert killed.returncode == -signal.SIGKILL
    resumed = cli("fit", "--config", recipe("killed", None), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "straight" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "export" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    ref_a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ref_b = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    moving = [k for k in ref_a if k.startswith("reference.")]
    # last.ckpt is the step-9 checkpoint (every 3 steps; max_steps 11 saves nothing at the end)
    assert "reference.steps" in moving and int(ref_a["reference.steps"]) == 9
    for key in moving:
        torch.testing.assert_close(ref_a[key], ref_b[key], rtol=0, atol=1e-6)
    # and the reference really moved away from the initial policy
    initial = load_causal_lm(tiny_spec(), load_tokenizer(tiny_spec())).state_dict()
    assert not torch.equal(ref_a["reference.network.model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def test_fixed_reference_stays_out_of_checkpoints_and_a_moving_one_needs_its_state(tmp_path, pair_files) -> None:
    recipe = tiny_recipe(tmp_path, *pair_files)
    recipe["trainer"]["enable_checkpointing"] = True
    run(["fit", "--config", write_recipe(tmp_path / "fixed.yaml", recipe)])
    (ckpt,) = list((tmp_path / "run").rglob("*.ckpt"))
    assert not any(k.startswith("reference.") for k in torch.load(ckpt, weights_only=True)["state_dict"])
    moving = tiny_recipe(tmp_path, *pair_files, reference={"update": {"alpha": 0.5, "every_n_steps": 1}},
                         overwrite_export=True)
    moving["trainer"]["max_steps"] = 3
    with pytest.raises(ValueError, match="holds no moving reference"):
        run(["fit", "--config", write_recipe(tmp_path / "moving.yaml", moving), "--ckpt_path", str(ckpt)])


# -- one log-prob selector ------------------------------------------------------------------------
def test_selector_paths_agree_and_give_tokens_only_when_asked(tokenizer) -> None:
    model = load_causal_lm(tiny_spec(seed=3), tokenizer).double()
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    full = model_logprobs(model, batch, with_tokens=True)
    mask = batch["completion_mask"][:, 1:].bool()
    assert torch.equal(full.token_mask, mask)
    torch.testing.assert_close(full.tokens.sum(-1), full.sums, rtol=0, atol=1e-12)
    assert (full.tokens[~mask] == 0).all()
    for got in (chunked_model_logprobs(model, batch, 4, with_tokens=True),
                shared_prompt_model_logprobs(model, batch, 4, with_tokens=True)):
        torch.testing.assert_close(got.tokens, full.tokens, rtol=0, atol=1e-10)
        assert torch.equal(got.token_mask, mask)
    assert LogProbSelector()(model, batch).tokens is None  # sums-only losses pay nothing


def test_selector_chooses_by_model_and_strategy_type(tokenizer) -> None:
    model = load_causal_lm(tiny_spec(), tokenizer)
    assert LogProbSelector("auto").chunked(model, None)
    assert not LogProbSelector("auto").chunked(model, FSDPStrategy())
    assert not LogProbSelector("full").chunked(model, None)
    with pytest.raises(ValueError, match="model.init_args.share_prompt needs a pairwise loss"):
        LogProbSelector(share_prompt=True).check(model, pairwise=False)


class TokenSumDPO(DPOLoss):
    """DPO computed from per-token values: checks they reach the loss and sum to the sums."""

    needs_token_logprobs = True
    seen: list[bool] = []

    def forward(self, policy, reference, batch) -> LossOutput:
        assert policy.tokens is not None and reference.tokens is not None
        torch.testing.assert_close(policy.tokens.sum(-1), policy.sums)
        TokenSumDPO.seen.append(True)
        return super().forward(policy, reference, batch)


def test_a_loss_asking_for_token_logprobs_gets_them(tmp_path, pair_files) -> None:
    module = PreferenceModule(model=tiny_spec(), loss=TokenSumDPO())
    batch = PairCollator(pad_token_id=module.tokenizer.pad_token_id)(rows())
    module.step(batch, module.train_metrics)
    assert TokenSumDPO.seen
