"""dpo-lightning: modular preference optimization of language models on PyTorch Lightning."""

__version__ = "0.1.0"
