"""``dpo-lightning-score``: write ``score_chosen`` / ``score_rejected`` with a trained reward model.

The pipeline reward model -> scores -> ODPO::

    dpo-lightning fit --config recipes/base.yaml --config recipes/reward_model.yaml         # exports outputs/reward_model/model
    dpo-lightning-score --reward_model outputs/reward_model/model \\
        --data data/quickstart/train.jsonl --output outputs/scored/train.jsonl
    dpo-lightning fit --config recipes/base.yaml --config recipes/odpo.yaml --data.init_args.train_data outputs/scored/train.jsonl
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_info

from .console import named_as_options, run_tool
from .contract import BatchLayout, DataRequirements
from .data import PreferenceDataModule, load_rows
from .data.sources import rename_columns
from .models import ModelSpec, load_reward_model, load_tokenizer


@torch.no_grad()
def score_pairs(
    reward_model: str,
    data: str | list[str],
    output: str,
    dataset_config: str | None = None,
    split: str = "train",
    max_length: int = 1024,
    max_prompt_length: int | None = None,
    batch_size: int = 16,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    columns: dict[str, str] | None = None,
) -> Path:
    """Score every pair of ``data`` with ``reward_model`` and write them with two new columns.

    Rows are tokenized exactly as for training (same BOS/EOS and truncation rules). Rows that
    cannot be used are left out of ``output`` and listed in the printed report. A NaN or
    infinite reward is an error naming the rows; ``output`` is written whole or not at all.

    Args:
        reward_model: folder exported by ``RewardModule`` (or a hub id of a sequence classifier).
        data: hub dataset name or local .json/.jsonl/.parquet/.csv file(s) with prompt/chosen/rejected.
        output: where to write; ``.parquet`` or ``.csv`` by extension, JSON lines otherwise.
        dataset_config / split: for a hub dataset.
        max_length / max_prompt_length: tokenization limits (see dpo_lightning.data.tokenization).
        batch_size: pairs per forward pass.
        trust_remote_code: run modelling code shipped with the checkpoint.
        overwrite: replace an existing ``output``.
        columns: rename the data's columns to ``prompt``/``chosen``/``rejected``, e.g.
            ``{question: prompt}`` (as ``data.init_args.columns`` in a recipe); ``output`` holds the
            renamed columns.
    Returns:
        The path written.
    """
    target = Path(output)
    if target.exists() and not overwrite:
        raise FileExistsError(f"--output {output!r} exists; pass --overwrite true or choose another path")
    spec = ModelSpec(name_or_path=reward_model, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(spec, option="--reward_model")
    with named_as_options(SCORE_OPTIONS):  # the data first: a bad file fails before the model loads
        dm = PreferenceDataModule(
            train_data=data, dataset_config=dataset_config, train_split=split, max_length=max_length,
            max_prompt_length=max_prompt_length, batch_size=batch_size, columns=columns,
        )
        dm.connect(tokenizer, DataRequirements(BatchLayout.PAIRS))
        dm.setup("fit")
    assert dm.train_dataset is not None
    model = load_reward_model(spec, tokenizer, option="--reward_model").eval()
    loader = dm.ordered_loader("train")
    chosen: list[float] = []
    rejected: list[float] = []
    for batch in loader:
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
        b = batch["row_id"].numel()
        chosen += rewards[:b].tolist()
        rejected += rewards[b:].tolist()
    row_ids = list(dm.train_dataset["row_id"])
    check_finite_rewards(chosen, rejected, row_ids, reward_model)
    rows = load_rows(data, key="--data", config=dataset_config, split=split)
    rows = rename_columns(rows, dict(columns or {}), "--columns", "--data").select(row_ids)
    rows = rows.remove_columns([c for c in ("score_chosen", "score_rejected") if c in rows.column_names])
    rows = rows.add_column("score_chosen", chosen).add_column("score_rejected", rejected)
    write_rows(rows, target)
    rank_zero_info(f"wrote {len(rows)} scored pairs to {target.resolve()}")
    return target


#: the data module's recipe keys and the options of ``dpo-lightning-score`` that set them
SCORE_OPTIONS = {
    "data.init_args.train_data": "--data", "data.init_args.train_split": "--split",
    "data.init_args.dataset_config": "--dataset_config", "data.init_args.columns": "--columns",
    "data.init_args.max_prompt_length": "--max_prompt_length", "data.init_args.max_length": "--max_length",
    "data.init_args.batch_size": "--batch_size",
}


def check_finite_rewards(chosen: list[float], rejected: list[float], row_ids: list[int], reward_model: str) -> None:
    """Refuse NaN or infinite rewards (a reward model that overflowed, e.g. in float16), naming
    the source rows: written out, they would reach ODPO as offsets of NaN."""
    bad = [(row, c, r) for row, c, r in zip(row_ids, chosen, rejected) if not (math.isfinite(c) and math.isfinite(r))]
    if bad:
        shown = ", ".join(f"row {row}: chosen {c}, rejected {r}" for row, c, r in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(
            f"--reward_model {reward_model!r} gave non-finite rewards for {len(bad)} pair(s) ({shown}{more}); "
            "nothing was written. Check the model (load it in float32, look at those rows) and score again"
        )


def write_rows(rows: datasets.Dataset, target: Path) -> None:
    """Write ``rows`` to ``target`` (Parquet, CSV or JSON lines by its extension) through a
    temporary sibling renamed into place: a run killed while writing leaves no file cut at a row
    boundary that would later read as fewer rows."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        if target.suffix == ".parquet":
            rows.to_parquet(str(tmp))
        elif target.suffix == ".csv":
            rows.to_csv(str(tmp), index=False)
        else:
            rows.to_json(str(tmp), lines=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def main() -> None:
    """Console-script entry point ``dpo-lightning-score``: an error is one line on stderr and
    exit status 1 (:func:`~.console.run_tool`)."""
    run_tool(score_pairs)


if __name__ == "__main__":
    main()
