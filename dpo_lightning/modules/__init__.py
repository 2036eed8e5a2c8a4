"""LightningModules."""

from .logprobs import model_logprobs, sequence_logprobs, token_logprobs
from .base import AlignmentModule
from .preference import PreferenceModule
from .reward import RewardModule

__all__ = ["AlignmentModule", "PreferenceModule", "RewardModule", "model_logprobs", "sequence_logprobs", "token_logprobs"]
