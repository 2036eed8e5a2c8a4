"""Data: loading, tokenization, collation and the LightningDataModules (one per batch layout)."""

from .base import TokenizedDataModule
from .collator import PairCollator, pad_sequences
from .datamodule import PreferenceDataModule
from .loading import load_rows
from .prompts import PromptCollator, PromptDataModule, PromptEncoder
from .report import DROP_REASONS, DataReport, SourceCount
from .sft import CompletionCollator, SFTDataModule
from .sources import DataSource
from .tokenization import (
    CompletionEncoder,
    PairEncoder,
    RowEncoder,
    TokenizationSettings,
    TripleEncoder,
    UnpairedEncoder,
)
from .triples import TripleCollator, TripleDataModule
from .unpaired import UnpairedCollator, UnpairedDataModule

__all__ = [
    "DROP_REASONS",
    "CompletionCollator",
    "CompletionEncoder",
    "DataReport",
    "DataSource",
    "PairCollator",
    "PairEncoder",
    "PreferenceDataModule",
    "PromptCollator",
    "PromptDataModule",
    "PromptEncoder",
    "RowEncoder",
    "SFTDataModule",
    "SourceCount",
    "TokenizationSettings",
    "TokenizedDataModule",
    "TripleCollator",
    "TripleDataModule",
    "TripleEncoder",
    "UnpairedCollator",
    "UnpairedDataModule",
    "UnpairedEncoder",
    "load_rows",
    "pad_sequences",
]
