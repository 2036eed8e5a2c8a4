"""Sampling speed: ``sample_completions`` through transformers' ``generate`` (``engine:
generate``, the path before the sampling loop) against the loop of ``dpo_lightning.decoding``
(``engine: auto``), the loop with each prompt's cache repeated for its ``k`` samples instead of
shared by them (``auto-repeated``, what ``auto`` did before ``dpo_lightning/shared_prefix.py``;
``auto-shared`` forces the sharing where ``auto`` would not pick it),
the repeated cache with transformers' concatenating ``DynamicCache`` instead of the preallocated
one (``auto-concat``, what ``auto`` did before ``dpo_lightning/kv_cache.py``), and ``generate``
with a static cache (``static``), compiled by ``torch.compile`` (``static-compile``).

    .venv/bin/python benchmarks/generation.py                                  # both settings
    .venv/bin/python benchmarks/generation.py --settings sentiment --policy outputs/sft/model
    .venv/bin/python benchmarks/generation.py --settings small --engines generate auto static static-compile
    .venv/bin/python benchmarks/generation.py --engines auto-concat auto-repeated auto
    .venv/bin/python benchmarks/generation.py --settings small --samples 8 --engines auto-repeated auto

Settings:

* ``sentiment``: the online recipe's policy (``--policy``: default the shipped tiny Llama,
  ``data/tiny-llama``, 2 layers, hidden 64, vocab 512; the sentiment experiment samples from its
  SFT export, ``recipes/sft.yaml``, whose completions end at an EOS after ~18 tokens), prompts of
  ``data/sentiment/pair_prompts.jsonl``, 16 prompts a batch, k = 8, ``max_new_tokens`` 32.
* ``small``: ``throughput.py``'s small Llama (vocab 2,000, 4 layers, hidden 256, random
  weights: its completions rarely stop early), prompts of 32-96 random words, 8 prompts a
  batch, k = 2, ``max_new_tokens`` 64.

``--samples`` sets ``k`` and ``--prompts`` the prompts a batch for every setting; ``--device`` and
``--dtype`` where and in what precision the model samples (on a GPU the wall time is the figure).

One thread (``torch.set_num_threads(1)``), fp32, exact sampling (temperature 1). Each engine
samples the same ``--batches`` batches (seeds 0, 1, ...) once per repeat, engines interleaved
within a repeat; the table gives the median over repeats of the wall time and of the process's
CPU time (``time.process_time``: what this process used, whatever else the machine ran), the
prompts and sampled tokens per second of each (tokens: the completions' lengths, which differ
between engines as the samples do). ``static-compile``'s first repeat (compilation included) is
reported on its own line.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpo_lightning import decoding, generation  # noqa: E402
from dpo_lightning.generation import cut_at_eos, encode_prompt, left_padded, sample_completions, stop_token_ids  # noqa: E402


def load_throughput():
    """benchmarks/throughput.py as a module (its small setting's model and random-word prompts)."""
    spec = importlib.util.spec_from_file_location("throughput", Path(__file__).with_name("throughput.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    tokenizer: object
    batches: list[dict]
    num_samples: int
    max_new_tokens: int


def batches_of(tokenizer, prompts: list[str], batch_size: int, count: int) -> list[dict]:
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    out = []
    for b in range(count):
        chunk = [(i + b * batch_size) % len(prompts) for i in range(batch_size)]
        padded = left_padded([ids[i] for i in chunk], tokenizer.pad_token_id)
        out.append({**padded, "prompt": [prompts[i] for i in chunk]})
    return out


def sentiment(policy: str, count: int, size: int = 16) -> Workload:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy if (Path(policy) / "tokenizer.json").exists() else ROOT / "data" / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    rows = [json.loads(line)["prompt"] for line in (ROOT / "data" / "sentiment" / "pair_prompts.jsonl").read_text().splitlines()]
    return Workload("sentiment", model, tokenizer, batches_of(tokenizer, rows, size, count), 8, 32)


def small(count: int, size: int = 8) -> Workload:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    throughput = load_throughput()
    folder = Path(tempfile.mkdtemp(prefix="generation-bench-"))
    setting = throughput.SETTINGS["small"]
    throughput.make_inputs(folder, setting, size * count)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(folder / "model").eval()
    rows = [json.loads(line)["prompt"] for line in (folder / "pairs.jsonl").read_text().splitlines()]
    return Workload("small", model, tokenizer, batches_of(tokenizer, rows, size, count), 2, 64)


#: the loop with one of its choices forced: engine -> the ``decoding.decode`` arguments
LOOP_VARIANTS = {
    "auto-shared": {"shared_prefix": True},
    "auto-repeated": {"shared_prefix": False},
    "auto-concat": {"shared_prefix": False, "preallocated": False},
}


def run_engine(work: Workload, engine: str) -> tuple[float, float, int, int]:
    """``(wall s, CPU s, prompts, sampled tokens)`` of sampling every batch once."""
    stops = stop_token_ids(work.model, work.tokenizer)
    prompts = tokens = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for seed, batch in enumerate(work.batches):
        if engine in ("static", "static-compile"):
            tokens += static_generate(work, batch, seed, stops, compile=engine == "static-compile")
        else:
            variant = LOOP_VARIANTS.get(engine)
            if variant is not None:
                generation.decode = functools.partial(decoding.decode, **variant)
            try:
                out = sample_completions(work.model, work.tokenizer, batch, work.num_samples, seed=seed,
                                         max_new_tokens=work.max_new_tokens, stop_ids=stops,
                                         engine="auto" if variant is not None else engine)
            finally:
                generation.decode = decoding.decode
            tokens += sum(map(len, out.completion_ids))
        prompts += len(batch["prompt"])
    return time.perf_counter() - wall, time.process_time() - cpu, prompts, tokens


def static_generate(work: Workload, batch: dict, seed: int, stops: list[int], compile: bool) -> int:
    """``generate`` with a static cache, with its forward compiled (transformers' auto-compile,
    enabled on the CPU) when ``compile``; returns the sampled tokens (up to each row's first
    stop id)."""
    from transformers.generation.configuration_utils import CompileConfig

    torch.manual_seed(seed)
    k = work.num_samples
    config = None
    if compile:
        config = CompileConfig(dynamic=False, mode="default")
        config._compile_all_devices = True
    out = work.model.generate(
        input_ids=batch["input_ids"].repeat_interleave(k, 0), attention_mask=batch["attention_mask"].repeat_interleave(k, 0),
        do_sample=True, max_new_tokens=work.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        pad_token_id=work.tokenizer.pad_token_id, eos_token_id=stops, cache_implementation="static", compile_config=config,
    )
    completions, _ = cut_at_eos(out[:, batch["input_ids"].shape[1] :].tolist(), stops)
    return sum(map(len, completions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["sentiment", "small"], choices=["sentiment", "small"])
    parser.add_argument("--policy", default=str(ROOT / "data" / "tiny-llama"), help="sentiment: the policy folder")
    parser.add_argument("--engines", nargs="+", default=["generate", "auto"], choices=["generate", "auto", "auto-shared", "auto-repeated", "auto-concat", "static", "static-compile"])
    parser.add_argument("--samples", type=int, default=None, help="k, samples per prompt (default: the setting's)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts a batch (default: the setting's)")
    parser.add_argument("--device", default="cpu", help="where the model samples (cpu, cuda); wall time is the figure off the CPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.settings:
        size = {} if args.prompts is None else {"size": args.prompts}
        work = sentiment(args.policy, args.batches, **size) if name == "sentiment" else small(args.batches, **size)
        if args.samples is not None:
            work.num_samples = args.samples
        work.model.to(device=args.device, dtype=getattr(torch, args.dtype))
        work.batches = [{key: value.to(args.device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
                        for batch in work.batches]
        params = sum(p.numel() for p in work.model.parameters())
        print(f"\n{name}: {type(work.model).__name__} {params / 1e6:.2f}M parameters, vocab {work.model.config.vocab_size}, "
              f"{args.batches} batches of {len(work.batches[0]['prompt'])} prompts, k={work.num_samples}, "
              f"max_new_tokens={work.max_new_tokens}, {args.device} {args.dtype}, {args.threads} thread(s), "
              f"{args.repeats} interleaved repeats")
        results: dict[str, list[tuple[float, float, int, int]]] = {e: [] for e in args.engines}
        first: dict[str, tuple[float, float, int, int]] = {}
        for repeat in range(args.repeats):
            for engine in args.engines:
                result = run_engine(work, engine)
                if engine == "static-compile" and repeat == 0:
                    first[engine] = result
                    continue
                results[engine].append(result)
        rows = [(e, r) for e, r in results.items() if r] + [(f"{e} (1st, compiling)", [r]) for e, r in first.items()]
        base_wall = statistics.median(r[0] for r in results["generate"]) if results.get("generate") else None
        base_cpu = statistics.median(r[1] for r in results["generate"]) if results.get("generate") else None
        print(f"{'engine':28} {'wall s':>8} {'CPU s':>8} {'prompts/s':>10} {'tokens/s':>9} {'prompts/CPU-s':>14} "
              f"{'tokens/CPU-s':>13} {'tokens':>7} {'x wall':>7} {'x CPU':>6}")
        for engine, runs in rows:
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            prompts, tokens = runs[0][2], statistics.median(r[3] for r in runs)
            vs_wall = f"{base_wall / wall:.2f}" if base_wall else "-"
            vs_cpu = f"{base_cpu / cpu:.2f}" if base_cpu else "-"
            print(f"{engine:28} {wall:8.2f} {cpu:8.2f} {prompts / wall:10.1f} {tokens / wall:9.0f} {prompts / cpu:14.1f} "
                  f"{tokens / cpu:13.0f} {tokens:7.0f} {vs_wall:>7} {vs_cpu:>6}")


if __name__ == "__main__":
    main()
