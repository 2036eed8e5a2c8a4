"""Preference losses. Each family lives in its own file; all share :class:`PreferenceLoss`."""

from .bradley_terry import BradleyTerryLoss
from .base import LossOutput, PreferenceLoss, SequenceLogProbs
from .dpo import DPOLoss, HingeLoss, RobustDPOLoss
from .ipo import IPOLoss
from .kto import KTOLoss
from .odpo import ODPOLoss
from .orpo import ORPOLoss
from .rpo import WithChosenNLL
from .simpo import SimPOLoss

__all__ = [
    "BradleyTerryLoss",
    "DPOLoss",
    "HingeLoss",
    "IPOLoss",
    "KTOLoss",
    "LossOutput",
    "ODPOLoss",
    "ORPOLoss",
    "PreferenceLoss",
    "RobustDPOLoss",
    "SequenceLogProbs",
    "SimPOLoss",
    "WithChosenNLL",
]
