"""Throughput and memory: dpo-lightning against TRL's DPOTrainer, same model, data and machine.

    python benchmarks/throughput.py                                  # both settings, 3 repeats
    python benchmarks/throughput.py --settings small --pairs 64 --repeats 1   # a quick look

Settings (``--settings small|large|both``), each a Llama built from one config (4 layers,
hidden 256, untied embeddings), saved once to a folder that every run loads, so all start from
the same weights:

* ``small``: vocab 2,000 (4.2M parameters), max length 256, 512 pairs (prompt 32-96 words,
  responses 32-150);
* ``large``: vocab 32,000 (19.6M parameters), max length 512, 128 pairs (prompt 64-192,
  responses 64-300).

The pairs are random words of a word-level tokenizer (one token per word), tokenized by the
same tokenizer for both tools. Every run: batch 8 pairs, fp32 weights, AdamW (lr 1e-5), no
evaluation, no checkpoints, no logger, one thread (``torch.set_num_threads(1)``,
``OMP_NUM_THREADS=1``), in its own subprocess with a fresh ``datasets`` cache (so each tool
tokenizes, and precomputes reference log-probs, from scratch). Repetitions are interleaved
(every run once, then every run again ...) and the table gives the median and the range.

Runs (``--runs``):

* ``trl-default``: TRL 1.x ``DPOConfig`` as it comes, given only the benchmark's settings
  (batch, lr, length, epochs, no saving): bf16 autocast and gradient checkpointing on (its
  defaults), random sampling. On a CPU without native bf16 (no AVX512-BF16 / AMX) autocast
  emulates bf16 and this run is an order of magnitude slower than the others, so it stops after
  ``--trl-default-steps`` optimizer steps (default 8; 0: the whole epoch) and its samples/s
  counts those steps' pairs (marked ``*``).
* ``trl-fp32``: ``bf16=False``, ``gradient_checkpointing=False``, random sampling.
* ``trl-best``: TRL at its best on a CPU: fp32 (``bf16=False``), no gradient checkpointing,
  length-grouped batches (``train_sampling_strategy="group_by_length"`` with a ``length``
  column, as transformers' ``LengthGroupedSampler`` reads it). ``padding_free`` falls back
  to padding in TRL 1.16 and Liger kernels need CUDA, so neither is used.
* ``ours``: dpo-lightning's defaults (``logprobs: auto``, length-grouped batches,
  ``share_prompt: auto``, which on a CPU runs each pair's prompt once).
* ``ours-plain``: with ``share_prompt: false`` (prompt run twice, as TRL does).
* ``ours-shared``: with ``share_prompt: true`` (not in the default list: on a CPU, ``ours``).
* ``trl-bf16``, ``ours-bf16`` (not in the default list): as ``trl-best`` and ``ours``, with bf16
  autocast (TRL ``bf16=True``, Lightning ``precision="bf16-mixed"``): the faster choice on a CPU
  with native bf16 (AVX512-BF16 or AMX), where it is not emulated.
* ``trl-best-precompute``, ``ours-precompute``, ``ours-plain-precompute``: the reference's
  log-probs computed once before training (TRL ``precompute_ref_log_probs=True``, ours
  ``reference: {precompute: true}``), 2 epochs.

The clock runs from loading the model to the end of training: tokenizer, model and reference
copy, loading and tokenizing the data, the reference pass where precomputed (TRL does it in
``DPOTrainer.__init__``, dpo-lightning at ``setup``) and training; only imports are left out.
samples/s counts pairs over all epochs. Printed: samples/s, tokens/s (non-padding tokens of
the chosen and rejected sequences), peak RSS, model FLOP utilisation (below), and the ratios of
ours to TRL at its best.

Model FLOP utilisation ("MFU"): the FLOPs of the work each run does, over its time, as a share
of a plain one-thread fp32 1024 x 1024 matmul (the best of several timings). Counted per pair
with prompt ``P``, chosen ``C`` and rejected ``R`` tokens (non-padding only, for every run), per
forward pass: ``2 x (decoder weights) x tokens run`` (the prompt once per pair in the shared
layout, twice otherwise), ``4 x hidden x layers x (query, key) pairs attended`` (causal: the
masked half is not counted), and ``2 x hidden x vocab x positions the LM head scores``
(completion tokens for dpo-lightning; every position for TRL on a CPU, as it runs). The policy
counts 3 forward passes (forward and backward), the reference 1 (once per pair in all, when
precomputed). Not counted: padding, the chunked head's recomputation in backward (as MFU leaves
out activation recomputation), embeddings, norms and other element-wise work.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench_common import ARCH, chosen_runs, peak_rss_mb, random_words, run_worker, save_model, save_word_tokenizer, summary
from bench_common import model_config as vocab_config

BATCH = 8
LR = 1e-5


@dataclass(frozen=True)
class Setting:
    vocab: int
    max_length: int
    pairs: int
    prompt_words: tuple[int, int]
    response_words: tuple[int, int]


SETTINGS = {
    "small": Setting(vocab=2_000, max_length=256, pairs=512, prompt_words=(32, 96), response_words=(32, 150)),
    "large": Setting(vocab=32_000, max_length=512, pairs=128, prompt_words=(64, 192), response_words=(64, 300)),
}


@dataclass(frozen=True)
class Run:
    tool: str  # "trl" or "ours"
    variant: str  # trl: "default" / "fp32" / "best" / "bf16"; ours: "default" / "plain" / "shared" / "bf16"
    precompute: bool
    epochs: int


RUNS = {
    "trl-default": Run("trl", "default", False, 1),
    "trl-fp32": Run("trl", "fp32", False, 1),
    "trl-best": Run("trl", "best", False, 1),
    "ours": Run("ours", "default", False, 1),
    "ours-plain": Run("ours", "plain", False, 1),
    "ours-shared": Run("ours", "shared", False, 1),
    "trl-bf16": Run("trl", "bf16", False, 1),
    "ours-bf16": Run("ours", "bf16", False, 1),
    "trl-best-precompute": Run("trl", "best", True, 2),
    "ours-precompute": Run("ours", "default", True, 2),
    "ours-plain-precompute": Run("ours", "plain", True, 2),
}
#: the TRL run each of ours is compared with
BASELINE = {"ours": "trl-best", "ours-plain": "trl-best", "ours-shared": "trl-best", "ours-bf16": "trl-bf16",
            "ours-precompute": "trl-best-precompute", "ours-plain-precompute": "trl-best-precompute"}
DEFAULT_RUNS = [name for name in RUNS if name not in ("ours-shared", "trl-bf16", "ours-bf16")]
#: runs in bf16 autocast (TRL's defaults included): no MFU, whose peak is an fp32 matmul
BF16_RUNS = {"trl-default", "trl-bf16", "ours-bf16"}


# -- shared inputs ------------------------------------------------------------------------------
def make_inputs(folder: Path, setting: Setting, pairs: int) -> None:
    """A word-level tokenizer of ``setting.vocab`` tokens, ``pairs`` random pairs and the initial
    weights (shared by every run and the reference copies), in ``folder``."""
    save_word_tokenizer(folder / "tokenizer", setting.vocab)
    rng = random.Random(0)
    with (folder / "pairs.jsonl").open("w") as f:
        for _ in range(pairs):
            prompt = random_words(rng, setting.vocab, setting.prompt_words)
            f.write(json.dumps({"prompt": prompt, "chosen": " " + random_words(rng, setting.vocab, setting.response_words),
                                "rejected": " " + random_words(rng, setting.vocab, setting.response_words)}) + "\n")
    save_model(folder / "model", setting.vocab)


def model_config(setting: Setting):
    return vocab_config(setting.vocab)


def pair_lengths(folder: Path, setting: Setting) -> list[tuple[int, int, int]]:
    """``(prompt, chosen, rejected)`` tokens of each pair as both tools tokenize them: ``<s>`` +
    prompt, completion + ``</s>``, each sequence capped at ``max_length`` by its completion."""
    lengths = []
    for line in (folder / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        p = len(row["prompt"].split()) + 1
        c, r = (min(p + len(row[k].split()) + 1, setting.max_length) - p for k in ("chosen", "rejected"))
        lengths.append((p, c, r))
    return lengths


def count_tokens(lengths: list[tuple[int, int, int]]) -> int:
    """Non-padding tokens of the chosen and rejected sequences of one epoch."""
    return sum(2 * p + c + r for p, c, r in lengths)


def model_params(setting: Setting) -> int:
    """All parameters of the setting's model."""
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config(setting)).parameters())


