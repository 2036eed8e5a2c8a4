"""LightningModules."""

from .logprobs import model_logprobs, sequence_logprobs, token_logprobs
from .base import AlignmentModule
from .preference import PreferenceModule
from .reward import RewardModule
from .sft import SFTModule

__all__ = ["AlignmentModule", "PreferenceModule", "RewardModule", "SFTModule", "model_logprobs", "sequence_logprobs", "token_logprobs"]
