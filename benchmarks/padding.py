"""How much padding length-grouped batches save on the quickstart data.

    .venv/bin/python benchmarks/padding.py [--batch-size 16]

Prints the share of padded positions in the training batches (the model computes on padding
too) with uniform shuffling and with LengthGroupedSampler, for the same batch size.
"""

from __future__ import annotations

import argparse
import random

from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.data.samplers import LengthGroupedSampler, padding_fraction


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/quickstart/train.jsonl")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    dm = PreferenceDataModule(train_data=args.data, tokenizer=args.tokenizer, batch_size=args.batch_size)
    dm.setup("fit")
    lengths = dm.row_lengths(dm.train_dataset)
    b = args.batch_size
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    uniform = padding_fraction([order[i : i + b] for i in range(0, len(order), b)], lengths)
    grouped_order = list(LengthGroupedSampler(lengths, b, seed=0))
    grouped = padding_fraction([grouped_order[i : i + b] for i in range(0, len(grouped_order), b)], lengths)
    print(f"rows {len(lengths)}  batch {b}  (pair width: prompt + longer completion)")
    print(f"padding, uniform shuffle : {uniform:.1%}")
    print(f"padding, length-grouped  : {grouped:.1%}")
    print(f"padded positions removed : {1 - grouped / uniform:.0%}" if uniform else "no padding")


if __name__ == "__main__":
    main()
