"""Precomputed reference log-probs: equal to the live reference, cached (keyed by the reference's
weights), and the model freed; and ``share_prompt: auto``, the default log-prob layout on CPUs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TOKENIZER_DIR, tiny_recipe, tiny_spec, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.fingerprints import spec_fingerprint
from dpo_lightning.models import ModelSpec, load_causal_lm
from dpo_lightning.modules import model_logprobs, reference_cache


def recipe(tmp_path, pair_files, name: str, precompute: bool) -> list[str]:
    r = tiny_recipe(tmp_path / name, *pair_files, reference={"precompute": precompute, "cache_dir": str(tmp_path / "cache")},
                    export_dir=str(tmp_path / name / "export"))
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


def save_weights(folder, tokenizer, seed: int) -> None:
    """Save a tiny Llama (weights drawn with ``seed``) into ``folder``, replacing what is there."""
    load_causal_lm(tiny_spec(seed), tokenizer).save_pretrained(folder)


def test_cache_is_keyed_by_the_content_of_the_reference_weights(tmp_path, pair_files, tokenizer) -> None:
    """New weights saved into the same folder are recomputed; identical weights read the cache."""
    folder = tmp_path / "weights"

    def fit(name: str) -> tuple[int, torch.Tensor]:
        r = tiny_recipe(tmp_path / name, *pair_files, reference={"precompute": True, "cache_dir": str(tmp_path / "cache")},
                        export_dir=str(tmp_path / name / "export"))
        r["model"]["init_args"]["model"] = {"name_or_path": str(folder), "tokenizer": TOKENIZER_DIR}
        r["trainer"].update(max_steps=1, limit_val_batches=1)
        result = run(["fit", "--config", write_recipe(tmp_path / f"{name}.yaml", r)])
        train = result.datamodule.train_dataset
        return result.model.reference.batches_computed, torch.tensor([train["reference_chosen"], train["reference_rejected"]])

    save_weights(folder, tokenizer, seed=0)
    computed, first = fit("first")
    assert computed > 0
    save_weights(folder, tokenizer, seed=1)  # same folder, same spec, other weights
    computed, other = fit("other")
    assert computed > 0
    assert not torch.allclose(first, other)  # the new weights' log-probs, not the old file's
    save_weights(folder, tokenizer, seed=0)  # the first weights again (new files, same bytes)
    computed, again = fit("again")
    assert computed == 0
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_reference_identity_hashes_folder_and_hub_snapshot_files(tmp_path, tokenizer, monkeypatch) -> None:
    folder = tmp_path / "model"
    save_weights(folder, tokenizer, seed=0)
    spec_id = spec_fingerprint(ModelSpec(name_or_path=str(folder)))
    before = reference_cache.reference_identity(spec_id)
    assert reference_cache.reference_identity(spec_id) == before
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # same weights, other architecture settings: other log-probs
    (folder / "config.json").write_text(json.dumps(config))
    assert reference_cache.reference_identity(spec_id) != before
    # a hub id resolves to its snapshot in the local hub cache, revision ref included
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    hub_id = spec_fingerprint(ModelSpec(name_or_path="org/tiny", extra={"cache_dir": str(cache)}))
    assert json.loads(reference_cache.reference_identity(hub_id))["files"] == reference_cache.folder_digest(folder)
    (repo / "refs" / "main").write_text("b" * 40)  # the branch moved to a commit not downloaded
    with pytest.raises(ValueError, match="local hub cache"):
        reference_cache.reference_identity(hub_id)
    # a model built from a config keeps its spec (config + seed) as identity
    config_id = spec_fingerprint(tiny_spec(3))
    assert reference_cache.reference_identity(config_id) == config_id
