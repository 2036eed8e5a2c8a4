"""Length-grouped sampling (seeded, DDP-exact), padding saved, and the tokenization cache."""

from __future__ import annotations

import os
import random

import pytest

from conftest import TOKENIZER_DIR, quickstart_rows, write_jsonl
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.data.samplers import LengthGroupedSampler, padding_fraction


def rank_batches(sampler: LengthGroupedSampler) -> list[list[int]]:
    order = list(sampler)
    return [order[i : i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


@pytest.mark.parametrize("n,batch,world", [(100, 4, 1), (101, 4, 2), (37, 3, 3), (5, 8, 2)])
def test_ranks_see_distinct_rows_and_equal_batch_counts(n: int, batch: int, world: int) -> None:
    lengths = [random.Random(i).randint(1, 200) for i in range(n)]
    samplers = [LengthGroupedSampler(lengths, batch, world, r, seed=7, mega_batch_mult=4) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) % batch == 0
    everything = [i for x in per_rank for i in x]
    assert set(everything) == set(range(n))  # nothing lost
    repeats = len(everything) - n
    assert 0 <= repeats < max(batch * world, n)  # only the last global batch is filled up
    if repeats == 0:
        assert len(set(everything)) == n
    assert per_rank == [list(s) for s in samplers]  # deterministic
    for s in samplers:
        s.set_epoch(1)
    assert [list(s) for s in samplers] != per_rank  # a new order every epoch


def test_grouping_cuts_padding_on_the_quickstart_data(tmp_path) -> None:
    dm = PreferenceDataModule(train_data="data/quickstart/train.jsonl", tokenizer=TOKENIZER_DIR, batch_size=16)
    dm.setup("fit")
    lengths = dm.row_lengths(dm.train_dataset)
    grouped = padding_fraction(rank_batches(LengthGroupedSampler(lengths, 16, seed=0)), lengths)
    rng = random.Random(0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    uniform = padding_fraction([order[i : i + 16] for i in range(0, len(order), 16)], lengths)
    assert grouped < uniform / 3, (grouped, uniform)


def test_second_setup_reads_the_tokenization_cache(tmp_path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", quickstart_rows(20))
    first = PreferenceDataModule(train_data=path, tokenizer=TOKENIZER_DIR)
    first.setup("fit")
    files = [f["filename"] for f in first.train_dataset.cache_files]
    mtimes = [os.path.getmtime(f) for f in files]
    second = PreferenceDataModule(train_data=path, tokenizer=TOKENIZER_DIR)
    second.setup("fit")
    assert [f["filename"] for f in second.train_dataset.cache_files] == files
    assert [os.path.getmtime(f) for f in files] == mtimes  # read back, not rewritten
    third = PreferenceDataModule(train_data=path, tokenizer=TOKENIZER_DIR, max_length=33)
    third.setup("fit")
    assert [f["filename"] for f in third.train_dataset.cache_files] != files  # new settings, new cache
