"""Loading, tokenization (BOS/EOS once), truncation, the drop report and strict mode."""

from __future__ import annotations

import pytest
import torch

from conftest import TOKENIZER_DIR, quickstart_rows, write_jsonl
from dpo_lightning.data import PairEncoder, PreferenceDataModule, TokenizationSettings


def tokenize(tokenizer, row, **settings):
    return PairEncoder(tokenizer, TokenizationSettings(**settings))(row, 7)


def test_bos_once_and_eos_once(tokenizer) -> None:
    row = {"prompt": "Review the kettle.", "chosen": " It is great.", "rejected": " It is poor."}
    out = tokenize(tokenizer, row)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert out["prompt_ids"][0] == bos and out["prompt_ids"].count(bos) == 1
    for key in ("chosen_ids", "rejected_ids"):
        assert out[key][-1] == eos and out[key].count(eos) == 1
    assert out["prompt_ids"][1:] == tokenizer("Review the kettle.", add_special_tokens=False)["input_ids"]
    # text that already carries the special tokens is not given a second copy
    doubled = tokenize(tokenizer, {"prompt": "<s>Review the kettle.", "chosen": " It is great.</s>",
                                   "rejected": " It is poor.</s></s>"})
    assert doubled["prompt_ids"] == out["prompt_ids"]
    assert doubled["chosen_ids"] == out["chosen_ids"] and doubled["rejected_ids"] == out["rejected_ids"]


def test_truncation_keeps_bos_and_end_of_prompt_then_cuts_completion(tokenizer) -> None:
    prompt = "one two three four five six seven eight nine ten"
    row = {"prompt": prompt, "chosen": " a b c d e f g h", "rejected": " z"}
    full = tokenize(tokenizer, row)
    out = tokenize(tokenizer, row, max_length=8, max_prompt_length=4)
    assert out["prompt_ids"] == [tokenizer.bos_token_id] + full["prompt_ids"][-3:]
    assert out["chosen_ids"] == full["chosen_ids"][:4]  # budget 8 - 4, start kept
    assert out["rejected_ids"] == full["rejected_ids"]  # short enough: untouched, EOS kept
    start = tokenize(tokenizer, row, max_length=8, max_prompt_length=4, truncation_mode="keep_start")
    assert start["prompt_ids"] == full["prompt_ids"][:4]
    too_long = tokenize(tokenizer, row, max_length=8)
    assert too_long["drop_reason"] == "too_long"


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"prompt": "p", "chosen": None, "rejected": " b"}, "missing_field"),
        ({"prompt": "p", "chosen": 3, "rejected": " b"}, "wrong_type"),
        ({"prompt": ["p"], "chosen": " a", "rejected": " b"}, "wrong_type"),
        ({"prompt": "p", "chosen": "   ", "rejected": " b"}, "empty_completion"),
        ({"prompt": "p", "chosen": " same", "rejected": " same"}, "identical_pair"),
    ],
)
def test_bad_rows_get_a_reason(tokenizer, row, reason) -> None:
    assert tokenize(tokenizer, row)["drop_reason"] == reason


