"""Precomputed reference log-probs: one pass of the reference over a split, cached on disk.

The cache file is keyed by the tokenized split's ``datasets`` fingerprint (which covers the
data, every tokenization setting and the tokenization code), the reference model's identity,
the tokenizer and the code that computes log-probs, so a changed input never reads a stale file. Files are safetensors: ``(N, 2)`` float32 sums of the
reference's log-probs over the chosen and rejected completion tokens, in dataset row order.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ..fingerprints import code_version

#: the code that computes the cached values (part of the key)
LOGPROB_CODE_VERSION = code_version("modules.logprobs", "modules.reference_cache", "data.collator")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dpo_lightning", "reference_logps")
COLUMNS = ("reference_chosen", "reference_rejected")


def cache_path(cache_dir: str, dataset: datasets.Dataset, reference_id: str, tokenizer_id: str) -> Path:
    """Where the log-probs of ``dataset`` under the reference are (or will be) stored."""
    key = json.dumps(
        {"data": dataset._fingerprint, "reference": reference_id, "tokenizer": tokenizer_id, "code": LOGPROB_CODE_VERSION},
        sort_keys=True,
    )
    return Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


@torch.no_grad()
def compute(logprobs_fn, loader: DataLoader, device: torch.device) -> torch.Tensor:
    """``(N, 2)`` reference sums in row order; ``loader`` yields the split in row order and
    ``logprobs_fn(batch) -> SequenceLogProbs``."""
    out = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = logprobs_fn(batch)
        out.append(torch.stack([logps.chosen, logps.rejected], dim=1).float().cpu())
    return torch.cat(out)


def load_or_compute(path: Path, compute_fn, is_writer: bool, barrier) -> tuple[torch.Tensor, bool]:
    """Read ``path``, or have the writer process compute and save it while others wait.

    Returns ``(values (N, 2), computed_here)``.
    """
    computed = False
    if not path.exists() and is_writer:
        values = compute_fn()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"logps": values.contiguous()}, str(tmp))
        os.replace(tmp, path)
        computed = True
    barrier()
    return load_file(str(path))["logps"], computed