def forward_flops(setting: Setting, lengths: list[tuple[int, int, int]], shared: bool, head_everywhere: bool) -> float:
    """FLOPs of one forward pass over the pairs (see the module docstring for the convention).

    Args:
        lengths: ``(P, C, R)`` tokens per pair.
        shared: the prompt runs once per pair (``[prompt; chosen; rejected]``), not twice.
        head_everywhere: the LM head scores every position (TRL on a CPU), not only completions.
    """
    hidden, layers = ARCH["hidden_size"], ARCH["num_hidden_layers"]
    per_layer = 4 * hidden * hidden + 3 * hidden * ARCH["intermediate_size"]  # q, k, v, o; gate, up, down
    tri = lambda n: n * (n + 1) // 2  # noqa: E731  (query, key) pairs of a causal sequence of n tokens
    total = 0.0
    for p, c, r in lengths:
        tokens = p + c + r if shared else 2 * p + c + r
        attended = tri(p + c) + r * p + tri(r) if shared else tri(p + c) + tri(p + r)
        scored = 2 * p + c + r if head_everywhere else c + r
        total += 2 * per_layer * layers * tokens + 4 * hidden * layers * attended + 2 * hidden * setting.vocab * scored
    return total


def run_flops(setting: Setting, lengths: list[tuple[int, int, int]], run: Run, pairs: int) -> float:
    """FLOPs of a run that trains on ``pairs`` pairs (all epochs; the reference once per pair of
    the data when precomputed, else once per pair trained on)."""
    shared = run.tool == "ours" and run.variant != "plain"  # share_prompt: auto is on for a CPU Llama
    per_pair = forward_flops(setting, lengths, shared, head_everywhere=run.tool == "trl") / len(lengths)
    reference_passes = len(lengths) if run.precompute else pairs
    return per_pair * (3 * pairs + reference_passes)


