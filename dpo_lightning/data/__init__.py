"""Data: loading, tokenization, collation and the LightningDataModules."""

from .collator import PairCollator
from .datamodule import PreferenceDataModule
from .loading import load_rows
from .report import DROP_REASONS, DataReport
from .tokenization import PairTokenizer, TokenizationSettings, UnpairedTokenizer
from .unpaired import UnpairedCollator, UnpairedDataModule
from .sft import SFTCollator, SFTDataModule

__all__ = [
    "DROP_REASONS",
    "DataReport",
    "PairCollator",
    "PairTokenizer",
    "PreferenceDataModule",
    "SFTCollator",
    "SFTDataModule",
    "TokenizationSettings",
    "UnpairedCollator",
    "UnpairedDataModule",
    "UnpairedTokenizer",
    "load_rows",
]
