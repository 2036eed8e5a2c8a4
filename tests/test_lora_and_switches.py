"""LoRA with the adapter-free policy as reference, adapter/merged export; 8-bit AdamW; precision,
gradient checkpointing and accumulation switches from YAML."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import tiny_recipe, tiny_spec, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.models import load_causal_lm, load_tokenizer
from dpo_lightning.modules import AdaptersDisabled

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "merge_on_export": True}


def fit(tmp_path, pair_files, name="r", steps=2, trainer=None, data=None, **model_args):
    r = tiny_recipe(tmp_path, *pair_files, **model_args)
    r["trainer"]["max_steps"] = steps
    r["trainer"].update(trainer or {})
    r["data"]["init_args"].update(data or {})
    return run(["fit", "--config", write_recipe(tmp_path / f"{name}.yaml", r)])


def test_lora_reference_is_the_adapter_free_policy(tmp_path, pair_files) -> None:
    cli = fit(tmp_path, pair_files, lora=LORA, steps=3)
    module = cli.model
    assert isinstance(module.reference, AdaptersDisabled) and not list(module.reference.parameters())
    assert isinstance(module.policy, PeftModel)
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = load_causal_lm(tiny_spec(), module.tokenizer).eval()
    batch = cli.datamodule.collator()([cli.datamodule.train_dataset[i] for i in range(2)])
    module.eval()
    with torch.no_grad():
        reference = module.reference.logprobs(module.policy, batch, module.logprobs)
        from dpo_lightning.modules import model_logprobs

        expected = model_logprobs(base, batch)
        trained = module.logprobs(module.policy, batch)
    torch.testing.assert_close(reference.sums, expected.sums, rtol=0, atol=1e-4)  # base weights untouched
    assert not torch.allclose(trained.sums, expected.sums)  # the adapters moved the policy
    ids = torch.tensor([[1, 40, 50, 60, 70, 2]])
    with torch.no_grad():
        policy_logits = module.policy(input_ids=ids).logits
    adapter = PeftModel.from_pretrained(load_causal_lm(tiny_spec(), module.tokenizer), str(tmp_path / "export")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export" / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(input_ids=ids).logits, policy_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, policy_logits, rtol=0, atol=1e-5)
    assert (tmp_path / "export" / "adapter_model.safetensors").exists()


def test_lora_with_precomputed_reference(tmp_path, pair_files) -> None:
    cli = fit(tmp_path, pair_files, lora={**LORA, "merge_on_export": False}, reference={"precompute": True, "cache_dir": str(tmp_path / "cache")})
    assert cli.model.reference.batches_computed > 0 and cli.trainer.global_step == 2


@pytest.mark.parametrize("optimizer", ["bitsandbytes.optim.AdamW8bit", "bitsandbytes.optim.PagedAdamW8bit"])
def test_8bit_optimizers_from_yaml(tmp_path, pair_files, optimizer) -> None:
    r = tiny_recipe(tmp_path, *pair_files, optimizer={"class_path": optimizer, "init_args": {"lr": 0.01}})
    r["trainer"]["max_steps"] = 3
    cli = run(["fit", "--config", write_recipe(tmp_path / "o.yaml", r)])
    opt = cli.trainer.optimizers[0]
    assert type(opt).__name__ == optimizer.rsplit(".", 1)[1]
    states = [s for s in opt.state.values() if "state1" in s]
    assert states and any(s["state1"].dtype == torch.uint8 for s in states)  # 8-bit moments
    initial = load_causal_lm(tiny_spec(), load_tokenizer(tiny_spec()))
    assert any(not torch.equal(a, b) for a, b in zip(cli.model.policy.parameters(), initial.parameters()))


def test_bf16_mixed_gradient_checkpointing_and_accumulation(tmp_path, pair_files) -> None:
    cli = fit(tmp_path, pair_files, trainer={"precision": "bf16-mixed", "accumulate_grad_batches": 2},
              gradient_checkpointing=True, steps=2)
    assert cli.trainer.global_step == 2
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4  # 2 batches per step
    assert cli.model.policy.is_gradient_checkpointing
    assert cli.trainer.precision == "bf16-mixed"
    assert all(p.dtype == torch.float32 for p in cli.model.policy.parameters())  # master weights stay fp32


def test_share_prompt_trains_like_the_plain_layout(tmp_path, pair_files) -> None:
    (tmp_path / "plain").mkdir(), (tmp_path / "shared").mkdir()
    # length grouping orders batches by the width each layout runs at: compare on one shuffled order
    same_order = {"group_by_length": False}
    plain = fit(tmp_path / "plain", pair_files, steps=3, share_prompt=False, data=same_order,
                optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}})
    assert not plain.model.logprob_selector.share_prompt
    shared = fit(tmp_path / "shared", pair_files, steps=3, share_prompt=True, data=same_order,
                 optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}})
    for a, b in zip(plain.model.policy.parameters(), shared.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="share_prompt needs a pairwise loss"):
        from dpo_lightning.losses import KTOLoss
        from dpo_lightning.modules import PreferenceModule

        PreferenceModule(model=tiny_spec(), loss=KTOLoss(), share_prompt=True)