def test_report_counts_every_dropped_row(tmp_path, caplog) -> None:
    good = quickstart_rows(10)
    bad = [
        {"prompt": "p", "chosen": "", "rejected": " b"},
        {"prompt": "p", "chosen": " x", "rejected": " x"},
        {"prompt": "p", "chosen": " x", "rejected": " x"},
        {"prompt": "p", "chosen": None, "rejected": " y"},
        {"prompt": "word " * 200, "chosen": " x", "rejected": " y"},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", good[:5] + bad + good[5:])
    dm = PreferenceDataModule(train_data=path, tokenizer=TOKENIZER_DIR, max_length=64)
    dm.setup("fit")
    report = dm.reports["train"]
    assert report.rows_read == 15 and report.rows_kept == 10 and len(dm.train_dataset) == 10
    assert dict(report.dropped) == {"empty_completion": 1, "identical_pair": 2, "missing_field": 1, "too_long": 1}
    assert report.examples["identical_pair"] == [6, 7]
    assert sorted(dm.train_dataset["row_id"]) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert "dropped      2  identical_pair     rows [6, 7]" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 * batch["row_id"].shape[0]


def test_strict_mode_names_the_row(tmp_path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(3) + [{"prompt": "p", "chosen": " x", "rejected": " x"}])
    dm = PreferenceDataModule(train_data=path, tokenizer=TOKENIZER_DIR, strict=True)
    with pytest.raises(ValueError, match=r"row 3 is unusable \(identical_pair\)"):
        dm.setup("fit")


def test_missing_column_names_the_key_and_column(tmp_path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "preferred": " a", "rejected": " b"}])
    dm = PreferenceDataModule(train_data=path, tokenizer=TOKENIZER_DIR)
    with pytest.raises(ValueError, match=r"data.init_args.train_data: column\(s\) \['chosen'\] missing"):
        dm.setup("fit")


def test_missing_file_is_named(tmp_path) -> None:
    dm = PreferenceDataModule(train_data=str(tmp_path / "nope.jsonl"), tokenizer=TOKENIZER_DIR)
    with pytest.raises(FileNotFoundError, match="data.init_args.train_data"):
        dm.setup("fit")


def test_val_fraction_split_is_seeded_and_disjoint(tmp_path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(40))
    a = PreferenceDataModule(train_data=path, tokenizer=TOKENIZER_DIR, val_fraction=0.25, split_seed=3)
    b = PreferenceDataModule(train_data=path, tokenizer=TOKENIZER_DIR, val_fraction=0.25, split_seed=3)
    a.setup("fit"), b.setup("fit")
    assert len(a.val_dataset) == 10 and len(a.train_dataset) == 30
    assert a.val_dataset["prompt_ids"] == b.val_dataset["prompt_ids"]


def test_parquet_and_csv_sources(tmp_path) -> None:
    import datasets

    rows = datasets.Dataset.from_list(quickstart_rows(6))
    rows.to_parquet(str(tmp_path / "t.parquet"))
    rows.to_csv(str(tmp_path / "t.csv"))
    for name in ("t.parquet", "t.csv"):
        dm = PreferenceDataModule(train_data=str(tmp_path / name), tokenizer=TOKENIZER_DIR)
        dm.setup("fit")
        assert len(dm.train_dataset) == 6


def test_collator_masks(tokenizer) -> None:
    from dpo_lightning.data import PairCollator

    batch = PairCollator(pad_token_id=0, columns=("score_chosen",))(
        [{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2], "row_id": 4, "score_chosen": 0.5}]
    )
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2, 0], [1, 5, 7, 8, 2]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["row_id"].tolist() == [4] and batch["score_chosen"].dtype == torch.float32


def test_hub_name_goes_to_load_dataset_with_config_and_split(monkeypatch) -> None:
    import datasets

    from dpo_lightning.data import loading

    calls = []
    rows = datasets.Dataset.from_list(quickstart_rows(5))
    monkeypatch.setattr(loading.datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or rows)
    out = loading.load_rows("org/prefs", key="data.init_args.train_data", config="default", split="train_prefs", max_rows=3)
    assert calls == [(("org/prefs",), {"name": "default", "split": "train_prefs"})]
    assert len(out) == 3


def test_several_files_and_globs(tmp_path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", quickstart_rows(4))
    write_jsonl(tmp_path / "b.jsonl", quickstart_rows(7)[4:])
    dm = PreferenceDataModule(train_data=[a, str(tmp_path / "b*.jsonl")], tokenizer=TOKENIZER_DIR, max_rows=6)
    dm.setup("fit")
    assert dm.reports["train"].rows_read == 6
    with pytest.raises(ValueError, match="one kind"):
        from dpo_lightning.data import load_rows

        load_rows([a, str(tmp_path / "x.txt")], key="data.init_args.train_data") if (tmp_path / "x.txt").write_text("x") else None
