"""LightningModules."""

from .logprobs import model_logprobs, sequence_logprobs, token_logprobs
from .preference import PreferenceModule

__all__ = ["PreferenceModule", "model_logprobs", "sequence_logprobs", "token_logprobs"]
