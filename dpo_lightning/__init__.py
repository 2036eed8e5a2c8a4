"""dpo-lightning: modular preference optimization of language models on PyTorch Lightning.

``from dpo_lightning import train`` gives the one-call Python API (:mod:`dpo_lightning.api`);
it is loaded on first use, so ``import dpo_lightning`` stays light.
"""

from typing import Any

from .console import quiet_libraries

__version__ = "0.1.0"

quiet_libraries()  # library notices, tips and bars off; DPO_LIGHTNING_VERBOSE=1 keeps them


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainedRun"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dpo_lightning' has no attribute {name!r}")
