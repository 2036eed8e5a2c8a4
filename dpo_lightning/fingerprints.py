"""What a checkpoint was trained with, so that resuming with other data or another model fails
with a clear message instead of silently training on a mix."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from transformers import PreTrainedTokenizerBase

CHECKPOINT_KEY = "dpo_lightning_run"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's vocabulary, merges, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps(
        {"special": tokenizer.special_tokens_map, "chat_template": getattr(tokenizer, "chat_template", None)},
        sort_keys=True, default=str,
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def spec_fingerprint(spec: Any) -> str:
    """A stable string for a ``ModelSpec`` (or anything JSON-able)."""
    value = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else spec
    return json.dumps(value, sort_keys=True, default=str)


def run_fingerprint(module: Any) -> dict[str, str]:
    """``{"model", "tokenizer", "loss", "train_data"}`` of the running job (what is known)."""
    out: dict[str, str] = {}
    if getattr(module, "model_spec", None) is not None:
        out["model"] = spec_fingerprint(module.model_spec)
    if getattr(module, "tokenizer", None) is not None:
        out["tokenizer"] = tokenizer_fingerprint(module.tokenizer)
    if getattr(module, "loss", None) is not None:
        out["loss"] = repr(module.loss) + json.dumps(
            {k: v for k, v in vars(module.loss).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))},
            sort_keys=True,
        )
    datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    if getattr(datamodule, "data_fingerprint", None):
        out["train_data"] = datamodule.data_fingerprint
    return out


FIXES = {
    "model": "resume with the same model.init_args.model",
    "tokenizer": "resume with the same tokenizer",
    "loss": "resume with the same model.init_args.loss",
    "train_data": "resume with the same data.train_data and tokenization settings (max_length, ...)",
}


def check_same_run(saved: dict[str, str], current: dict[str, str]) -> None:
    """Raise ``ValueError`` naming every part of the run that differs from the checkpoint's."""
    differing = [k for k in saved if k in current and saved[k] != current[k]]
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved[k][:80]!r} != now {current[k][:80]!r} ({FIXES[k]})" for k in differing)
        raise ValueError(
            f"--ckpt_path: this checkpoint comes from a different run. {details}. "
            "Or start a new run without --ckpt_path."
        )
