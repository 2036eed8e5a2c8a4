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
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..console import quiet_datasets
from ..contract import BatchLayout, DataRequirements, PairRows
from ..models import ModelSpec, load_tokenizer, ready_tokenizer
from .formats import TEXT_FIELDS
from .loader import ResumableDataLoader
from .map_cache import checked_map
from .loading import describe, load_rows
from .sources import (
    DataSpec, as_sources, check_column_case, check_source, combine, first_rows_by_kind, mixed_kinds_message,
    rename_columns, sample_rows,
)
from .report import DataReport, SourceCount
from .scores import check_finite
from .samplers import PROMPT_PLUS_BOTH, PROMPT_PLUS_LONGEST, LengthGroupedSampler, ResumableSampler
from .tokenization import RowEncoder, TokenizationSettings, TruncationMode, check_template_kwargs

quiet_datasets()

#: where the data module's arguments sit in a recipe, named in errors
DATA_KEY = "data.init_args"


def datamodule_class(layout: BatchLayout) -> type[TokenizedDataModule] | None:
    """The data module class that produces ``layout`` (the first declaring it, nearest the base
    first), or ``None``."""
    pending = list(TokenizedDataModule.__subclasses__())
    while pending:
        cls = pending.pop(0)
        if cls.__dict__.get("layout") == layout or layout in cls.__dict__.get("layouts", ()):
            return cls
        pending += cls.__subclasses__()
    return None


def datamodule_for(layout: BatchLayout) -> str:
    """The name of the data module class that produces ``layout`` (for error messages)."""
    cls = datamodule_class(layout)
    return cls.__name__ if cls is not None else "a data module with that layout"


