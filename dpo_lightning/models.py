"""Load or build the policy, the reference and the tokenizer.

A real user names a Hugging Face hub id or a local folder (``name_or_path``); tests and the
demo build a tiny model from a config dict (``config``). Both go through :func:`load_causal_lm`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .console import quiet_transformers

quiet_transformers()

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass
class ModelSpec:
    """Where a model comes from. Exactly one of ``name_or_path`` and ``config`` is set.

    Attributes:
        name_or_path: hub id (``"org/name"``) or local folder, loaded with ``from_pretrained``.
        config: architecture dict for a model built from scratch, e.g.
            ``{"model_type": "llama", "hidden_size": 64, ...}``; ``vocab_size`` and special
            token ids default to the tokenizer's.
        tokenizer: tokenizer id or folder; defaults to ``name_or_path``.
        revision: hub revision (branch, tag or commit) for weights and tokenizer.
        dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``auto`` for loaded weights.
        trust_remote_code: run modelling code shipped with the checkpoint. Off unless set.
        attn_implementation: e.g. ``sdpa``, ``eager``, ``flash_attention_2``; ``None`` = default.
        seed: seed for a model built from ``config`` (so the reference copy can be rebuilt).
        load_in_4bit: load the weights quantized to 4-bit NF4 with bitsandbytes (QLoRA; CUDA),
            double quantization, compute in ``dtype`` (bfloat16 unless set).
        load_in_8bit: load the weights quantized to 8-bit with bitsandbytes (CUDA).
        extra: further keyword arguments for ``from_pretrained`` / ``from_config``.
    """

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    seed: int = 0
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, key: str = "model", option: str | None = None) -> None:
        """Raise a ``ValueError`` naming ``key`` when the spec is unusable; a missing local
        folder is named by ``option`` when the user gave it as one (``--policy``)."""
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError(
                f"{key}: set exactly one of `name_or_path` (hub id or folder) and `config` "
                f"(architecture dict), got name_or_path={self.name_or_path!r}, config={self.config!r}"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"{key}.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError(f"{key}: set at most one of load_in_4bit and load_in_8bit")
        if (self.load_in_4bit or self.load_in_8bit) and self.name_or_path is None:
            raise ValueError(f"{key}: quantized loading (load_in_4bit / load_in_8bit) needs name_or_path")
        if self.config is not None and self.tokenizer is None:
            raise ValueError(f"{key}.tokenizer is required when the model is built from `config`")
        for name, value in (("name_or_path", self.name_or_path), ("tokenizer", self.tokenizer)):
            if value is not None:
                check_local_path(option or f"{key}.{name}", value)


def check_local_path(key: str, value: str) -> None:
    """A name that looks like a local path (:func:`_looks_local`) must be an existing folder:
    else one line naming ``key``, the working directory and the nearest sibling folder."""
    if _looks_local(value) and not os.path.isdir(os.path.expanduser(value)):
        raise FileNotFoundError(
            f"{key}: no folder at {value!r} (relative paths resolve against the working "
            f"directory, {os.getcwd()}){_nearest_folder(value)}; give an existing folder written by "
            "save_pretrained, or a hub id like 'org/name'"
        )


def _looks_local(path: str) -> bool:
    """A hub id is ``name`` or ``org/name``. A path starts with ``.``, ``/`` or ``~``, holds more
    than one ``/``, or starts with a folder that exists here (``data/tiny-lama`` when ``data/``
    does): such a name is never sent to the hub, whose client would retry for a minute."""
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0])


def _nearest_folder(path: str) -> str:
    """``"; did you mean 'data/tiny-llama'?"`` when a sibling folder's name is close, else ``""``."""
    import difflib

    parent, name = os.path.split(os.path.expanduser(path.rstrip("/")))
    try:
        siblings = [e for e in os.listdir(parent or ".") if os.path.isdir(os.path.join(parent or ".", e))]
    except OSError:
        return ""
    near = difflib.get_close_matches(name, siblings, n=1, cutoff=0.75)
    return f"; did you mean {os.path.join(parent, near[0])!r}?" if near else ""


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host (``HF_ENDPOINT``) accepts a connection within ``timeout`` seconds;
    asked once a process (a policy, its tokenizer and a reference would each ask otherwise)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (the hub client reads only its cache)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_hub_source(key: str, source: str, revision: str | None) -> dict[str, Any]:
    """Before a hub id goes to ``from_pretrained``: when the hub cannot be reached, load from the
    local cache (``{"local_files_only": True}``) if the files are there, else fail at once in one
    line naming ``key``, instead of the hub client's minute of retries. ``{}`` for a local folder,
    in offline mode, or when the hub answers."""
    check_local_path(key, source)
    if os.path.isdir(os.path.expanduser(source)) or hub_offline() or hub_reachable():
        return {}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    if isinstance(cached, str) or isinstance(try_to_load_from_cache(source, "tokenizer_config.json", revision=revision), str):
        return {"local_files_only": True}
    raise OSError(
        f"{key}: {source!r} is no folder here (relative paths resolve against the working directory, {os.getcwd()}) and the hub cannot be reached "
        "from this machine, nor is it in the local cache; download it where the hub is reachable "
        f"(hf download {source} --local-dir DIR) and give DIR, or fix the path"
    )


