"""Write data/sentiment/: SFT rows of mixed sentiment, prompts for pair sampling and
evaluation (the evaluation prompts never appear in the others).

    python scripts/make_sentiment_data.py      (deterministic)
"""

from __future__ import annotations

import json
from pathlib import Path

from dpo_lightning.experiments.sentiment import eval_rows, prompt_rows, sft_rows

OUT = Path(__file__).resolve().parent.parent / "data" / "sentiment"


def write(name: str, rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write("sft_train.jsonl", sft_rows(3000, seed=0))
    write("sft_val.jsonl", sft_rows(200, seed=1))
    write("pair_prompts.jsonl", prompt_rows(600, seed=2))
    write("eval_prompts.jsonl", eval_rows())  # the 40 held-out prompts
    print(f"wrote {OUT}")
