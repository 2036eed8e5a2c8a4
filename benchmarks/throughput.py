"""Throughput and memory: dpo-lightning against TRL's DPOTrainer, same model, data and machine.

    python benchmarks/throughput.py                 # every run; TRL's only if `trl` imports
    python benchmarks/throughput.py --pairs 32      # smaller, quicker

Each run is a fresh subprocess (so peak RSS is its own): a Llama built from one config
(vocab 32k, 4 layers, hidden 256), the same synthetic pairs (prompt + completion up to 512
tokens) tokenized by the same word-level tokenizer, batch 4 pairs, AdamW, fp32 on the CPU.
The clock runs from the call that builds the trainer's data and reference log-probs to the end
of training (model construction excluded for both); samples/s counts pairs.

Printed: samples/s, tokens/s (non-padding tokens of chosen and rejected sequences), peak RSS,
achieved model FLOP/s ((6 x policy + 2 x reference) x params without the input embedding x
tokens / time) against a plain fp32 matmul on this machine, and the ratios to TRL.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 32000
MODEL = {
    "model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
BATCH = 4
MAX_LENGTH = 512
LR = 1e-5


# -- shared inputs ------------------------------------------------------------------------------
def make_inputs(folder: Path, pairs: int) -> None:
    """A 32k word-level tokenizer and ``pairs`` random pairs, written to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i + len(specials) for i in range(VOCAB - len(specials))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder / "tokenizer")
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(VOCAB - len(specials))}" for _ in range(n))

    with (folder / "pairs.jsonl").open("w") as f:
        for _ in range(pairs):
            prompt = words(rng.randint(64, 192))
            f.write(json.dumps({"prompt": prompt, "chosen": " " + words(rng.randint(64, 300)),
                                "rejected": " " + words(rng.randint(64, 300))}) + "\n")


