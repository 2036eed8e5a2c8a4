"""What a checkpoint was trained with, so that resuming with other data or another model fails
with a clear message instead of silently training on a mix."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from transformers import PreTrainedTokenizerBase

CHECKPOINT_KEY = "dpo_lightning_run"


def code_version(*modules: str) -> str:
    """sha256 of the source files of ``modules`` (dotted names under ``dpo_lightning``): part of
    every cache key, so an upgrade that changes how ids or log-probs are produced never reads a
    cache the old code wrote."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in modules:
        digest.update((root / (name.replace(".", "/") + ".py")).read_bytes())
    return digest.hexdigest()[:16]


def library_versions(*distributions: str) -> dict[str, str]:
    """``{name: installed version}`` of ``distributions`` (``"-"`` for one not installed): part of
    cache keys whose values a library computes (an upgrade of torch or transformers may change
    a model's initialisation or numerics, one of tokenizers the ids), read at call time."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in distributions:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


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


@runtime_checkable
class Fingerprinted(Protocol):
    """A part of a run that names what it was built with: a training module (model, tokenizer,
    loss, optimizer, scheduler; online also the judge), a data module (the train data), a judge.
    Checkpoints store the parts merged (:func:`run_fingerprint`); a resume compares them."""

    def fingerprint(self) -> dict[str, str]:
        """``{part: stable string}``; a part not known yet (data not set up, optimizer not built)
        is left out."""
        ...


def run_fingerprint(*parts: Fingerprinted) -> dict[str, str]:
    """The parts' fingerprints merged, keys in :data:`FIXES` order (``model``, ``tokenizer``,
    ``loss``, ``judge``, ``train_data``, ``optimizer``, ``scheduler``), any other key after them.

    Raises:
        ValueError: two parts give the same key different values.
    """
    merged: dict[str, str] = {}
    for part in parts:
        for key, value in part.fingerprint().items():
            if merged.get(key, value) != value:
                raise ValueError(
                    f"run fingerprint: two parts give {key!r}: {merged[key]!r:.80} and, from {type(part).__name__}, {value!r:.80}"
                )
            merged[key] = value
    order = {key: i for i, key in enumerate(FIXES)}
    return dict(sorted(merged.items(), key=lambda item: order.get(item[0], len(order))))


def loss_fingerprint(loss: Any) -> str:
    """``repr(loss)`` and its plain settings (numbers, strings, flags; not ``training``, a mode)."""
    return repr(loss) + json.dumps(
        {k: v for k, v in vars(loss).items()
         if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool))},
        sort_keys=True,
    )


def settings_fingerprint(obj: Any, skip: tuple[str, ...] = ()) -> str:
    """``Class{plain attributes}`` of an object (``obj.defaults`` when it is a dict, as an
    optimizer's; else ``vars(obj)``), attributes named in ``skip`` and private ones left out."""
    values = obj.defaults if hasattr(obj, "defaults") and isinstance(obj.defaults, dict) else vars(obj)
    plain = {
        k: v for k, v in values.items()
        if not k.startswith("_") and k not in skip and isinstance(v, (int, float, str, bool, tuple, type(None)))
    }
    return type(obj).__name__ + json.dumps(plain, sort_keys=True, default=str)


def optimizer_fingerprint(optimizer: Any, scheduler: Any) -> dict[str, str]:
    """``{"optimizer", "scheduler"}``: the classes and settings a run was configured with (the
    optimizer's constructor defaults: lr, betas, weight decay ...; the scheduler's settings,
    not its position)."""
    return {
        "optimizer": settings_fingerprint(optimizer),
        "scheduler": settings_fingerprint(scheduler, skip=("last_epoch", "base_lrs", "total_steps", "verbose")),
    }


FIXES = {
    "model": "resume with the same model.init_args.model",
    "tokenizer": "resume with the same tokenizer",
    "loss": "resume with the same model.init_args.loss",
    "judge": "resume with the same model.init_args.judge",
    "train_data": "resume with the same data.init_args.train_data and tokenization settings (max_length, ...)",
    "optimizer": "resume with the same model.init_args.optimizer (class, lr, weight decay, ...)",
    "scheduler": "resume with the same model.init_args.scheduler",
}


def describe_difference(saved: str, current: str) -> str:
    """``checkpoint X != now Y`` for two fingerprints, naming only the settings that differ when
    both are ``Name{json}`` (``lr 0.01 -> 0.5``), else the text around the first difference."""
    def parse(value: str) -> tuple[str, dict] | None:
        name, brace, rest = value.partition("{")
        try:
            return (name, json.loads(brace + rest)) if brace else None
        except ValueError:
            return None

    a, b = parse(saved), parse(current)
    if a and b and isinstance(a[1], dict) and isinstance(b[1], dict):
        changes = [f"class {a[0]} -> {b[0]}"] if a[0] != b[0] else []
        changes += [f"{k} {a[1].get(k)!r} -> {b[1].get(k)!r}" for k in sorted(a[1].keys() | b[1].keys()) if a[1].get(k) != b[1].get(k)]
        if changes:
            return "checkpoint -> now: " + ", ".join(changes)
    i = next((n for n, (x, y) in enumerate(zip(saved, current)) if x != y), min(len(saved), len(current)))
    start = max(i - 40, 0)
    return f"checkpoint {saved[start:i + 60]!r} != now {current[start:i + 60]!r}"


def check_same_run(saved: dict[str, str], current: dict[str, str]) -> None:
    """Raise ``ValueError`` naming every part of the run that differs from the checkpoint's."""
    differing = [k for k in saved if k in current and saved[k] != current[k]]
    if differing:
        details = "; ".join(
            f"{k}: {describe_difference(saved[k], current[k])} ({FIXES.get(k, f'resume with the same {k}')})"
            for k in differing
        )
        raise ValueError(
            f"--ckpt_path: this checkpoint comes from a different run. {details}. "
            "Or start a new run without --ckpt_path."
        )
