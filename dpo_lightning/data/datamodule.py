"""``PreferenceDataModule``: load, validate, tokenize once, collate preference pairs."""

from __future__ import annotations


import datasets
import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..models import ModelSpec, load_tokenizer

from .collator import PairCollator
from .loading import load_rows
from .report import DataReport
from .samplers import LengthGroupedSampler, ResumableSampler
from .tokenization import PAIR_FIELDS, PairTokenizer, TokenizationSettings, TruncationMode


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs (``prompt``, ``chosen``, ``rejected`` strings) for pairwise losses.

    The tokenizer and the columns the loss needs are taken from the LightningModule it is
    trained with (its ``tokenizer`` and ``loss.score_columns``), so a recipe names the
    tokenizer once. Pass ``tokenizer`` here only to use the data module on its own.

    Args:
        train_data: hub dataset name, local folder, or local .json/.jsonl/.parquet/.csv file(s).
        val_data: same kinds; ``None`` with ``val_fraction`` splits it off ``train_data``.
        dataset_config: hub dataset configuration name.
        train_split / val_split: splits to read from a hub name or folder.
        val_fraction: fraction of ``train_data`` held out for validation (seeded by ``split_seed``).
        max_rows: read at most this many rows per split (quick runs).
        tokenizer: tokenizer id or folder, only for standalone use.
        max_length / max_prompt_length / truncation_mode: see :mod:`.tokenization`.
        batch_size: pairs per training batch (the model sees ``2 * batch_size`` sequences).
        eval_batch_size: pairs per validation batch; defaults to ``batch_size``.
        num_workers: DataLoader workers.
        num_proc: processes for ``datasets.map`` tokenization.
        strict: raise on the first unusable row instead of dropping and counting it.
        shuffle_seed: seed for the training order.
        group_by_length: batch rows of similar length together (:class:`LengthGroupedSampler`),
            which cuts padding; ``False`` shuffles uniformly.
    """

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
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if val_fraction is not None and val_data is not None:
            raise ValueError("data: set either val_data or val_fraction, not both")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
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
        self.score_columns: tuple[str, ...] = ()
        self.carried_columns: tuple[str, ...] = ()  # per-pair floats added after setup (reference log-probs)
        self.data_fingerprint: str | None = None
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.reports: dict[str, DataReport] = {}

    # -- late binding -------------------------------------------------------------------
    def _bind_to_module(self) -> None:
        """Take the tokenizer and the loss's needs from the attached LightningModule."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and getattr(module, "tokenizer", None) is not None:
            self.tokenizer = module.tokenizer
        elif self.tokenizer is None:
            if self.tokenizer_name is None:
                raise ValueError("data.tokenizer is required when the data module is used without a model")
            self.tokenizer = load_tokenizer(ModelSpec(name_or_path=self.tokenizer_name))
        loss = getattr(module, "loss", None)
        if loss is not None:
            if loss.paired != self.paired:
                kind = "pairs" if loss.paired else "unpaired rows"
                fix = "PreferenceDataModule" if loss.paired else "UnpairedDataModule"
                raise ValueError(
                    f"{type(loss).__name__} trains on {kind} but data is {type(self).__name__}; "
                    f"set data.class_path: dpo_lightning.data.{fix}"
                )
            self.score_columns = tuple(loss.score_columns)

    # -- setup --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self._bind_to_module()
        train_rows = self.prepare_rows(load_rows(
            self.train_data, key="data.train_data", config=self.dataset_config,
            split=self.train_split, max_rows=self.max_rows,
        ), "data.train_data")
        if self.val_fraction is not None:
            parts = train_rows.train_test_split(test_size=self.val_fraction, seed=self.split_seed)
            train_rows, val_rows = parts["train"], parts["test"]
        elif self.val_data is not None:
            val_rows = self.prepare_rows(load_rows(
                self.val_data, key="data.val_data", config=self.dataset_config,
                split=self.val_split, max_rows=self.max_rows,
            ), "data.val_data")
        else:
            val_rows = None
        self.train_dataset = self.tokenize(train_rows, "train", key="data.train_data")
        self.data_fingerprint = self.train_dataset._fingerprint  # before any column is attached
        self.val_dataset = self.tokenize(val_rows, "val", key="data.val_data") if val_rows is not None else None
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is not None:
            logger.log_hyperparams({k: v for r in self.reports.values() for k, v in r.as_dict().items()})

    # -- what differs between pairs and unpaired rows (overridden by UnpairedDataModule) ------
    paired = True
    text_fields: tuple[str, ...] = PAIR_FIELDS
    optional_field: str | None = "prompt"
    completion_fields: tuple[str, ...] = ("chosen_ids", "rejected_ids")

    def prepare_rows(self, rows: datasets.Dataset, key: str) -> datasets.Dataset:
        """Hook to convert a source's rows to this module's schema before validation."""
        return rows

    def row_function(self, rows: datasets.Dataset) -> PairTokenizer:
        assert self.tokenizer is not None
        has_prompt = "prompt" in rows.column_names
        if not has_prompt:
            rank_zero_info("no `prompt` column: each prompt is the common prefix of chosen and rejected")
        return PairTokenizer(self.tokenizer, self.settings, self.score_columns, has_prompt=has_prompt)

    def collator(self) -> PairCollator:
        assert self.tokenizer is not None
        return PairCollator(self.tokenizer.pad_token_id, score_columns=self.score_columns + self.carried_columns)

    def check_columns(self, rows: datasets.Dataset, key: str) -> None:
        """Fail at setup, naming the key and the columns, when a required column is absent.
        (``prompt`` may be absent for pairs: it is then the common prefix.)"""
        needed = tuple(c for c in self.text_fields if c in rows.column_names or c != self.optional_field)
        needed += self.score_columns
        missing = [c for c in needed if c not in rows.column_names]
        if missing:
            raise ValueError(
                f"{key}: column(s) {missing} missing; found {rows.column_names}. This data module "
                f"needs {list(needed)} (rename columns with Dataset.rename_column, or add the scores)"
            )

    def tokenize(self, rows: datasets.Dataset, split: str, key: str) -> datasets.Dataset:
        """Tokenize once with ``datasets.map`` (fingerprint-cached), record and drop bad rows."""
        assert self.tokenizer is not None
        self.check_columns(rows, key)
        keep = list(self.score_columns)
        tokenized = rows.map(
            self.row_function(rows),
            with_indices=True,
            remove_columns=[c for c in rows.column_names if c not in keep],
            num_proc=self.num_proc,
            desc=f"tokenizing {split}",
        )
        report = DataReport(split=split, rows_read=len(rows))
        reasons = tokenized["drop_reason"]
        row_ids = tokenized["row_id"]
        for reason, row_id in zip(reasons, row_ids):
            if reason:
                if self.strict:
                    raise ValueError(
                        f"{key}: row {row_id} is unusable ({reason}); fix or remove it, or set data.strict: false to drop and count such rows"
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
        """Length-grouped (default) or uniformly shuffled order, split across DDP ranks; after a
        resume from a mid-epoch checkpoint it skips the batches that epoch already trained on."""
        assert self.train_dataset is not None, "call setup() first"
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self.group_by_length:
            sampler: ResumableSampler = LengthGroupedSampler(
                self.row_lengths(self.train_dataset), self.batch_size, world, rank, seed=self.shuffle_seed
            )
        else:
            sampler = ResumableSampler(len(self.train_dataset), self.batch_size, world, rank, seed=self.shuffle_seed)
        if self.trainer is not None and self.trainer.fit_loop.restarting:
            # batches whose training step finished before the checkpoint (saved in on_train_batch_end)
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if 0 < done < len(sampler) // self.batch_size:
                sampler.set_epoch(self.trainer.current_epoch)
                sampler.skip_batches(done)
                rank_zero_info(f"resuming epoch {self.trainer.current_epoch} after its first {done} batches")
        return sampler

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset, batch_size=self.batch_size, sampler=self.train_sampler(),
            collate_fn=self.collator(), num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return DataLoader(
            self.val_dataset, batch_size=self.eval_batch_size, shuffle=False,
            collate_fn=self.collator(), num_workers=self.num_workers,
        )



