"""Which scaled-dot-product-attention kernels the log-prob passes may use, chosen per device.

On CUDA, PyTorch may pick cuDNN's attention for ``sdpa`` models. cuDNN builds an execution graph
for every new shape (hundreds of ms of host time each); length-grouped batches change their
width every step, and on an H200 the reference run spent 9 ms of host time per attention call
there against 0.2 ms of GPU time (issue 22). Flash and memory-efficient attention have no such
per-shape build, so on CUDA those (and the math fallback) are allowed and cuDNN is not. On other
devices nothing is restricted: the CPU path is PyTorch's default, unchanged.

The choice wraps every log-prob pass (``LogProbSelector``) and the training backward
(``AlignmentModule.backward``: forwards recomputed under gradient checkpointing choose again).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

#: allowed on CUDA, in PyTorch's order of preference among them
CUDA_SDPA_BACKENDS: tuple[SDPBackend, ...] = (
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
)


def sdpa_backends(device_type: str) -> tuple[SDPBackend, ...] | None:
    """The SDPA backends to allow on ``device_type`` (``"cuda"``, ``"cpu"``, ...); ``None``
    leaves PyTorch's choice alone."""
    return CUDA_SDPA_BACKENDS if device_type == "cuda" else None


@contextlib.contextmanager
def attention_kernels(device: torch.device) -> Iterator[None]:
    """Run the enclosed forward pass with :func:`sdpa_backends` of ``device`` (the backward
    follows the kernel its forward took)."""
    backends = sdpa_backends(device.type)
    if backends is None:
        yield
        return
    with sdpa_kernel(list(backends)):
        yield
