"""Pieces shared by the CPU benchmarks against TRL (``throughput.py``, ``online_throughput.py``).

* the benchmark Llama (:data:`ARCH`: 4 layers, hidden 256, untied embeddings) built once from a
  config and saved to a folder that every run loads (:func:`save_model`), with a word-level
  tokenizer of ``vocab`` tokens (:func:`save_word_tokenizer`: ``<s>`` then one token per word);
* :func:`run_worker`: one measured run in its own subprocess, one thread
  (``OMP_NUM_THREADS=1``; the worker calls ``torch.set_num_threads(1)``), offline hub, a fresh
  ``datasets`` cache; the worker prints one ``RESULT {json}`` line;
* :func:`summary`: median [min-max] of repeated measurements; :func:`peak_rss_mb`.

benchmarks/ is no package: each script runs with its own folder first on ``sys.path`` and
imports this module by its name.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

ARCH = {
    "model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def model_config(vocab: int):
    """The benchmark Llama's config at ``vocab`` tokens (pad 0, bos 1, eos 2)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**{**ARCH, "vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})


def save_word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer of ``vocab`` tokens (the specials, then ``w0``, ``w1``, ...) that
    adds ``<s>`` in front, saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    table = {t: i for i, t in enumerate(SPECIALS)}
    table.update({f"w{i}": i + len(SPECIALS) for i in range(vocab - len(SPECIALS))})
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)


def random_words(rng: random.Random, vocab: int, span: tuple[int, int]) -> str:
    """Between ``span[0]`` and ``span[1]`` random words of the word-level tokenizer."""
    return " ".join(f"w{rng.randrange(vocab - len(SPECIALS))}" for _ in range(rng.randint(*span)))


def save_model(folder: Path, vocab: int, seed: int = 0) -> None:
    """The benchmark Llama at ``vocab`` tokens, initialised from ``seed``, saved to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(model_config(vocab)).save_pretrained(folder)


def run_worker(cmd: list[str], folder: Path, extra_env: dict[str, str] | None = None) -> dict | None:
    """Run ``cmd`` (a worker) in its own process, one thread, offline, with a fresh ``datasets``
    cache under ``folder``; return its last ``RESULT`` line's JSON, or ``None`` (the error
    printed) when it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="datasets-", dir=folder), **(extra_env or {})}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        print(f"  {' '.join(cmd[2:])} failed:\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(values: list[float]) -> str:
    """``median [min-max]`` (the median alone for one value)."""
    med = statistics.median(values)
    return f"{med:.2f} [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else f"{med:.2f}"


def word_score(completion: str) -> float:
    """A deterministic judge of word-level text (the ``small`` online setting): the mean over
    its words ``wN`` of ``(N mod 97) / 96``, in [0, 1] (0 for no such word); two samples of 64
    random words almost never tie."""
    values = [int(w[1:]) % 97 / 96 for w in completion.split() if w[:1] == "w" and w[1:].isdigit()]
    return sum(values) / len(values) if values else 0.0


def chosen_runs(parser: Any, runs_arg: str, known: list[str], is_trl: Callable[[str], bool]) -> tuple[list[str], Any]:
    """The runs ``--runs`` names (comma-separated; an unknown one is a parser error naming the
    known ones) and the ``trl`` module, or ``None`` when it is not installed: then the TRL runs
    (``is_trl``) are left out, with a line saying so."""
    names = [n for n in runs_arg.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {list(known)}")
    try:
        import trl
    except ImportError:
        print("trl not installed: TRL runs skipped (pip install trl to compare)")
        return [n for n in names if not is_trl(n)], None
    return names, trl
