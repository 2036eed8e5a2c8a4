"""Shared fixtures: the shipped tiny tokenizer, a tiny Llama spec, small pair files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dpo_lightning.models import ModelSpec, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = str(ROOT / "data" / "tokenizer")
TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}


def tiny_spec(seed: int = 0) -> ModelSpec:
    return ModelSpec(config=dict(TINY_CONFIG), tokenizer=TOKENIZER_DIR, seed=seed)


@pytest.fixture
def spec() -> ModelSpec:
    return tiny_spec()


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(tiny_spec())


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def quickstart_rows(n: int, split: str = "train") -> list[dict]:
    with (ROOT / "data" / "quickstart" / f"{split}.jsonl").open() as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@pytest.fixture
def pair_files(tmp_path: Path) -> tuple[str, str]:
    """Small train/val jsonl files taken from the quickstart data."""
    return (
        write_jsonl(tmp_path / "train.jsonl", quickstart_rows(32)),
        write_jsonl(tmp_path / "val.jsonl", quickstart_rows(16, "val")),
    )


def tiny_recipe(tmp_path: Path, train: str, val: str, loss: dict | None = None, **model_args) -> dict:
    """A recipe dict like recipes/quickstart.yaml, sized for a 2-step test."""
    init_args = {
        "model": {"config": dict(TINY_CONFIG), "tokenizer": TOKENIZER_DIR, "seed": 0},
        "loss": loss or {"class_path": "dpo_lightning.losses.DPOLoss", "init_args": {"beta": 0.1}},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        "export_dir": str(tmp_path / "export"),
    }
    init_args.update(model_args)
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 2,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": False, "default_root_dir": str(tmp_path / "run"),
        },
        "model": {"class_path": "dpo_lightning.modules.PreferenceModule", "init_args": init_args},
        "data": {
            "class_path": "dpo_lightning.data.PreferenceDataModule",
            "init_args": {"train_data": train, "val_data": val, "max_length": 64, "batch_size": 4},
        },
    }


def write_recipe(path: Path, recipe: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


VERSION_STAMPS = ("transformers_version",)


def determined_content(folder: Path) -> dict[str, object]:
    """What the project determines in a saved model folder, by file name: JSON files parsed, with
    the library's version stamp (``transformers_version``, written by whichever release is
    installed) left out; every other file as its bytes."""
    content: dict[str, object] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix == ".json":
            value = json.loads(path.read_text())
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in VERSION_STAMPS}
            content[path.name] = value
        else:
            content[path.name] = path.read_bytes()
    return content


import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class MatmulDtypes(TorchDispatchMode):
    """Records ``(input dtype, weight dtype)`` of every ``aten.mm`` / ``addmm`` / ``bmm`` run
    while active (autograd's backward ops included): ``with MatmulDtypes() as m: ...; m.seen``."""

    OPS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)][-2:]
            self.seen.append((tensors[0].dtype, tensors[1].dtype))
        return func(*args, **(kwargs or {}))


class NoHostReads:
    """Fails any ``bool()`` / ``.item()`` / ``.tolist()`` of a tensor while active: what a host
    sync looks like on CUDA, checked on CPU tensors."""

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in ("__bool__", "item", "tolist")}
        for name in self.saved:
            setattr(torch.Tensor, name, lambda *a, _name=name, **k: pytest.fail(f"host read: Tensor.{_name}"))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


def head_inputs(seed: int = 0, m: int = 12, h: int = 16, v: int = 50) -> tuple[torch.Tensor, ...]:
    """Float32 ``hidden (m, h)`` and ``weight (v, h)`` requiring grad, ``targets (m,)``, ``upstream (m,)``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_()
    targets = torch.randint(0, v, (m,), generator=g)
    upstream = torch.randn(m, generator=g)
    return hidden, weight, targets, upstream


GPU_BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


def load_gpu_benchmark():
    """benchmarks/gpu_throughput.py as a module (benchmarks/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_throughput", GPU_BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