def matmul_flops(trials: int = 5) -> float:
    """FLOP/s of a plain fp32 1024 x 1024 matmul on one thread: the best of ``trials`` timings of 10."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        n, start = 10, time.perf_counter()
        for _ in range(n):
            a @ b
        best = max(best, 2 * 1024**3 * n / (time.perf_counter() - start))
    return best


# -- one run per subprocess -----------------------------------------------------------------------
def run_ours(folder: Path, setting: Setting, run: Run, **options) -> tuple[float, float]:
    """(wall, CPU) seconds of one dpo-lightning run; ``options`` go to ``PreferenceModule``."""
    import lightning as L
    import torch

    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.losses import DPOLoss
    from dpo_lightning.models import ModelSpec
    from dpo_lightning.modules import PreferenceModule, ReferenceSpec

    start, cpu = time.perf_counter(), time.process_time()
    L.seed_everything(0, verbose=False)
    module = PreferenceModule(
        model=ModelSpec(name_or_path=str(folder / "model"), tokenizer=str(folder / "tokenizer")), loss=DPOLoss(beta=0.1),
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
        reference=ReferenceSpec(precompute=run.precompute, cache_dir=str(folder / f"cache-{os.getpid()}")),
        **{**({"share_prompt": run.variant == "shared"} if run.variant in ("plain", "shared") else {}), **options},
    )
    data = PreferenceDataModule(train_data=str(folder / "pairs.jsonl"), max_length=setting.max_length, batch_size=BATCH)
    data.connect(module.tokenizer, module.data_requirements)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=run.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        precision="bf16-mixed" if run.variant == "bf16" else "32-true",
    )
    trainer.fit(module, data)
    return time.perf_counter() - start, time.process_time() - cpu


def run_trl(folder: Path, setting: Setting, run: Run, max_steps: int = 0) -> tuple[float, float]:
    """(wall, CPU) seconds of one TRL run."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    start, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(folder / "model"), dtype=torch.float32)
    rows = datasets.load_dataset("json", data_files=str(folder / "pairs.jsonl"), split="train")
    settings = dict(
        output_dir=str(folder / f"trl-{os.getpid()}"), per_device_train_batch_size=BATCH, max_length=setting.max_length,
        num_train_epochs=run.epochs, learning_rate=LR, beta=0.1, save_strategy="no", eval_strategy="no",
        report_to=[], use_cpu=True, precompute_ref_log_probs=run.precompute, dataloader_num_workers=0, seed=0,
        disable_tqdm=True,
    )
    if run.variant == "default" and max_steps:
        settings.update(max_steps=max_steps)
    if run.variant in ("fp32", "best", "bf16"):
        settings.update(bf16=run.variant == "bf16", fp16=False, gradient_checkpointing=False, logging_steps=10_000,
                        lr_scheduler_type="constant")
    if run.variant in ("best", "bf16"):
        # the length transformers' LengthGroupedSampler groups by: the longer of the two sequences
        def length(row: dict) -> dict:
            n = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
            return {"length": min(n(row["prompt"]) + 2 + max(n(row["chosen"]), n(row["rejected"])), setting.max_length)}

        rows = rows.map(length)
        settings.update(train_sampling_strategy="group_by_length", length_column_name="length",
                        remove_unused_columns=False)
    args = DPOConfig(**settings)
    # a model object given to TRL is its own reference source only through ref_model
    reference = None if run.precompute else copy.deepcopy(model).eval()
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    return time.perf_counter() - start, time.process_time() - cpu


