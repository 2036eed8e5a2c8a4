"""Nothing stale, nothing silent: data files are known by their bytes, and every cache file is
checked before it is read (the datasets builder cache, the tokenization cache, the reference
log-prob cache). A damaged, truncated, swapped or outdated file is recomputed with one line
naming it and why."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZER_DIR, quickstart_rows, tiny_recipe, write_jsonl, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.modules import reference_cache


def rewrite_keeping_time(path: str, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` and give it back its old access and modification times."""
    before = os.stat(path)
    write_jsonl(Path(path), rows)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns


def swapped_rows(n: int) -> list[dict]:
    """The first ``n`` quickstart rows with chosen and rejected swapped (the same bytes, reordered)."""
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in quickstart_rows(n)]


def data_module(path: str, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(train_data=path, tokenizer=TOKENIZER_DIR, max_length=64, **kwargs)
    dm.setup("fit")
    return dm


def by_row(dm: PreferenceDataModule, column: str, split: str = "train") -> list:
    return list(dm.splits[split].sort("row_id")[column])


def replace_bytes(path: Path, data: bytes) -> None:
    """Give ``path`` new bytes through a new file renamed over it (a file this process still
    memory-maps must not change under it)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- data files known by their bytes --------------------------------------------------------------
def test_rewritten_data_with_its_time_kept_is_retokenized_recomputed_and_refused_on_resume(tmp_path, pair_files) -> None:
    train, val = pair_files
    recipe = tiny_recipe(tmp_path, train, val, reference={"precompute": True, "cache_dir": str(tmp_path / "cache")},
                         overwrite_export=True)
    recipe["trainer"]["enable_checkpointing"] = True
    first = run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    assert first.model.reference.batches_computed > 0
    size = os.path.getsize(train)
    rewrite_keeping_time(train, swapped_rows(32))
    assert os.path.getsize(train) == size  # same path, size and time: only the bytes tell
    (ckpt,) = list((tmp_path / "run").rglob("*.ckpt"))
    with pytest.raises(ValueError, match=r"different run.*train_data: .*\(resume with the same data.init_args.train_data"):
        run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe), "--ckpt_path", str(ckpt)])
    again = run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    # the new rows got their own reference cache file (the refused resume computed it; val is unchanged)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    # retokenized: each row's chosen ids are the first run's rejected ids, and its reference values swap too
    assert by_row(again.datamodule, "chosen_ids") == by_row(first.datamodule, "rejected_ids")
    assert by_row(again.datamodule, "reference_chosen") == pytest.approx(by_row(first.datamodule, "reference_rejected"), rel=1e-6)


def test_data_module_alone_reads_the_new_rows(tmp_path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(8))
    before = data_module(path)
    rewrite_keeping_time(path, swapped_rows(8))
    after = data_module(path)
    assert by_row(after, "chosen_ids") == by_row(before, "rejected_ids")
    assert after.data_fingerprint != before.data_fingerprint
    rewrite_keeping_time(path, quickstart_rows(8))  # the first bytes again: the first fingerprint
    assert data_module(path).data_fingerprint == before.data_fingerprint


def test_the_same_bytes_written_again_keep_their_fingerprint(tmp_path) -> None:
    """A new modification time alone (a copy, a checkout) changes nothing: caches and resume still hold."""
    path = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(8))
    before = data_module(path).data_fingerprint
    write_jsonl(Path(path), quickstart_rows(8))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert data_module(path).data_fingerprint == before


# --- the datasets builder cache ------------------------------------------------------------------
def builder_folder(dm: PreferenceDataModule) -> Path:
    (stamp,) = {Path(f["filename"]).parent for f in dm.train_dataset.cache_files}
    return stamp


def test_damaged_builder_cache_is_rebuilt_naming_it(tmp_path, caplog) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(8))
    first = data_module(path)
    folder, expected = builder_folder(first), by_row(first, "chosen_ids")
    (arrow,) = [p for p in folder.glob("*.arrow") if not p.name.startswith("cache-")]
    replace_bytes(arrow, b"\0" * arrow.stat().st_size)  # zeroed, same size
    again = data_module(path)
    assert f"rebuilding the datasets cache {folder} of '{path}': its file {arrow.name} does not match" in caplog.text
    assert by_row(again, "chosen_ids") == expected
    from dpo_lightning.data.builder_cache import STAMP

    assert json.loads((folder / STAMP).read_text())["sources"]  # stamped again


# --- the tokenization cache ----------------------------------------------------------------------
def tokenized_file(dm: PreferenceDataModule, split: str = "train") -> Path:
    (path,) = [Path(f["filename"]) for f in dm.splits[split].cache_files if Path(f["filename"]).name.startswith("cache-")]
    return path


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "swapped"])
def test_damaged_tokenization_cache_is_recomputed_naming_it(tmp_path, caplog, damage) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", quickstart_rows(12))
    val = write_jsonl(tmp_path / "val.jsonl", quickstart_rows(6, "val"))
    first = data_module(train, val_data=val)
    target, expected = tokenized_file(first), by_row(first, "chosen_ids")
    if damage == "zeroed":
        replace_bytes(target, b"\0" * target.stat().st_size)
    elif damage == "truncated":
        replace_bytes(target, target.read_bytes()[: target.stat().st_size // 2])
    else:  # the val split's tokenized rows under the train file's name
        replace_bytes(target, tokenized_file(first, "val").read_bytes())
    caplog.clear()
    again = data_module(train, val_data=val)
    assert f"recomputing {target} (tokenizing train): " in caplog.text
    assert "damaged, truncated or replaced" in caplog.text
    assert by_row(again, "chosen_ids") == expected and len(again.train_dataset) == 12
    caplog.clear()
    data_module(train, val_data=val)  # intact now: read without a word
    assert "recomputing" not in caplog.text


def test_tokenization_cache_written_by_several_processes_is_checked_shard_by_shard(tmp_path, caplog) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(12))
    first = data_module(path, num_proc=2)
    shards = sorted(Path(f["filename"]) for f in first.train_dataset.cache_files)
    assert [s.name[-21:] for s in shards] == ["_00000_of_00002.arrow", "_00001_of_00002.arrow"]
    expected = by_row(first, "chosen_ids")
    replace_bytes(shards[1], b"\0" * shards[1].stat().st_size)
    caplog.clear()
    again = data_module(path, num_proc=2)
    assert f"{shards[1].name} does not match the digest recorded when it was written" in caplog.text
    assert by_row(again, "chosen_ids") == expected


def test_unstamped_tokenization_cache_is_not_trusted(tmp_path, caplog) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(8))
    first = data_module(path)
    target = tokenized_file(first)
    target.with_name(target.stem + ".dpo_lightning.json").unlink()
    caplog.clear()
    data_module(path)
    assert f"recomputing {target} (tokenizing train): it has no record of what was written" in caplog.text


# --- the reference log-prob cache -------------------------------------------------------------------
def counting(values: torch.Tensor):
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return values.clone()

    return compute, calls


def no_barrier() -> None:
    return None


def data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes start (after its 8-byte length and JSON header)."""
    (header,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header


@pytest.mark.parametrize("damage, why", [
    ("zeroed", "its values do not match the checksum written with them"),
    ("truncated", "unreadable (SafetensorError"),
    ("swapped", "it holds the log-probs of another key"),
    ("rows", "it holds (4, 2) values for 4 rows, the split has 5 rows"),
    ("old", "it holds no record of its key and checksum"),
])
def test_damaged_reference_cache_is_recomputed_naming_it(tmp_path, caplog, damage, why) -> None:
    train, val = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)), torch.randn(4, 2)
    path, other = tmp_path / "train.safetensors", tmp_path / "val.safetensors"
    reference_cache.save(path, train, "train-key")
    reference_cache.save(other, val, "val-key")
    if damage == "zeroed":
        start = data_offset(path)
        path.write_bytes(path.read_bytes()[:start] + b"\0" * (path.stat().st_size - start))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 7])
    elif damage == "swapped":
        shutil.copyfile(other, path)
    elif damage == "rows":
        reference_cache.save(path, val, "train-key")
    else:  # written by an earlier version: no metadata
        from safetensors.torch import save_file

        save_file({"logps": train}, str(path))
    compute, calls = counting(train)
    values, computed = reference_cache.load_or_compute(path, "train-key", 5, compute, True, no_barrier)
    assert computed and calls == [1]
    assert f"reference log-prob cache {path}: {why}" in caplog.text
    torch.testing.assert_close(values, train, rtol=0, atol=0)
    caplog.clear()
    values, computed = reference_cache.load_or_compute(path, "train-key", 5, compute, True, no_barrier)
    assert not computed and calls == [1] and "reference log-prob cache" not in caplog.text  # saved intact
    torch.testing.assert_close(values, train, rtol=0, atol=0)


