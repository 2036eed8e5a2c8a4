"""Optional liger-kernel path for the LM head's log-probs, for passes that need no gradient.

Installed with the ``gpu`` extra (``pip install dpo-lightning[gpu]``); imported only when
:func:`use_liger_head` says yes, so CPU runs and the test suite never need it.

Only gradient-free passes (the frozen reference) take it: liger's fused linear cross-entropy
computes its gradients inside forward assuming one scalar upstream gradient, and its
``reduction="none"`` gradients were wrong for per-token upstream gradients (Liger-Kernel
issue 968, fixed in PR 1298), which is exactly what sequence log-probs feed a DPO loss. The
policy's pass stays on :class:`~.logprobs.ChunkedTargetLogProbs`.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor


@functools.cache
def liger_installed() -> bool:
    """Whether ``liger_kernel`` can be imported (looked up once, without importing it)."""
    return importlib.util.find_spec("liger_kernel") is not None


def use_liger_head(device_type: str, needs_grad: bool) -> bool:
    """The liger path is taken on CUDA, for a pass without gradient, when liger is installed;
    every other case (CPU, gradients, liger absent) falls back to the chunked head."""
    return device_type == "cuda" and not needs_grad and liger_installed()


def liger_target_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(hidden @ weight^T)[targets]`` by liger's fused linear cross-entropy.

    Args:
        hidden: ``(M, H)`` in the dtype the logits GEMM should run in (cast by the caller).
        weight: ``(V, H)``, same dtype.
        targets: ``(M,)`` long.
    Returns:
        ``(M,)`` float32 log-probs.
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, targets)
    loss = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    if loss.shape != targets.shape:  # a release that ignores reduction="none" returns the mean
        from importlib.metadata import version

        raise RuntimeError(
            f"liger-kernel {version('liger-kernel')} returned a {tuple(loss.shape)} loss for reduction='none' on "
            f"{tuple(targets.shape)} targets; install the gpu extra (liger-kernel>=0.8) or uninstall liger-kernel"
        )
    return -loss.to(torch.float32)