@contextmanager
def explain_load_errors(key: str, source: str) -> Iterator[None]:
    """Turn loading failures into one line naming the key: a damaged (truncated) file of a
    local folder is named; the hub client's connection / not-found errors say where it looked."""
    try:
        yield
    except Exception as err:
        damaged = damaged_file(source)
        if damaged is not None:
            path, problem = damaged
            raise OSError(
                f"{key}: {path} is damaged or truncated ({problem}); copy or download it again, "
                "or re-save the model / tokenizer with save_pretrained"
            ) from err
        if not isinstance(err, OSError):
            raise
        where = "no such folder" if not os.path.isdir(source) else "the folder is missing files"
        raise OSError(
            f"{key}: cannot load {source!r} ({where} relative to {os.getcwd()!r}, and the hub "
            f"did not provide it: {str(err).splitlines()[0]}). Give an existing folder written by "
            "save_pretrained, or a hub id reachable from this machine (or cached, with HF_HUB_OFFLINE=1)."
        ) from err


def damaged_file(folder: str) -> tuple[str, str] | None:
    """The first unreadable ``*.safetensors`` / ``*.json`` file of a local ``folder`` and why,
    or ``None`` (not a folder, or every such file opens)."""
    if not os.path.isdir(folder):
        return None
    from safetensors import safe_open

    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt") as f:
                    f.keys()
            elif name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    json.load(f)
        except Exception as err:  # noqa: BLE001 - any failure to read the file is the answer
            return path, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'unreadable'}"
    return None