def test_swapped_train_and_val_reference_caches_are_recomputed_in_a_run(tmp_path, pair_files, caplog) -> None:
    def fit(name: str):
        recipe = tiny_recipe(tmp_path / name, *pair_files, reference={"precompute": True, "cache_dir": str(tmp_path / "cache")})
        return run(["fit", "--config", write_recipe(tmp_path / f"{name}.yaml", recipe)])

    first = fit("first")
    a, b = sorted((tmp_path / "cache").glob("*.safetensors"))
    tmp = a.with_suffix(".x")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    caplog.clear()
    second = fit("second")
    assert second.model.reference.batches_computed > 0
    assert caplog.text.count("it holds the log-probs of another key (another split, data, reference or tokenizer); "
                             "recomputing it") == 2
    for split in ("train", "val"):
        assert by_row(second.datamodule, "reference_chosen", split) == by_row(first.datamodule, "reference_chosen", split)


# --- files the commands write -------------------------------------------------------------------------
class RewardsWithNaN(torch.nn.Module):
    """A reward model whose reward for the third sequence of every batch is NaN."""

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        logits = attention_mask.sum(-1, keepdim=True).float()
        logits[2] = float("nan")
        return SimpleNamespace(logits=logits)


def test_score_refuses_non_finite_rewards_naming_the_rows(tmp_path, monkeypatch) -> None:
    from dpo_lightning import scoring

    monkeypatch.setattr(scoring, "load_reward_model", lambda spec, tokenizer, option=None: RewardsWithNaN())
    data = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(8))
    out = tmp_path / "scored.jsonl"
    with pytest.raises(ValueError, match=r"--reward_model '.*' gave non-finite rewards for 2 pair\(s\) \(row 2: chosen nan, "
                                         r"rejected \d+.0, row 6: chosen nan, rejected \d+.0\); nothing was written"):
        scoring.score_pairs(TOKENIZER_DIR, data, str(out), batch_size=4, max_length=64)
    assert not out.exists()


