"""Precomputed reference log-probs: equal to the live reference, cached, and the model freed."""

from __future__ import annotations

import torch

from conftest import tiny_recipe, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.modules import model_logprobs


def recipe(tmp_path, pair_files, name: str, precompute: bool) -> list[str]:
    r = tiny_recipe(tmp_path / name, *pair_files, precompute_reference=precompute,
                    reference_cache_dir=str(tmp_path / "cache"), export_dir=str(tmp_path / name / "export"))
    r["trainer"].update(max_steps=4, limit_val_batches=1.0, num_sanity_val_steps=-1, val_check_interval=4)
    return ["fit", "--config", write_recipe(tmp_path / f"{name}.yaml", r)]


def test_precomputed_equals_live_reference_and_second_run_reads_the_cache(tmp_path, pair_files) -> None:
    live = run(recipe(tmp_path, pair_files, "live", precompute=False))
    first = run(recipe(tmp_path, pair_files, "first", precompute=True))
    assert first.model.reference.source is None and not list(first.model.reference.parameters())  # freed
    assert first.model.reference.batches_computed > 0
    dm = first.datamodule
    assert {"reference_chosen", "reference_rejected"} <= set(dm.train_dataset.column_names)
    # the cached values are the reference's log-probs (the initial policy's)
    initial = live.model.reference.network
    batch = dm.collator()([dm.train_dataset[i] for i in range(3)])
    with torch.no_grad():
        expected = model_logprobs(initial, batch)
    torch.testing.assert_close(batch["reference_chosen"], expected.chosen.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(batch["reference_rejected"], expected.rejected.float(), rtol=1e-6, atol=1e-5)
    # training on cached values gives the live run's metrics and weights
    for key in ("rewards/accuracy", "rewards/margins", "loss"):
        assert abs(live.model.validation_history[-1][key] - first.model.validation_history[-1][key]) < 1e-4, key
    for a, b in zip(live.model.policy.parameters(), first.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    second = run(recipe(tmp_path, pair_files, "second", precompute=True))
    assert second.model.reference.batches_computed == 0 and second.model.reference.source is None
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # train and val
