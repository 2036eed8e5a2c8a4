"""Preference losses. Each family lives in its own file; all share :class:`PreferenceLoss`."""

from .aot import AOTLoss, AOTUnpairedLoss
from .apo import APODownLoss, APOZeroLoss, APOZeroUnpairedLoss
from .bradley_terry import BradleyTerryLoss
from .base import ComposedLoss, LossNeeds, LossOutput, PreferenceLoss, SequenceLogProbs, global_batch_loss, mean_rows
from .bco import BCOLoss, BCOPairLoss
from .cpo import CPOHingeLoss, CPOIPOLoss, CPOLoss
from .discopop import DiscoPOPLoss
from .dpo import DPOLoss, HingeLoss, NormalizedDPOLoss, RobustDPOLoss
from .dpop import DPOPLoss
from .exo import EXOLoss
from .ipo import IPOLoss
from .kto import KTOLoss
from .length import LengthDesensitized
from .mixture import MixtureLoss
from .nca import NCALoss
from .odpo import ODPOLoss
from .orpo import ORPOLoss
from .rpo import ChosenNLLLoss, WithChosenNLL
from .simpo import AlphaPOLoss, SimPOLoss
from .sppo import SPPOHardLoss
from .tpo import TPOLLoss, TPOLoss
from .weighting import WPOWeighted

__all__ = [
    "AOTLoss",
    "AOTUnpairedLoss",
    "APODownLoss",
    "APOZeroLoss",
    "APOZeroUnpairedLoss",
    "AlphaPOLoss",
    "BCOLoss",
    "BCOPairLoss",
    "BradleyTerryLoss",
    "CPOHingeLoss",
    "CPOIPOLoss",
    "CPOLoss",
    "ChosenNLLLoss",
    "DPOLoss",
    "DPOPLoss",
    "DiscoPOPLoss",
    "EXOLoss",
    "HingeLoss",
    "IPOLoss",
    "KTOLoss",
    "LengthDesensitized",
    "ComposedLoss",
    "LossNeeds",
    "LossOutput",
    "MixtureLoss",
    "NCALoss",
    "NormalizedDPOLoss",
    "ODPOLoss",
    "ORPOLoss",
    "PreferenceLoss",
    "RobustDPOLoss",
    "SPPOHardLoss",
    "SequenceLogProbs",
    "SimPOLoss",
    "TPOLLoss",
    "TPOLoss",
    "WPOWeighted",
    "WithChosenNLL",
    "global_batch_loss",
    "mean_rows",
]