def test_score_output_is_written_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    import datasets

    from dpo_lightning import scoring

    def killed_while_writing(self, path, **kwargs):
        Path(path).write_text('{"prompt": "cut at a row boundary"}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "load_reward_model", lambda spec, tokenizer, option=None: RewardsWithNaN().eval())
    monkeypatch.setattr(scoring, "check_finite_rewards", lambda *args: None)
    monkeypatch.setattr(datasets.Dataset, "to_json", killed_while_writing)
    out = tmp_path / "scored.jsonl"
    with pytest.raises(KeyboardInterrupt):
        scoring.score_pairs(TOKENIZER_DIR, write_jsonl(tmp_path / "t.jsonl", quickstart_rows(4)), str(out), max_length=64)
    assert list(tmp_path.iterdir()) == [tmp_path / "t.jsonl"]  # neither the output nor a partial file


class RewardsByLength(torch.nn.Module):
    """A reward model whose reward is the sequence's length in tokens."""

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(logits=attention_mask.sum(-1, keepdim=True).float())


def test_score_reads_renamed_columns_and_names_its_own_options(tmp_path, monkeypatch) -> None:
    """``--columns`` maps hub-style names; the scores equal those of the same rows under the canonical
    names; a data error names ``--data`` / ``--columns`` (not the recipe's keys) before any model loads."""
    import json

    from dpo_lightning import scoring

    rows = quickstart_rows(6)
    canonical = write_jsonl(tmp_path / "canonical.jsonl", rows)
    renamed = write_jsonl(tmp_path / "renamed.jsonl",
                          [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows])
    monkeypatch.setattr(scoring, "load_reward_model", lambda spec, tokenizer, option=None: RewardsByLength().eval())
    scoring.score_pairs(TOKENIZER_DIR, canonical, str(tmp_path / "a.jsonl"), max_length=64)
    scoring.score_pairs(TOKENIZER_DIR, renamed, str(tmp_path / "b.jsonl"), max_length=64,
                        columns={"question": "prompt", "good": "chosen", "bad": "rejected"})
    a, b = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()] for name in ("a.jsonl", "b.jsonl"))
    assert len(a) == 6 and [sorted(r) for r in b] == [sorted(r) for r in a]
    assert [(r["prompt"], r["score_chosen"], r["score_rejected"]) for r in b] == \
        [(r["prompt"], r["score_chosen"], r["score_rejected"]) for r in a]
    assert all(r["score_chosen"] > 0 for r in a)

    monkeypatch.setattr(scoring, "load_reward_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=r"^--data: column\(s\) \['chosen', 'rejected'\] missing.*with --columns"):
        scoring.score_pairs(TOKENIZER_DIR, renamed, str(tmp_path / "c.jsonl"), max_length=64,
                            columns={"question": "prompt"})


def test_builder_cache_with_other_split_sizes_is_rebuilt(tmp_path, caplog) -> None:
    """dataset_info.json decides how many rows are read: an edited one is no cache to trust."""
    path = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(8))
    folder = builder_folder(data_module(path))
    info = folder / "dataset_info.json"
    replace_bytes(info, info.read_text().replace('"num_examples": 8', '"num_examples": 4').encode())
    caplog.clear()
    again = data_module(path)
    assert "its file dataset_info.json does not match the digest recorded" in caplog.text
    assert again.reports["train"].rows_read == 8


