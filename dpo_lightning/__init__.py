"""dpo-lightning: modular preference optimization of language models on PyTorch Lightning."""

from .console import quiet_libraries

__version__ = "0.1.0"

quiet_libraries()  # library notices, tips and bars off; DPO_LIGHTNING_VERBOSE=1 keeps them
