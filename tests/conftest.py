"""Shared fixtures and helpers: the shipped tiny tokenizer, a tiny Llama spec, small pair files, the
shipped recipes as the CLI runs them, random log-probs, and the CLI in a subprocess."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# help texts cached by `dpo-lightning --help` go to a folder of this session, not the user's cache
os.environ.setdefault("DPO_LIGHTNING_CACHE_DIR", tempfile.mkdtemp(prefix="dpo-lightning-cache-"))

from dpo_lightning.cli import run  # noqa: E402
from dpo_lightning.losses import SequenceLogProbs  # noqa: E402
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


#: a 2-layer decoder of 4 query and 2 key/value heads of 8 dims, vocab 256 (pad 0, bos 1, eos 2)
TINY_DECODER = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    initializer_range=0.2)


def tiny_decoder(config_class: type | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """A causal LM of ``TINY_DECODER``'s shape (a Llama unless ``config_class`` says), weights from
    ``seed``, in eval mode; ``overrides`` change the config."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = (config_class or LlamaConfig)(**{**TINY_DECODER, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


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


# -- helpers shared by several test files (a test file imports them from here, never from another test file) --
RECIPES = ROOT / "recipes"
PLUGINS = str(ROOT / "tests" / "plugins")


STANDALONE = ("dpo", "quickstart", "base")  # complete recipes, run with one --config


def configs(recipe: str) -> list[str]:
    """The ``--config`` arguments of a shipped recipe: a standalone one alone, an overlay after base.yaml."""
    path = str(RECIPES / f"{recipe}.yaml")
    return ["--config", path] if recipe in STANDALONE else ["--config", str(RECIPES / "base.yaml"), "--config", path]


def quick(recipe: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit", *configs(recipe),
        "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", str(tmp_path), "--model.init_args.export_dir", str(tmp_path / "model"),
        *extra,
    ]


@functools.lru_cache(maxsize=None)
def _printed(*config_args: str) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit) as exit_info:
        run(["fit", *config_args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return buffer.getvalue()


def print_config(recipe: str) -> dict:
    """The recipe (an overlay composed with base.yaml) as LightningCLI parses and validates it; no model is loaded."""
    return yaml.safe_load(_printed(*configs(recipe)))


def rows():
    return [
        {"prompt_ids": [1, 10, 11, 12], "chosen_ids": [20, 21, 2], "rejected_ids": [30, 2], "row_id": 0},
        {"prompt_ids": [1, 13], "chosen_ids": [22, 23, 24, 25, 2], "rejected_ids": [31, 32, 33, 2], "row_id": 1},
        {"prompt_ids": [1, 14, 15, 16, 17, 18], "chosen_ids": [26, 2], "rejected_ids": [34, 35, 36, 2], "row_id": 2},
    ]


def random_logps(batch: int, seed: int, scale: float = 5.0) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 30, (2 * batch,), generator=g)
    policy = SequenceLogProbs(-scale * torch.rand(2 * batch, generator=g, dtype=torch.float64) * counts, counts)
    reference = SequenceLogProbs(-scale * torch.rand(2 * batch, generator=g, dtype=torch.float64) * counts, counts)
    return policy, reference


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def resume_recipe(tmp_path: Path, name: str, train: str, val: str, kill_at: int | None) -> str:
    recipe = tiny_recipe(tmp_path, train, val, export_dir=str(tmp_path / name / "export"))
    recipe["trainer"].update(
        max_steps=11, limit_val_batches=1, default_root_dir=str(tmp_path / name), enable_checkpointing=True,
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 3, "save_last": True, "save_top_k": -1}}],
    )
    recipe["data"]["init_args"]["batch_size"] = 4  # 32 rows: 8 batches an epoch, so step 5 is mid-epoch
    if kill_at is not None:
        recipe["trainer"]["callbacks"].append({"class_path": "faults.KillAtStep", "init_args": {"step": kill_at}})
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PLUGINS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dpo_lightning.cli", *args], env=env, capture_output=True, text=True)


# -- multi-process runs (tests/test_ddp_*.py) ------------------------------------------------
PLUGINS_DIR = ROOT / "tests" / "plugins"


def ddp_recipe(folder: Path, train: str, val: str, devices: int, global_batch: int = 8, steps: int = 4) -> dict:
    """A tiny recipe for ``devices`` CPU processes (``ddp`` when more than one) on the same global
    batch: ``global_batch // devices`` rows a process, ``steps`` SGD steps (an update linear in the
    gradient, so float32 summation order is not amplified as Adam's ``m / sqrt(v)`` amplifies it),
    one full validation at the end, a CSV logger and the export under ``folder``."""
    recipe = tiny_recipe(folder, train, val, export_dir=str(folder / "export"),
                         optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}})
    recipe["trainer"].update(
        devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps, limit_val_batches=1.0,
        num_sanity_val_steps=0, val_check_interval=steps, default_root_dir=str(folder),
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder)}},
    )
    recipe["data"]["init_args"].update(batch_size=global_batch // devices, eval_batch_size=4)
    return recipe


def launch_fits(recipes: list[str], timeout: float = 300, fit_args: tuple[str, ...] = ()):
    """Fit each recipe in turn in one launch (``tests/plugins/ranks.py``; under DDP Lightning
    starts the other ranks with the same command), each fit with ``fit_args`` added (e.g.
    ``("--ckpt_path", "last")``), one thread a process, the plugins importable.
    A job still running after ``timeout`` seconds fails the test (``subprocess.TimeoutExpired``)."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(PLUGINS_DIR), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(PLUGINS_DIR / "ranks.py"), *recipes, "--", *fit_args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def last_val_metrics(run_dir: Path) -> dict[str, float]:
    """The last validation row of the run's ``metrics.csv`` (CSVLogger): ``{"val/...": value}``."""
    import csv

    (metrics,) = list(run_dir.rglob("metrics.csv"))
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/loss")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}
def save_tiny_model(folder: Path, seed: int = 0) -> str:
    """A randomly initialised tiny Llama (``TINY_CONFIG``) and the shipped tokenizer saved to
    ``folder`` with ``save_pretrained``; returns the folder as a string."""
    from dpo_lightning.models import load_causal_lm

    tok = load_tokenizer(tiny_spec())
    model = load_causal_lm(tiny_spec(seed), tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