def worker(name: str, setting_name: str, folder: Path, trl_default_steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    run = RUNS[name]
    if run.tool == "ours":
        seconds, cpu = run_ours(folder, SETTINGS[setting_name], run)
    else:
        seconds, cpu = run_trl(folder, SETTINGS[setting_name], run, trl_default_steps if run.variant == "default" else 0)
    print("RESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb()}))


# -- driver -------------------------------------------------------------------------------------------
def measure(name: str, setting_name: str, folder: Path, python: str, trl_default_steps: int) -> dict | None:
    cmd = [python, __file__, "--worker", name, "--settings", setting_name, "--folder", str(folder),
           "--trl-default-steps", str(trl_default_steps)]
    return run_worker(cmd, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="both", choices=["small", "large", "both"])
    parser.add_argument("--pairs", type=int, help="pairs per setting (default: 512 small, 128 large)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--trl-default-steps", type=int, default=8,
                        help="stop trl-default after this many steps (0: the whole epoch); see the docstring")
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument("--worker", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.settings, Path(args.folder), args.trl_default_steps)
        return
    names, trl = chosen_runs(parser, args.runs, list(RUNS), lambda n: RUNS[n].tool == "trl")
    import torch
    import transformers

    settings = ["small", "large"] if args.settings == "both" else [args.settings]
    root = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    peak = matmul_flops()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {getattr(trl, '__version__', '-')}; "
          f"one thread per run; fp32 1024x1024 matmul on one thread (best of 5): {peak / 1e9:.1f} GFLOP/s")
    info, lengths = {}, {}
    for s in settings:
        setting = SETTINGS[s]
        pairs = args.pairs or setting.pairs
        make_inputs(root / s, setting, pairs)
        total = model_params(setting)
        lengths[s] = pair_lengths(root / s, setting)
        info[s] = {"pairs": pairs, "tokens": count_tokens(lengths[s]), "params": total}
        print(f"{s}: Llama vocab {setting.vocab}, {ARCH['num_hidden_layers']} layers, hidden {ARCH['hidden_size']}, "
              f"{total / 1e6:.1f}M params; {pairs} pairs, batch {BATCH}, max_length {setting.max_length}, "
              f"{info[s]['tokens']} tokens per epoch")

    results: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for s in settings:
            for name in names:
                r = measure(name, s, root / s, sys.executable, args.trl_default_steps)
                if r is None:
                    continue
                run = RUNS[name]
                pairs = info[s]["pairs"] * run.epochs
                if name == "trl-default" and args.trl_default_steps:
                    pairs = min(pairs, args.trl_default_steps * BATCH)
                tokens = info[s]["tokens"] * pairs / info[s]["pairs"]  # the steps' pairs: average length
                flops = run_flops(SETTINGS[s], lengths[s], run, pairs)
                r["capped"] = pairs < info[s]["pairs"] * run.epochs
                r.update(samples=pairs / r["seconds"], cpu_samples=pairs / r["cpu_seconds"], tokens=tokens / r["seconds"],
                         flops=flops / r["seconds"], repeat=repeat, setting=s, run=name)
                results.setdefault((s, name), []).append(r)
                print(f"  [{repeat + 1}/{args.repeats}] {s:<6}{name:<24}{r['samples']:8.2f} samples/s"
                      f"{r['seconds']:8.1f} s{r['cpu_seconds']:8.1f} CPU s{r['peak_rss_mb']:8.0f} MB", flush=True)

    print(f"\nmedian [min-max] over {args.repeats} interleaved repeat(s); one thread per run")
    header = (f"{'setting':<8}{'run':<24}{'epochs':>7}{'samples/s':>22}{'tokens/s':>10}{'peak RSS MB':>13}{'MFU':>11}"
              f"{'x TRL best':>12}{'per CPU-s':>11}{'x (CPU)':>9}")
    print(header)
    print("-" * len(header))
    for s in settings:
        for name in names:
            rs = results.get((s, name))
            if not rs:
                continue
            med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
            base = results.get((s, BASELINE.get(name, "")))
            ratio = f"{med('samples') / statistics.median(r['samples'] for r in base):.2f}" if base else ""
            cpu_ratio = f"{med('cpu_samples') / statistics.median(r['cpu_samples'] for r in base):.2f}" if base else ""
            mark = "*" if rs[0]["capped"] else ""
            print(f"{s:<8}{name + mark:<24}{RUNS[name].epochs:>7}{summary([r['samples'] for r in rs]):>22}{med('tokens'):>10.0f}"
                  f"{med('peak_rss_mb'):>13.0f}{'-' if name in BF16_RUNS else format(med('flops') / peak, '.0%'):>10}{ratio:>12}{med('cpu_samples'):>11.2f}{cpu_ratio:>9}")
    print("\nx TRL best: median samples/s of the run over TRL at its best in the same precision and reference mode "
          "(fp32: trl-best, no gradient checkpointing, length-grouped; bf16: trl-bf16; precomputed: trl-best-precompute); per CPU-s: pairs per second of the run's own CPU time "
          "(time waiting for a core left out: the steadier figure on a shared machine), x (CPU) its ratio; "
          "MFU: FLOPs of the work done (see the docstring) over time, as a share of the one-thread fp32 matmul (- for bf16 runs)")
    if any(rs[0]["capped"] for rs in results.values()):
        print(f"* stopped after {args.trl_default_steps} steps ({args.trl_default_steps * BATCH} pairs), clock end to end as for the others")
    for s in settings:
        best = results.get((s, "trl-best"))
        for other in ("trl-default", "trl-fp32"):
            if best and results.get((s, other)):
                b, o = (statistics.median(r["samples"] for r in x) for x in (best, results[(s, other)]))
                print(f"{s}: trl-best / {other} = {b / o:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "matmul_flops": peak,
                                               "results": [r for rs in results.values() for r in rs]}, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
