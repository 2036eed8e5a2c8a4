"""Write a trained model in Hugging Face format, atomically and only when it is finite."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .models import ModelSpec

#: the file beside an exported policy that names the reference model it was trained against
REFERENCE_RECORD = "reference.json"


def check_export_target(path: str | os.PathLike, overwrite: bool, key: str = "model.init_args.export_dir") -> Path:
    """Fail early (before training) when ``path`` exists and may not be overwritten, or cannot be
    created: a regular file on the way, or a folder this process may not write to."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{key}: {str(target)!r} already exists; choose another directory or set "
            f"{key.rsplit('.', 1)[0]}.overwrite_export: true"
        )
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{key}: {str(target)!r} is a file, not a folder; choose another path")
    ancestor = target.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{key}: {str(ancestor)!r} is a file, so {str(target)!r} cannot be created; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{key}: cannot write under {str(ancestor)!r}; choose a folder you can write to")
    return target


def assert_finite(model: torch.nn.Module) -> None:
    """Raise if any parameter holds NaN or inf (such a model is never written)."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise FloatingPointError(f"parameter {name!r} holds NaN/inf; refusing to export it")


def alias_tied_weights(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` with each weight the model ties to another (``_tied_weights_keys``,
    ``{target: source}``, e.g. ``lm_head.weight`` -> ``model.embed_tokens.weight``) pointing at its
    source's tensor when the two hold the same values. A gathered state dict (FSDP's full state
    dict) holds a separate copy of each; ``save_pretrained`` drops a tied weight only when it
    shares its source's storage, so without this the export holds the copy too (one
    ``vocab x hidden`` matrix more than the module's own export)."""
    tied = getattr(model, "_tied_weights_keys", None)
    if not isinstance(tied, dict):
        return state_dict
    state = dict(state_dict)
    for target, source in tied.items():
        if target in state and source in state and torch.equal(state[target], state[source]):
            state[target] = state[source]
    return state


def save_pretrained_atomic(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    path: str | os.PathLike,
    overwrite: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    card: str | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """``save_pretrained`` (safetensors) model and tokenizer into a temporary sibling folder,
    then move it into place. ``state_dict`` replaces the module's own weights (gathered from a
    sharded model); ``card`` is written as the folder's ``README.md``, ``extra_files`` as
    ``{name: text}`` beside it. Returns the final path."""
    target = check_export_target(path, overwrite)
    assert_finite(model)
    if state_dict is not None and not all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point()):
        raise FloatingPointError("the gathered weights hold NaN/inf; refusing to export them")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if state_dict is None:
            model.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def reference_record(spec: ModelSpec) -> str:
    """The text of :data:`REFERENCE_RECORD` for a reference built from ``spec``: the spec's
    fields, with local folders made absolute so the record holds wherever the export moves."""
    fields = dataclasses.asdict(spec)
    for key in ("name_or_path", "tokenizer"):
        value = fields.get(key)
        if value and os.path.isdir(os.path.expanduser(value)):
            fields[key] = str(Path(value).expanduser().resolve())
    return json.dumps({"reference_model": fields}, indent=2, sort_keys=True) + "\n"


def read_reference_record(folder: str | os.PathLike) -> ModelSpec | None:
    """The reference recorded beside an exported policy in ``folder``, or ``None`` when the folder
    holds no :data:`REFERENCE_RECORD` (a hub id, a model not exported by dpo-lightning)."""
    path = Path(folder).expanduser() / REFERENCE_RECORD
    if not path.is_file():
        return None
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))["reference_model"]
        spec = ModelSpec(**fields)
        spec.validate(f"{path} reference_model")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path}: unreadable reference record ({type(err).__name__}: {err}); delete it and set "
            "model.init_args.reference.model to the model the policy was trained from"
        ) from err
    return spec