def test_library_upgrades_change_the_cache_keys(tmp_path, monkeypatch) -> None:
    """A new transformers (numerics, initialisation, tokenizers' ids) is no cache hit."""
    import importlib.metadata

    from dpo_lightning.data.map_cache import map_fingerprint

    rows = data_module(write_jsonl(tmp_path / "t.jsonl", quickstart_rows(4))).train_dataset
    before = reference_cache.cache_key(rows, "ref", "tok"), map_fingerprint(rows, len, {"with_indices": True})
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "transformers" else real(name))
    after = reference_cache.cache_key(rows, "ref", "tok"), map_fingerprint(rows, len, {"with_indices": True})
    assert json.loads(after[0])["libraries"]["transformers"] == "99.0"
    assert after[0] != before[0] and after[1] != before[1]


def test_data_rewritten_with_more_rows_and_its_time_kept_is_read_whole(tmp_path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(8))
    assert data_module(path).reports["train"].rows_read == 8
    rewrite_keeping_time(path, quickstart_rows(11))
    assert data_module(path).reports["train"].rows_read == 11


def test_save_to_disk_folder_is_known_by_its_bytes(tmp_path, caplog) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(quickstart_rows(8)).save_to_disk(str(folder))
    first = data_module(str(folder))
    caplog.clear()
    second = data_module(str(folder))  # its tokenization cache, written into the folder, is read
    assert second.data_fingerprint == first.data_fingerprint and "recomputing" not in caplog.text
    expected = by_row(first, "rejected_ids")
    (tmp_path / "other").mkdir()
    datasets.Dataset.from_list(swapped_rows(8)).save_to_disk(str(tmp_path / "other"))
    for arrow in (tmp_path / "other").glob("data-*.arrow"):  # other rows under the same state.json
        replace_bytes(folder / arrow.name, arrow.read_bytes())
    third = data_module(str(folder))
    assert third.data_fingerprint != first.data_fingerprint
    assert by_row(third, "chosen_ids") == expected