def quantization_config(spec: ModelSpec) -> BitsAndBytesConfig | None:
    """The bitsandbytes config a spec asks for (QLoRA's NF4 recipe for 4-bit), or ``None``."""
    if spec.load_in_4bit:
        compute = _DTYPES[spec.dtype] if spec.dtype in ("bfloat16", "float16") else torch.bfloat16
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    if spec.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(spec: ModelSpec, option: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer named by ``spec`` and make sure it can pad.

    A tokenizer without a pad token gets ``pad_token = eos_token`` (padding is masked out
    everywhere, so the id only fills space); one without either is an error. Errors name
    ``option`` (a console tool's ``--policy``) when given, else the recipe key.
    """
    source = spec.tokenizer or spec.name_or_path
    key = option or ("model.tokenizer" if spec.tokenizer else "model.name_or_path")
    hub = check_hub_source(key, source, spec.revision)
    with explain_load_errors(key, source):
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **hub
        )
    return ready_tokenizer(tokenizer, source)


def ready_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    """``tokenizer`` made able to pad (``pad_token = eos_token`` when it has none; padding is
    masked out everywhere, so the id only fills space), padding on the right; one with neither
    token is an error naming ``source``."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {source!r} has neither a pad nor an eos token; set one with "
                "tokenizer.add_special_tokens(...) and save it, then point model.tokenizer at it"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_causal_lm(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None = None,
                   option: str | None = None) -> PreTrainedModel:
    """Load (``name_or_path``) or build (``config``) a causal LM.

    Weights are read as safetensors only (``use_safetensors=True``). Errors name ``option``
    (a console tool's ``--policy``) when given, else the recipe key.
    """
    return load_model(spec, tokenizer, AutoModelForCausalLM, option=option)


def load_reward_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None = None,
                      option: str | None = None) -> PreTrainedModel:
    """A sequence classifier with one output (a scalar reward), its pad id set for pooling.

    From a causal-LM checkpoint the score head is new (randomly initialised), as usual.
    """
    pad_id = tokenizer.pad_token_id if tokenizer is not None else None
    model = load_model(spec, tokenizer, AutoModelForSequenceClassification, option=option, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id
    return model


def load_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None, auto_class: Any, option: str | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """Shared path of :func:`load_causal_lm` and :func:`load_reward_model`; errors name
    ``option`` when given, else ``model.name_or_path``."""
    spec.validate(option=option)
    source_key = option or "model.name_or_path"
    kwargs: dict[str, Any] = {**spec.extra, **overrides}
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    if quantization_config(spec) is not None:
        kwargs["quantization_config"] = quantization_config(spec)
    if spec.name_or_path is not None:
        kwargs.update(check_hub_source(source_key, spec.name_or_path, spec.revision))
        with explain_load_errors(source_key, spec.name_or_path):
            return auto_class.from_pretrained(
                spec.name_or_path,
                revision=spec.revision,
                dtype=_DTYPES[spec.dtype],
                trust_remote_code=spec.trust_remote_code,
                use_safetensors=True,
                **kwargs,
            )
    config = build_config({**(spec.config or {}), **overrides}, tokenizer)
    kwargs = {k: v for k, v in kwargs.items() if k not in overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = auto_class.from_config(config, trust_remote_code=spec.trust_remote_code, **kwargs)
    dtype = _DTYPES[spec.dtype]
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model


def build_config(
    config: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None, key: str = "model.init_args.model"
) -> Any:
    """Make a transformers config from a dict; vocab size and special ids come from the tokenizer.

    Raises:
        ValueError: no ``model_type``, or a ``vocab_size`` smaller than the tokenizer's (ids it
            produces would index past the embedding table).
    """
    values = dict(config)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError("model.config needs `model_type` (e.g. 'llama', 'gpt2', 'qwen2')")
    if tokenizer is not None:
        vocab = values.get("vocab_size")
        if vocab is not None and vocab < len(tokenizer):
            raise ValueError(
                f"{key}.config.vocab_size is {vocab} but the tokenizer has {len(tokenizer)} tokens, so some ids "
                f"would index past the embedding table; remove vocab_size (it defaults to the tokenizer's) "
                f"or set it >= {len(tokenizer)}"
            )
        values.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(tokenizer, name)
            if token_id is not None:
                values.setdefault(name, token_id)
    return AutoConfig.for_model(model_type, **values)


#: float attributes some attention modules read as their dropout probability
DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout_p")


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_widths(config: Any) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head dim)`` of a transformers config (key/value heads
    default to the query heads, the head dim to ``hidden_size // heads``)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def set_dropout(model: torch.nn.Module, disable: bool) -> torch.nn.Module:
    """Put ``model`` in train mode, with every dropout switched off when ``disable``.

    Whatever the source (``from_pretrained`` returns a model in eval mode, ``from_config`` in
    train mode), the trained model then behaves the same. Disabling sets ``p = 0`` on every
    ``nn.Dropout`` and 0 on the attention modules' own dropout probabilities
    (``attention_dropout``, ...), as TRL's ``disable_dropout`` does for DPO.
    """
    model.train()
    if disable:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                module.p = 0.0
            for name in DROPOUT_ATTRIBUTES:
                if isinstance(getattr(module, name, None), float):
                    setattr(module, name, 0.0)
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode with no parameter requiring grad; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model
