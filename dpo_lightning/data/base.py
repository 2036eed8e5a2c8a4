"""``TokenizedDataModule``: load rows, tokenize once, report drops, batch them; one subclass per
batch layout (:class:`~dpo_lightning.contract.BatchLayout`).

The data module knows nothing of the training module. It is told what it needs in one call,
:meth:`TokenizedDataModule.connect`, before ``trainer.fit`` / ``validate``::

    datamodule.connect(module.tokenizer, module.data_requirements)

(the CLI makes it; Python users make the same call). Used on its own, a data module given
``tokenizer=`` connects itself with its layout's plain requirements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import datasets
import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..contract import BatchLayout, DataRequirements
from ..models import ModelSpec, load_tokenizer
from .loader import ResumableDataLoader
from .loading import load_rows
from .report import DataReport
from .samplers import LengthGroupedSampler, ResumableSampler
from .tokenization import RowEncoder, TokenizationSettings, TruncationMode


def datamodule_for(layout: BatchLayout) -> str:
    """The name of the data module class that produces ``layout`` (for error messages)."""
    pending = list(TokenizedDataModule.__subclasses__())
    while pending:
        cls = pending.pop(0)
        if cls.__dict__.get("layout") == layout:
            return cls.__name__
        pending += cls.__subclasses__()
    return "a data module with that layout"


class TokenizedDataModule(L.LightningDataModule):
    """Shared machinery of :class:`PreferenceDataModule`, :class:`UnpairedDataModule` and
    :class:`SFTDataModule`. A subclass declares its ``layout``, the row fields it reads and how
    a row becomes ids (:meth:`row_encoder`) and rows become a batch (:meth:`collator`).

    Args:
        train_data: hub dataset name, local folder, or local .json/.jsonl/.parquet/.csv file(s).
        val_data: same kinds; ``None`` with ``val_fraction`` splits it off ``train_data``.
        dataset_config: hub dataset configuration name.
        train_split / val_split: splits to read from a hub name or folder.
        val_fraction: fraction of ``train_data`` held out for validation (seeded by ``split_seed``).
        max_rows: read at most this many rows per split (quick runs).
        tokenizer: tokenizer id or folder, only for standalone use (no :meth:`connect` call).
        max_length / max_prompt_length / truncation_mode: see :mod:`.tokenization`.
        batch_size: rows per training batch (a pair counts once; the model sees its two sequences).
        eval_batch_size: rows per validation batch; defaults to ``batch_size``.
        num_workers: DataLoader workers.
        num_proc: processes for ``datasets.map`` tokenization.
        strict: raise on the first unusable row instead of dropping and counting it.
        shuffle_seed: seed for the training order.
        group_by_length: batch rows of similar length together (:class:`LengthGroupedSampler`),
            which cuts padding; ``False`` shuffles uniformly.
    """

    #: the batch layout this module's collator produces
    layout: ClassVar[BatchLayout]
    #: row fields read from the source; ``optional_field`` may be absent (then derived)
    text_fields: ClassVar[tuple[str, ...]]
    optional_field: ClassVar[str | None] = None
    #: tokenized columns holding completion ids (for length statistics and grouping)
    completion_fields: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        train_data: str | list[str],
        val_data: str | list[str] | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str = "test",
        val_fraction: float | None = None,
        split_seed: int = 0,
        max_rows: int | None = None,
        tokenizer: str | None = None,
        max_length: int = 1024,
        max_prompt_length: int | None = None,
        truncation_mode: TruncationMode = "keep_end",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        strict: bool = False,
        shuffle_seed: int = 0,
        group_by_length: bool = True,
    ) -> None:
        super().__init__()
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise ValueError(f"data.init_args.val_fraction must be in (0, 1), got {val_fraction}")
        if val_fraction is not None and val_data is not None:
            raise ValueError("data.init_args: set either val_data or val_fraction, not both")
        if batch_size < 1:
            raise ValueError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        self.train_data = train_data
        self.val_data = val_data
        self.dataset_config = dataset_config
        self.train_split = train_split
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.max_rows = max_rows
        self.tokenizer_name = tokenizer
        self.settings = TokenizationSettings(max_length, max_prompt_length, truncation_mode)
        self.settings.validate()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.strict = strict
        self.shuffle_seed = shuffle_seed
        self.group_by_length = group_by_length
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.requirements = DataRequirements(self.layout)
        self.added_columns: tuple[str, ...] = ()
        self.data_fingerprint: str | None = None
        self.splits: dict[str, datasets.Dataset] = {}
        self.reports: dict[str, DataReport] = {}

    # -- the contract -------------------------------------------------------------------
    def connect(self, tokenizer: PreTrainedTokenizerBase, requirements: DataRequirements | None = None) -> None:
        """Take the model's tokenizer and what its loss needs; call before ``setup``.

        Args:
            tokenizer: the training module's tokenizer (``module.tokenizer``).
            requirements: ``module.data_requirements``; ``None`` means this module's layout
                with no extra columns.
        Raises:
            ValueError: the requirements ask for a layout this module does not produce.
        """
        requirements = requirements or DataRequirements(self.layout)
        if requirements.layout != self.layout:
            raise ValueError(
                f"the model trains on batches laid out as {requirements.layout.value!r} but the data module "
                f"{type(self).__name__} produces {self.layout.value!r}; set data.class_path: "
                f"dpo_lightning.data.{datamodule_for(requirements.layout)}"
            )
        if self.splits and (tokenizer is not self.tokenizer or requirements != self.requirements):
            self.splits, self.reports, self.added_columns = {}, {}, ()  # tokenized for another model
        self.tokenizer = tokenizer
        self.requirements = requirements

    @property
    def columns(self) -> tuple[str, ...]:
        """Per-row numeric columns carried into batches: the loss's, then any added ones."""
        return self.requirements.columns + tuple(c for c in self.added_columns if c not in self.requirements.columns)

    # -- setup --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.tokenizer is None:
            if self.tokenizer_name is None:
                raise ValueError(
                    f"{type(self).__name__} has no tokenizer: call datamodule.connect(module.tokenizer, "
                    "module.data_requirements) before trainer.fit (the dpo-lightning CLI does this), or "
                    "set data.init_args.tokenizer to use the data module on its own"
                )
            self.connect(load_tokenizer(ModelSpec(name_or_path=self.tokenizer_name)))
        train_rows = self.prepare_rows(load_rows(
            self.train_data, key="data.init_args.train_data", config=self.dataset_config,
            split=self.train_split, max_rows=self.max_rows,
        ), "data.init_args.train_data")
        if self.val_fraction is not None:
            parts = train_rows.train_test_split(test_size=self.val_fraction, seed=self.split_seed)
            train_rows, val_rows = parts["train"], parts["test"]
        elif self.val_data is not None:
            val_rows = self.prepare_rows(load_rows(
                self.val_data, key="data.init_args.val_data", config=self.dataset_config,
                split=self.val_split, max_rows=self.max_rows,
            ), "data.init_args.val_data")
        else:
            val_rows = None
        self.splits["train"] = self.tokenize(train_rows, "train", key="data.init_args.train_data")
        self.data_fingerprint = self.splits["train"]._fingerprint  # before any column is added
        if val_rows is not None:
            self.splits["val"] = self.tokenize(val_rows, "val", key="data.init_args.val_data")
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is not None:
            logger.log_hyperparams({k: v for r in self.reports.values() for k, v in r.as_dict().items()})

    @property
    def train_dataset(self) -> datasets.Dataset | None:
        return self.splits.get("train")

    @property
    def val_dataset(self) -> datasets.Dataset | None:
        return self.splits.get("val")

    def add_columns(self, split: str, columns: dict[str, Sequence[float]]) -> None:
        """Give every row of ``split`` (``"train"`` / ``"val"``) per-row float columns, in
        row order, carried into its batches from then on (e.g. precomputed reference log-probs).

        Raises:
            ValueError: a column's length differs from the split's row count.
        """
        dataset = self.splits[split]
        for name, values in columns.items():
            if len(values) != len(dataset):
                raise ValueError(f"column {name!r} has {len(values)} values for the {len(dataset)} rows of {split}")
            if name in dataset.column_names:
                dataset = dataset.remove_columns(name)
            dataset = dataset.add_column(name, list(values))
            if name not in self.added_columns:
                self.added_columns += (name,)
        self.splits[split] = dataset

    # -- what a layout defines ------------------------------------------------------------
    def prepare_rows(self, rows: datasets.Dataset, key: str) -> datasets.Dataset:
        """Hook to convert a source's rows to this module's schema before validation."""
        return rows

    def row_encoder(self, rows: datasets.Dataset) -> RowEncoder:
        """The ``datasets.map`` function that turns one row of ``rows`` into ids."""
        raise NotImplementedError

    def collator(self) -> Any:
        """The ``collate_fn`` that turns tokenized rows into one batch of this layout."""
        raise NotImplementedError

    def check_columns(self, rows: datasets.Dataset, key: str) -> None:
        """Fail at setup, naming the key and the columns, when a required column is absent."""
        needed = tuple(c for c in self.text_fields if c in rows.column_names or c != self.optional_field)
        needed += self.requirements.columns
        missing = [c for c in needed if c not in rows.column_names]
        if missing:
            raise ValueError(
                f"{key}: column(s) {missing} missing; found {rows.column_names}. {type(self).__name__} "
                f"needs {list(needed)} (rename columns with Dataset.rename_column, or add the scores)"
            )

    # -- tokenization -------------------------------------------------------------------
    def tokenize(self, rows: datasets.Dataset, split: str, key: str) -> datasets.Dataset:
        """Tokenize once with ``datasets.map`` (fingerprint-cached), record and drop bad rows."""
        self.check_columns(rows, key)
        keep = list(self.requirements.columns)
        tokenized = rows.map(
            self.row_encoder(rows),
            with_indices=True,
            remove_columns=[c for c in rows.column_names if c not in keep],
            num_proc=self.num_proc,
            desc=f"tokenizing {split}",
        )
        report = DataReport(split=split, rows_read=len(rows))
        for reason, row_id in zip(tokenized["drop_reason"], tokenized["row_id"]):
            if reason:
                if self.strict:
                    raise ValueError(
                        f"{key}: row {row_id} is unusable ({reason}); fix or remove it, or set "
                        "data.init_args.strict: false to drop and count such rows"
                    )
                report.record_drop(reason, row_id)
        kept = tokenized.filter(lambda r: r == "", input_columns="drop_reason") if report.dropped else tokenized
        report.prompt_lengths = [len(x) for x in kept["prompt_ids"]]
        report.completion_lengths = [len(x) for column in self.completion_fields for x in kept[column]]
        self.reports[split] = report
        rank_zero_info(report.format())
        if len(kept) == 0:
            raise ValueError(f"{key}: no usable rows left after validation; see the report above")
        return kept.remove_columns("drop_reason")

    # -- loaders ------------------------------------------------------------------------
    def row_lengths(self, rows: datasets.Dataset) -> list[int]:
        """Padded width each row needs: prompt + its longest completion."""
        prompts = rows["prompt_ids"]
        widths = [[len(x) for x in rows[c]] for c in self.completion_fields]
        return [len(p) + max(w[i] for w in widths) for i, p in enumerate(prompts)]

    def train_sampler(self) -> ResumableSampler:
        """Length-grouped (default) or uniformly shuffled order, split across DDP ranks, a
        function of ``(shuffle_seed, epoch)`` only."""
        assert self.train_dataset is not None, "call setup() first"
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self.group_by_length:
            sampler: ResumableSampler = LengthGroupedSampler(
                self.row_lengths(self.train_dataset), self.batch_size, world, rank, seed=self.shuffle_seed
            )
        else:
            sampler = ResumableSampler(len(self.train_dataset), self.batch_size, world, rank, seed=self.shuffle_seed)
        return sampler

    def train_dataloader(self) -> ResumableDataLoader:
        """The training loader; stateful, so a resumed run continues mid-epoch (:mod:`.loader`)."""
        return ResumableDataLoader(
            self.train_dataset, batch_size=self.batch_size, sampler=self.train_sampler(),
            collate_fn=self.collator(), num_workers=self.num_workers, drop_last=self.drop_last_train_batch(),
        )

    def drop_last_train_batch(self) -> bool:
        """Whether the last, short training batch is left out (a layout that cannot use it)."""
        return False

    def ordered_loader(self, split: str) -> DataLoader:
        """``split`` in row order, ``eval_batch_size`` rows a batch (validation, precomputation)."""
        return DataLoader(
            self.splits[split], batch_size=self.eval_batch_size, shuffle=False,
            collate_fn=self.collator(), num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self.ordered_loader("val") if "val" in self.splits else []
