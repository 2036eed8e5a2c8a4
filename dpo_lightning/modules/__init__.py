"""LightningModules, the reference strategies and the log-prob paths they share."""

from .base import AlignmentModule
from .bema import BEMAUpdate
from .logprobs import LogProbSelector, logits_to_completion_logprobs, model_logprobs, token_logprobs
from .iterative import IterativePreferenceModule
from .online import OnlinePreferenceModule
from .preference import PreferenceModule
from .reference import (
    AdaptersDisabled,
    BEMAReference,
    FrozenCopy,
    MovingReference,
    NoReference,
    PrecomputedReference,
    PrepareContext,
    ReferenceSpec,
    ReferenceStrategy,
    RoundReference,
    ReferenceUpdate,
    SeparateModel,
)
from .reward import RewardModule
from .sft import SFTModule

__all__ = [
    "AdaptersDisabled",
    "AlignmentModule",
    "BEMAReference",
    "BEMAUpdate",
    "FrozenCopy",
    "IterativePreferenceModule",
    "LogProbSelector",
    "MovingReference",
    "NoReference",
    "OnlinePreferenceModule",
    "PrecomputedReference",
    "PreferenceModule",
    "ReferenceSpec",
    "ReferenceStrategy",
    "ReferenceUpdate",
    "PrepareContext",
    "RoundReference",
    "RewardModule",
    "SFTModule",
    "SeparateModel",
    "logits_to_completion_logprobs",
    "model_logprobs",
    "token_logprobs",
]
