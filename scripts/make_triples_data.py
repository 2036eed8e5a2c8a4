"""Generate the TPO triples shipped in data/triples/ from the quickstart pairs.

Each quickstart pair (a review praising a product, the same review with negative words) gets a
gold completion, the best review the task has: the product with its two strongest positive
words (``superb``, ``brilliant``; see scripts/make_quickstart_data.py). So chosen is good, gold
is better, rejected is bad. Deterministic: `python scripts/make_triples_data.py` rewrites
data/triples/*.jsonl byte for byte (the first 300 train and 50 val pairs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the quickstart prompt templates, each naming one product
PRODUCT = re.compile(r"(?:of the|the|this) (\w+)(?: you bought last month)?[.?]$")
SIZES = {"train": 300, "val": 50}


def gold(prompt: str) -> str:
    match = PRODUCT.search(prompt)
    if match is None:
        raise ValueError(f"no product in prompt {prompt!r}")
    return f" The {match.group(1)} is superb and brilliant. I love it."


def main() -> None:
    out = ROOT / "data" / "triples"
    out.mkdir(parents=True, exist_ok=True)
    for split, size in SIZES.items():
        lines = (ROOT / "data" / "quickstart" / f"{split}.jsonl").read_text().splitlines()[:size]
        rows = []
        for line in lines:
            row = json.loads(line)
            rows.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"], "gold": gold(row["prompt"])})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
