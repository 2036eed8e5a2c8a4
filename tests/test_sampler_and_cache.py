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


def test_a_checkpoint_from_before_widths_were_told_apart_resumes_only_the_old_grouping() -> None:
    """Checkpoints saved before ``grouped_width`` existed grouped by prompt + longest completion:
    they resume a run that still does, and are refused by one that groups shared rows."""
    from dpo_lightning.data.loader import ResumableDataLoader
    from dpo_lightning.data.samplers import PROMPT_PLUS_BOTH, PROMPT_PLUS_LONGEST

    def loader(width: str) -> ResumableDataLoader:
        sampler = LengthGroupedSampler(list(range(1, 33)), batch_size=4, width=width)
        return ResumableDataLoader(list(range(32)), batch_size=4, sampler=sampler)

    old_state = {"epoch": 0, "batches_consumed": 3, "batch_size": 4, "seed": 0, "world_size": 1, "rows": 32,
                 "group_by_length": True}
    resumed = loader(PROMPT_PLUS_LONGEST)
    resumed.load_state_dict(old_state)
    assert resumed.resume == (0, 3) and len(list(resumed)) == 8 - 3
    assert loader(PROMPT_PLUS_BOTH).state_dict()["grouped_width"] == PROMPT_PLUS_BOTH
    with pytest.raises(ValueError, match=r"share_prompt .*checkpoint 'prompt \+ longest completion', now 'prompt \+ both"):
        loader(PROMPT_PLUS_BOTH).load_state_dict(old_state)