def count_tokens(folder: Path, epochs: int) -> int:
    """Non-padding tokens of the chosen and rejected sequences, over all epochs (capped at MAX_LENGTH)."""
    total = 0
    for line in (folder / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        p = len(row["prompt"].split()) + 1
        for key in ("chosen", "rejected"):
            total += min(p + len(row[key].split()) + 1, MAX_LENGTH)
    return total * epochs


def model_params() -> int:
    """Parameters that do work per token: all but the input embedding."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**MODEL, "vocab_size": VOCAB}))
    total = sum(p.numel() for p in model.parameters())
    del torch
    return total - model.get_input_embeddings().weight.numel()


def matmul_flops() -> float:
    """FLOP/s of a plain fp32 1024 x 1024 matmul with this process's threads."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n, start = 20, time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - start)


# -- one run per subprocess -----------------------------------------------------------------------
def run_dpo_lightning(folder: Path, precompute: bool, epochs: int, share_prompt: bool = False) -> float:
    import lightning as L

    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.losses import DPOLoss
    from dpo_lightning.models import ModelSpec
    from dpo_lightning.modules import PreferenceModule

    L.seed_everything(0, verbose=False)
    module = PreferenceModule(
        model=ModelSpec(config=dict(MODEL), tokenizer=str(folder / "tokenizer")), loss=DPOLoss(beta=0.1),
        optimizer=lambda params: __import__("torch").optim.AdamW(params, lr=LR),
        precompute_reference=precompute, reference_cache_dir=str(folder / f"cache-{os.getpid()}"),
        share_prompt=share_prompt,
    )
    data = PreferenceDataModule(train_data=str(folder / "pairs.jsonl"), max_length=MAX_LENGTH, batch_size=BATCH)
    data.connect(module.tokenizer, module.data_requirements)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - start


def run_trl(folder: Path, precompute: bool, epochs: int) -> float:
    import datasets
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    config = AutoConfig.for_model(**{**MODEL, "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    model = AutoModelForCausalLM.from_config(config)
    rows = datasets.load_dataset("json", data_files=str(folder / "pairs.jsonl"), split="train")
    args = DPOConfig(
        output_dir=str(folder / f"trl-{os.getpid()}"), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
        num_train_epochs=epochs, learning_rate=LR, beta=0.1, logging_steps=10_000, save_strategy="no",
        report_to=[], use_cpu=True, precompute_ref_log_probs=precompute, dataloader_num_workers=0, seed=0,
        lr_scheduler_type="constant", warmup_steps=0,
    )
    reference = None if precompute else copy.deepcopy(model).eval()  # TRL can't rebuild a config-made model
    start = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    return time.perf_counter() - start


def worker(tool: str, folder: Path, precompute: bool, epochs: int) -> None:
    if tool == "dpo-lightning-shared":
        seconds = run_dpo_lightning(folder, precompute, epochs, share_prompt=True)
    else:
        seconds = (run_dpo_lightning if tool == "dpo-lightning" else run_trl)(folder, precompute, epochs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


# -- driver -------------------------------------------------------------------------------------------
def measure(tool: str, folder: Path, precompute: bool, epochs: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", tool, "--folder", str(folder), "--epochs", str(epochs)]
    if precompute:
        cmd.append("--precompute")
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        print(f"  {tool} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--worker", choices=["dpo-lightning", "dpo-lightning-shared", "trl"])
    parser.add_argument("--tools", default="dpo-lightning,dpo-lightning-shared,trl",
                        help="comma-separated runs: dpo-lightning, dpo-lightning-shared (share_prompt), trl")
    parser.add_argument("--folder")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precompute", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.folder), args.precompute, args.epochs)
        return
    tools = args.tools.split(",")
    try:
        import trl  # noqa: F401
    except ImportError:
        if "trl" in tools:
            tools.remove("trl")
            print("trl is not installed: measuring dpo-lightning only (pip install trl to compare)")
    import torch

    folder = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    make_inputs(folder, args.pairs)
    params = model_params()
    peak = matmul_flops()
    print(f"model: Llama vocab {VOCAB}, {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
          f"{params / 1e6:.1f}M params (without input embedding); {args.pairs} pairs, batch {BATCH}, "
          f"max_length {MAX_LENGTH}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"fp32 matmul: {peak / 1e9:.1f} GFLOP/s")
    settings = [("live reference, 1 epoch", False, 1), ("precomputed reference, 2 epochs", True, 2)]
    results: dict[tuple[str, str], dict] = {}
    print(f"\n{'run':<34}{'tool':<22}{'samples/s':>10}{'tokens/s':>10}{'peak RSS MB':>13}{'model GFLOP/s':>15}{'of matmul':>11}")
    for label, precompute, epochs in settings:
        tokens = count_tokens(folder, epochs)
        for tool in tools:
            r = measure(tool, folder, precompute, epochs)
            if r is None:
                continue
            flops_per_token = (6 + (0 if precompute else 2)) * params
            extra = (2 * params * count_tokens(folder, 1)) if precompute else 0  # the one reference pass
            achieved = (flops_per_token * tokens + extra) / r["seconds"]
            r.update(samples=args.pairs * epochs / r["seconds"], tokens=tokens / r["seconds"], flops=achieved)
            results[(label, tool)] = r
            print(f"{label:<34}{tool:<22}{r['samples']:>10.2f}{r['tokens']:>10.0f}{r['peak_rss_mb']:>13.0f}"
                  f"{achieved / 1e9:>15.1f}{achieved / peak:>10.0%}")
    if "trl" in tools:
        print("\nratios dpo-lightning / TRL:")
        for label, _, _ in settings:
            ours, theirs = results.get((label, "dpo-lightning")), results.get((label, "trl"))
            if ours and theirs:
                print(f"  {label:<34} samples/s x{ours['samples'] / theirs['samples']:.2f}   "
                      f"peak RSS x{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}")
        ours_pre = results.get(("precomputed reference, 2 epochs", "dpo-lightning"))
        trl_live = results.get(("live reference, 1 epoch", "trl"))
        if ours_pre and trl_live:
            print(f"  {'ours precomputed vs TRL live':<34} samples/s x{ours_pre['samples'] / trl_live['samples']:.2f}")


if __name__ == "__main__":
    main()