class TokenizedDataModule(L.LightningDataModule):
    """Shared machinery of :class:`PreferenceDataModule`, :class:`UnpairedDataModule` and
    :class:`SFTDataModule`. A subclass declares its ``layout``, the row fields it reads and how
    a row becomes ids (:meth:`row_encoder`) and rows become a batch (:meth:`collator`).

    Args:
        train_data: a hub dataset id, a local folder, local .json/.jsonl/.parquet/.csv file(s) or
            globs, or a weighted mixture (a list of ``{path, fraction | rows, split, config,
            data_dir, columns}``, see :class:`~.sources.DataSource`); from Python also a
            ``datasets.Dataset``, a ``DatasetDict`` (split picked by ``train_split``) or a list
            of row dicts. See :mod:`.loading`.
        val_data: same kinds; ``None`` with ``val_fraction`` splits it off ``train_data``.
        dataset_config: hub dataset configuration name.
        train_split / val_split: splits to read from a hub id, folder or ``DatasetDict``; may be
            sliced (``train[:10%]``, ``train[100:200]``), which also applies to files.
        val_fraction: fraction of ``train_data`` held out for validation (seeded by ``split_seed``).
        split_seed: seed of the ``val_fraction`` split and of the weighted sources' sampling.
        max_rows: read at most this many rows per split (quick runs); with weighted sources,
            at most this many from each source.
        tokenizer: tokenizer id or folder, or a loaded tokenizer, only for standalone use (no
            :meth:`connect` call).
        max_length / max_prompt_length / truncation_mode: see :mod:`.tokenization`.
        batch_size: rows per training batch (a pair counts once; the model sees its two sequences).
        eval_batch_size: rows per validation batch; defaults to ``batch_size``.
        num_workers: DataLoader workers.
        num_proc: processes for ``datasets.map`` tokenization.
        strict: raise on the first unusable row instead of dropping and counting it.
        shuffle_seed: seed for the training order.
        group_by_length: batch rows of similar length together (:class:`LengthGroupedSampler`),
            which cuts padding; ``False`` shuffles uniformly.
        columns: rename source columns to the canonical names,
            ``{question: prompt, response_j: chosen, response_k: rejected}``; a column named here
            that the data lacks is an error.
        data_dir: the hub dataset's (or folder's) data folder, passed to ``datasets.load_dataset``.
        chat_template_kwargs: extra variables for the chat template, passed to every
            ``apply_chat_template`` call (e.g. ``{enable_thinking: false}``); part of the
            tokenization cache key.
        tools: tool (function) schemas passed to every ``apply_chat_template`` call as ``tools``.
    """

    #: the batch layout this module's collator produces
    layout: ClassVar[BatchLayout]
    #: row fields read from the source; ``optional_field`` may be absent (then derived)
    text_fields: ClassVar[tuple[str, ...]]
    optional_field: ClassVar[str | None] = None
    #: other source fields this module reads and converts (:meth:`prepare_rows`, the encoder)
    convertible_fields: ClassVar[tuple[str, ...]] = ()
    #: tokenized columns holding completion ids (for length statistics and grouping)
    completion_fields: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        train_data: DataSpec,
        val_data: DataSpec | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str = "test",
        val_fraction: float | None = None,
        split_seed: int = 0,
        max_rows: int | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
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
        columns: dict[str, str] | None = None,
        data_dir: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise ValueError(f"data.init_args.val_fraction must be in (0, 1), got {val_fraction}")
        if val_fraction is not None and val_data is not None:
            raise ValueError("data.init_args: set either val_data or val_fraction, not both")
        if batch_size < 1:
            raise ValueError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"data.init_args.eval_batch_size must be >= 1 (or null for batch_size), got {eval_batch_size}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"data.init_args.max_rows must be >= 1 (or null for every row), got {max_rows}")
        if num_workers < 0:
            raise ValueError(f"data.init_args.num_workers must be >= 0, got {num_workers}")
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            as_sources(data, f"{DATA_KEY}.{name}")  # a bad weight or key fails here, not at setup
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
        if columns is not None and not (
            isinstance(columns, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items())
        ):
            raise ValueError(f"{DATA_KEY}.columns must map column names to column names, e.g. {{question: prompt}}; got {columns!r}")
        self.column_map = dict(columns or {})
        self.data_dir = data_dir
        self.chat_template_kwargs = check_template_kwargs(chat_template_kwargs, f"{DATA_KEY}.chat_template_kwargs")
        self.tools = list(tools) if tools else None
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
        limit = requirements.max_positions
        if limit is not None and self.settings.max_length > limit:
            raise ValueError(
                f"data.init_args.max_length is {self.settings.max_length} but the model attends over at most {limit} "
                f"positions (its config's max_position_embeddings); longer rows would fail inside the model. "
                f"Set data.init_args.max_length <= {limit}"
            )
        if self.splits and (tokenizer is not self.tokenizer or requirements != self.requirements):
            self.splits, self.reports, self.added_columns = {}, {}, ()  # tokenized for another model
        self.tokenizer = tokenizer
        self.requirements = requirements

    def fingerprint(self) -> dict[str, str]:
        """``{"train_data": data_fingerprint}`` once ``setup`` has tokenized the training split
        (what decides the training rows: the ``datasets`` fingerprint of the tokenized split,
        which covers source, rows and tokenization settings; a subclass may add to it); ``{}``
        before. Part of the run fingerprint a checkpoint stores."""
        return {"train_data": self.data_fingerprint} if self.data_fingerprint else {}

    @property
    def batch_columns(self) -> tuple[str, ...]:
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
            given = self.tokenizer_name
            if isinstance(given, PreTrainedTokenizerBase):
                self.connect(ready_tokenizer(given, type(given).__name__))
            else:
                self.connect(load_tokenizer(ModelSpec(name_or_path=given)))
        train_key, val_key = f"{DATA_KEY}.train_data", f"{DATA_KEY}.val_data"
        train_rows, train_sources = self.load_split(self.train_data, train_key, self.train_split)
        val_rows, val_sources = None, []
        if self.val_fraction is not None:
            parts = train_rows.train_test_split(  # indices written afresh, never read from an old file
                test_size=self.val_fraction, seed=self.split_seed, load_from_cache_file=False
            )
            train_rows, val_rows = parts["train"], parts["test"]
        elif self.val_data is not None:
            val_rows, val_sources = self.load_split(self.val_data, val_key, self.val_split)
        self.splits["train"] = self.tokenize(train_rows, "train", key=train_key, sources=train_sources)
        self.data_fingerprint = self.splits["train"]._fingerprint  # before any column is added
        if val_rows is not None:
            self.splits["val"] = self.tokenize(val_rows, "val", key=val_key, sources=val_sources)
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

    # -- loading -------------------------------------------------------------------------
    def load_split(self, data: DataSpec, key: str, split: str) -> tuple[datasets.Dataset, list[SourceCount]]:
        """Rows of one split in this module's schema, and (for a weighted mixture) how many rows
        each source gave.

        Each source is read (:func:`.loading.load_rows`), renamed (its own ``columns``, then
        ``data.init_args.columns``), checked (no ``Prompt``-for-``prompt`` column, one kind of
        row), sampled (``fraction`` / ``rows``, seeded by ``split_seed``) and converted
        (:meth:`prepare_rows`); the sources are then concatenated in order.
        """
        sources = as_sources(data, key)
        if sources is None:
            rows = load_rows(data, key=key, config=self.dataset_config, split=split, max_rows=self.max_rows,
                             data_dir=self.data_dir)
            rows, _ = self.checked_source(rows, key, describe(data))
            return self.prepare_rows(rows, key), []
        parts, counts, kinds = [], [], []
        for i, source in enumerate(sources):
            where = f"{key}[{i}]"
            check_source(source, where)
            rows = load_rows(
                source.path, key=f"{where}.path", config=source.config or self.dataset_config,
                split=source.split or split, data_dir=source.data_dir or self.data_dir,
            )
            rows = rename_columns(rows, source.columns, f"{where}.columns", source.describe())
            rows, kind = self.checked_source(rows, where, source.describe())
            kinds.append(kind)
            taken = sample_rows(rows, source, self.split_seed, where)
            if self.max_rows is not None and len(taken) > self.max_rows:
                taken = taken.select(range(self.max_rows))
            counts.append(SourceCount(source.describe(), len(rows), len(taken)))
            taken = self.prepare_rows(taken, where)
            self.check_columns(taken, where)
            parts.append(taken.select_columns([c for c in taken.column_names if c in self.source_columns()]))
        self.check_sources_agree(kinds, sources, key)
        return combine(parts, [s.describe() for s in sources], key), counts

    def checked_source(self, rows: datasets.Dataset, key: str, name: str) -> tuple[datasets.Dataset, dict[str, int]]:
        """``rows`` renamed by ``data.init_args.columns``, after checking that no column is named
        like a canonical one but for case, and that the rows are of one kind; with the first
        row of that kind (:func:`.sources.first_rows_by_kind`)."""
        rows = rename_columns(rows, self.column_map, f"{DATA_KEY}.columns", f"{key} ({name})")
        check_column_case(rows, self.source_columns(), key)
        text_fields = tuple(c for c in self.source_columns() if c in TEXT_FIELDS)
        return rows, first_rows_by_kind(rows, key, text_fields)

    def source_columns(self) -> tuple[str, ...]:
        """The source columns this module reads: its fields, the ones it converts from
        (:attr:`convertible_fields`) and the loss's columns."""
        return self.text_fields + self.convertible_fields + self.requirements.columns

    @staticmethod
    def check_sources_agree(kinds: list[dict[str, int]], sources: list, key: str) -> None:
        """The sources of a mixture are all plain strings or all conversations."""
        def first(kind: str) -> str | None:
            for i, found in enumerate(kinds):
                if kind in found:
                    return f"row {found[kind]} of {key}[{i}] ({sources[i].describe()})"
            return None

        text, conversation = first("text"), first("conversation")
        if text is not None and conversation is not None:
            raise ValueError(mixed_kinds_message(key, text, conversation))

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

    def needed_columns(self, rows: datasets.Dataset) -> tuple[str, ...]:
        """The text columns ``rows`` must hold for this layout (the optional one only if present)."""
        return tuple(c for c in self.text_fields if c in rows.column_names or c != self.optional_field)

    def columns_hint(self) -> str:
        """What this layout reads, for the missing-column error."""
        optional = f" ({self.optional_field!r} optional)" if self.optional_field else ""
        return f"{type(self).__name__} reads {list(self.text_fields)}{optional}"

    def check_columns(self, rows: datasets.Dataset, key: str) -> None:
        """Fail at setup, naming the key and the columns, when a required column is absent; the
        fix depends on the column (rename a text column, add the loss's scores)."""
        text = [c for c in self.needed_columns(rows) if c not in rows.column_names]
        scores = [c for c in self.requirements.columns if c not in rows.column_names]
        if not text and not scores:
            return
        fixes = []
        if text:
            mapping = f"{key}.columns" if key.endswith("]") else f"{DATA_KEY}.columns"  # a weighted source's own
            fixes.append(
                f"{self.columns_hint()}: rename the data's columns with {mapping}, e.g. {{your_name: {text[0]}}}"
            )
        if scores:
            fixes.append(
                f"the loss reads {list(self.requirements.columns)} from every row: add the scores "
                "(dpo-lightning-score writes score_chosen / score_rejected with a reward model)"
            )
        raise ValueError(
            f"{key}: column(s) {text + scores} missing; found {rows.column_names}. " + "; ".join(fixes)
        )

    def encoder_options(self) -> dict[str, Any]:
        """Keyword arguments every :class:`RowEncoder` of this module gets (chat template options)."""
        return {"chat_template_kwargs": self.chat_template_kwargs, "tools": self.tools}

    # -- tokenization -------------------------------------------------------------------
    def tokenize(
        self, rows: datasets.Dataset, split: str, key: str, sources: list[SourceCount] | None = None
    ) -> datasets.Dataset:
        """Tokenize once with ``datasets.map`` (fingerprint-cached), record and drop bad rows.

        Args:
            rows: the split's rows in this module's schema.
            split: ``"train"`` / ``"val"``.
            key: the config key the rows came from (named in errors).
            sources: rows per source of a weighted mixture, recorded in the report.
        """
        self.check_columns(rows, key)
        for column in self.requirements.columns:
            check_finite(rows, column, key)
        keep = list(self.requirements.columns)
        tokenized = checked_map(
            rows,
            self.row_encoder(rows),
            with_indices=True,
            remove_columns=[c for c in rows.column_names if c not in keep],
            num_proc=self.num_proc,
            desc=f"tokenizing {split}",
        )
        report = DataReport(split=split, rows_read=len(rows), sources=list(sources or []))
        for reason, detail, row_id in zip(tokenized["drop_reason"], tokenized["drop_detail"], tokenized["row_id"]):
            if reason:
                if self.strict:
                    said = f": {detail}" if detail else ""
                    raise ValueError(
                        f"{key}: row {row_id} is unusable ({reason}{said}); fix or remove it, or set "
                        "data.init_args.strict: false to drop and count such rows"
                    )
                report.record_drop(reason, row_id, detail=detail)
        if report.dropped:  # an in-memory selection: no indices cache file to go stale
            reasons = tokenized.select_columns(["drop_reason"]).with_format("numpy")["drop_reason"]
            kept = tokenized.select(np.flatnonzero(np.asarray(reasons) == "").tolist())
        else:
            kept = tokenized
        report.prompt_lengths = [len(x) for x in kept["prompt_ids"]]
        report.completion_lengths = [len(x) for column in self.completion_fields for x in kept[column]]
        self.reports[split] = report
        rank_zero_info(report.format())
        if len(kept) == 0:
            raise ValueError(f"{key}: no usable rows left after validation; see the report above")
        return kept.remove_columns(["drop_reason", "drop_detail"])

    # -- loaders ------------------------------------------------------------------------
    def row_lengths(self, rows: datasets.Dataset) -> list[int]:
        """Padded width each row needs as the model will run it: prompt + its longest
        completion, or prompt + both completions where the training module runs each pair as
        one row (``requirements.pair_rows``, see :meth:`pairs_share_rows`)."""
        prompts = rows["prompt_ids"]
        widths = [[len(x) for x in rows[c]] for c in self.completion_fields]
        combine = sum if self.pairs_share_rows() else max
        return [len(p) + combine(w[i] for w in widths) for i, p in enumerate(prompts)]

    def pairs_share_rows(self) -> bool:
        """Whether the training module runs each pair as one ``[prompt; chosen; rejected]`` row:
        ``requirements.pair_rows`` ``SHARED``, or ``SHARED_ON_CPU`` with the trainer on a CPU."""
        rows = self.requirements.pair_rows
        if rows is PairRows.SHARED_ON_CPU:
            trainer = self.trainer
            return trainer is not None and trainer.strategy.root_device.type == "cpu"
        return rows is PairRows.SHARED

    def train_sampler(self) -> ResumableSampler:
        """Length-grouped (default) or uniformly shuffled order, split across DDP ranks, a
        function of ``(shuffle_seed, epoch)`` only."""
        assert self.train_dataset is not None, "call setup() first"
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self.group_by_length:
            sampler: ResumableSampler = LengthGroupedSampler(
                self.row_lengths(self.train_dataset), self.batch_size, world, rank, seed=self.shuffle_seed,
                width=PROMPT_PLUS_BOTH if self.pairs_share_rows() else PROMPT_PLUS_LONGEST,
            )
        else:
            sampler = ResumableSampler(len(self.train_dataset), self.batch_size, world, rank, seed=self.shuffle_seed)
        return sampler

    def train_dataloader(self) -> ResumableDataLoader:
        """The training loader; stateful, so a resumed run continues mid-epoch (:mod:`.loader`)."""
        sampler = self.train_sampler()
        return ResumableDataLoader(
            self.train_dataset, batch_size=self.batch_size, sampler=sampler,
            collate_fn=self.collator(), num_workers=self.num_workers, drop_last=self.drop_last_train_batch(len(sampler)),
        )

    def drop_last_train_batch(self, rows_per_epoch: int) -> bool:
        """Whether the last, short training batch is left out (a layout that cannot use it);
        ``rows_per_epoch``: this process's rows an epoch (the sampler's length)."""
        return False

    def ordered_loader(self, split: str) -> DataLoader:
        """``split`` in row order, ``eval_batch_size`` rows a batch (validation, precomputation)."""
        return DataLoader(
            self.splits[split], batch_size=self.eval_batch_size, shuffle=False,
            collate_fn=self.collator(), num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self.ordered_loader("val") if "val" in self.splits else []
