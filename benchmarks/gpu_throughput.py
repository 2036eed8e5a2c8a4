"""GPU throughput and memory: dpo-lightning's defaults against TRL's DPOTrainer (issue 22).

    python benchmarks/gpu_throughput.py                   # on a CUDA machine (see gpu_run.sh)
    python benchmarks/gpu_throughput.py --smoke           # CPU: tiny model, 2 + 3 steps
    python benchmarks/gpu_throughput.py --runs ours-bf16,trl-bf16-liger

Ported from the one-shot H200 reference harness (shared/gpu-bench/bench.py, 2026-12-04), same
setting: a Qwen2.5-0.5B-shaped Qwen2 (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864, vocab 151,936, tied embeddings) built from its config with seed 0 in every run (float32
weights, bf16 autocast on both sides); the project's tokenizer (data/tiny-llama: rows use its
ids, the 151,936-wide head is what costs); synthetic pairs of random one-token words, prompt and
each response 240-272 tokens; batch 8 pairs; AdamW lr 1e-6, weight decay 0; gradient clipping
1.0; 3 warmup + 12 timed optimizer steps.

Each run is a fresh subprocess (its peak GPU memory is its own); the parent prints one JSON line
per run (also appended to ``<out>/gpu.jsonl``; the children's output goes to
``<out>/children.log``) and then the table. An error is recorded per run; a run past
``--run-timeout`` is killed; runs that would start after ``--deadline`` seconds are skipped.

Clock: ``torch.cuda.synchronize()`` + ``perf_counter`` at the end of every optimizer step (both
tools, after the optimizer step); the timed window is the end of the last warmup step to the end
of the last step. samples/s = pairs in the timed steps / window; tokens/s = non-padding tokens of
the chosen and rejected sequences (the prompt counted in both).

MFU: model FLOPs per second over the chip's dense bf16 peak (``--peak-tflops``, default 989: the
H100/H200 SXM figure). Model FLOPs are what DPO needs, the same for both tools whatever they
skip or recompute: per token of a sequence, 2 x decoder weights (no embeddings), plus
4 x hidden x layers x (mean causal keys per token = n/2 for an n-token sequence) for attention,
plus 2 x hidden x vocab at completion tokens (the head is only needed there); 3 passes for the
policy (forward and backward), 1 for the reference.

Runs (``--runs a,b,...``; the extras, marked *, run only while time is left):

| run | what |
|---|---|
| ours-bf16 | ``PreferenceModule`` defaults (``bf16-mixed``): chunked head in bf16, fused AdamW, no cuDNN attention, liger head for the reference when installed |
| trl-bf16-liger | TRL ``bf16=True``, ``use_liger_kernel=True`` (the target's baseline) |
| trl-bf16 | TRL ``bf16=True`` (``adamw_torch_fused``, random batches) |
| trl-bf16-grouped | as trl-bf16 with ``train_sampling_strategy="group_by_length"`` |
| ours-bf16-noliger * | ours, chunked head for the reference too: A/B of the liger head (first, so a liger failure still leaves a figure for ours) |
| ours-bf16-cudnn * | ours, PyTorch's own SDPA choice (cuDNN allowed): A/B of the attention choice |
| ours-bf16-foreach * | ours, foreach AdamW: A/B of the fused optimizer |
| ours-bf16-share * | ours, ``share_prompt=True`` |
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
T0 = time.perf_counter()
SEED = 0
BATCH = 8
MAX_LENGTH = 768
#: (warmup, timed) optimizer steps
STEPS = {"gpu": (3, 12), "smoke": (2, 3)}
#: tokens per prompt / per response, uniform
LENGTHS = {"gpu": (240, 272), "smoke": (24, 40)}
MODEL_CONFIG = {
    "gpu": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                max_position_embeddings=2048, rms_norm_eps=1e-6, use_sliding_window=False),
    "smoke": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=4096, tie_word_embeddings=True,
                  max_position_embeddings=2048, use_sliding_window=False),
}
RUNS: dict[str, dict] = {
    "ours-bf16": dict(tool="ours"),
    "trl-bf16-liger": dict(tool="trl", liger=True),
    "trl-bf16": dict(tool="trl"),
    "trl-bf16-grouped": dict(tool="trl", grouped=True),
    "ours-bf16-noliger": dict(tool="ours", patch="noliger", extra=True),
    "ours-bf16-cudnn": dict(tool="ours", patch="cudnn", extra=True),
    "ours-bf16-foreach": dict(tool="ours", patch="foreach", extra=True),
    "ours-bf16-share": dict(tool="ours", share_prompt=True, extra=True),
}


def tokenizer_dir() -> str:
    return str(ROOT / "data" / "tiny-llama")


# ------------------------------------------------------------------------------------------ child
def make_rows(tokenizer, mode: str) -> tuple[list[dict], dict]:
    """Seeded pairs of random words, each one token of ``tokenizer`` (checked), so a text of n
    words is n tokens; returns the rows and their token statistics."""
    vocab = tokenizer.get_vocab()
    words = []
    for token in sorted(vocab, key=vocab.get):
        text = tokenizer.convert_tokens_to_string([token])
        if len(text) >= 3 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1:
                words.append(text)
    if len(words) < 20:
        raise RuntimeError(f"only {len(words)} one-token words in the tokenizer")
    rng = random.Random(SEED)
    low, high = LENGTHS[mode]
    text = lambda n: "".join(rng.choice(words) for _ in range(n))  # noqa: E731
    rows = []
    for _ in range(BATCH * (sum(STEPS[mode]) + 1)):  # one batch of slack; max_steps stops both tools
        prompt, chosen, rejected = text(rng.randint(low, high)), text(rng.randint(low, high)), text(rng.randint(low, high))
        while rejected == chosen:
            rejected = text(rng.randint(low, high))
        rows.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    sample = rows[:16]
    stats = dict(
        rows=len(rows),
        prompt_tokens_mean=sum(count(r["prompt"]) for r in sample) / len(sample),
        response_tokens_mean=sum(count(r["chosen"]) + count(r["rejected"]) for r in sample) / (2 * len(sample)),
    )
    return rows, stats


def model_flops_per_token(config: dict, prompt: float, response: float) -> float:
    """Model FLOPs per non-padding token of a plain-layout sequence (prompt + one response), all
    four passes (policy forward and backward = 3, reference forward = 1): see the docstring."""
    hidden, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    weights = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    length = prompt + response
    per_token = 2 * weights + 4 * hidden * layers * (length + 1) / 2 + 2 * hidden * config["vocab_size"] * response / length
    return 4 * per_token


class Recorder:
    """Step-end clock and the timed batches' token counts, shared by both tools' callbacks."""

    def __init__(self, cuda: bool, warmup: int, total: int) -> None:
        self.cuda, self.warmup, self.total = cuda, warmup, total
        self.ends: dict[int, float] = {}
        self.tokens = self.positions = self.pairs = 0

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def count(self, attention_mask) -> None:
        self.tokens += int(attention_mask.sum())
        self.positions += attention_mask.numel()
        self.pairs += attention_mask.shape[0] // 2

    def step_end(self, step: int) -> None:
        self.ends[step] = self.now()

    def summary(self) -> dict:
        out: dict = dict(steps_seen=max(self.ends) if self.ends else 0)
        if self.warmup in self.ends and self.total in self.ends:
            window = self.ends[self.total] - self.ends[self.warmup]
            out.update(
                timed_s=round(window, 4), pairs_timed=self.pairs, tokens_timed=self.tokens,
                samples_per_s=round(self.pairs / window, 3), tokens_per_s=round(self.tokens / window, 1),
                padded_tokens_per_s=round(self.positions / window, 1),
                step_ms=[round(1000 * (self.ends[s] - self.ends[s - 1]), 1) for s in range(self.warmup + 1, self.total + 1)],
            )
        return out


class CountingCollator:
    """Wraps a tool's collator and counts the timed steps' batches on the CPU (loader workers 0:
    called once per batch, in order; batch i is step i + 1's)."""

    def __init__(self, inner, rec: Recorder) -> None:
        self.inner, self.rec, self.calls = inner, rec, 0

    def __call__(self, examples):
        out = self.inner(examples)
        if self.rec.warmup <= self.calls < self.rec.total:
            self.rec.count(out["attention_mask"])
        self.calls += 1
        return out


def apply_patch(name: str | None) -> None:
    """The A/B runs: undo one of the project's per-device choices in this process."""
    if name == "cudnn":
        from dpo_lightning.modules import attention

        attention.sdpa_backends = lambda device_type: None
    elif name == "foreach":
        from dpo_lightning import optim

        optim.fused_kernel_allowed = lambda *args, **kwargs: False
    elif name == "noliger":
        from dpo_lightning.modules import liger_head

        liger_head.liger_installed = lambda: False
    elif name is not None:
        raise ValueError(f"unknown patch {name!r}")


def run_ours(spec: dict, result: dict, mode: str) -> None:
    import lightning as L
    import torch

    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.losses import DPOLoss
    from dpo_lightning.models import ModelSpec
    from dpo_lightning.modules import PreferenceModule
    from dpo_lightning.modules.attention import sdpa_backends
    from dpo_lightning.modules.liger_head import use_liger_head

    apply_patch(spec.get("patch"))
    cuda = mode == "gpu"
    warmup, timed = STEPS[mode]
    L.seed_everything(SEED, verbose=False)
    options = {k: spec[k] for k in ("share_prompt",) if k in spec}
    module = PreferenceModule(
        model=ModelSpec(config=dict(MODEL_CONFIG[mode]), tokenizer=tokenizer_dir(), seed=SEED),
        loss=DPOLoss(beta=0.1), optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0),
        **options,
    )
    result["params_m"] = round(sum(p.numel() for p in module.policy.parameters()) / 1e6, 2)
    result["attn_implementation"] = getattr(module.policy.config, "_attn_implementation", None)
    rows, stats = make_rows(module.tokenizer, mode)
    result["data"] = stats
    data = PreferenceDataModule(train_data=rows, max_length=MAX_LENGTH, batch_size=BATCH)
    data.connect(module.tokenizer, module.data_requirements)
    rec = Recorder(cuda, warmup, warmup + timed)
    make_collator = data.collator
    data.collator = lambda: CountingCollator(make_collator(), rec)
    losses: list = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                selector, device = pl_module.logprob_selector, batch["input_ids"].device
                result["logprob_path"] = "full" if not selector.chunked(pl_module.policy, trainer.strategy) else (
                    "shared-prompt" if selector.shares_prompt(pl_module.policy, batch) else "chunked")
                optimizer = trainer.optimizers[0]
                result["optimizer"] = f"{type(optimizer).__name__} fused={optimizer.defaults.get('fused')}"
                result["sdpa_backends"] = str(sdpa_backends(device.type))
                result["liger_reference_head"] = use_liger_head(device.type, needs_grad=False)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is not None:
                losses.append(loss.detach())
            rec.step_end(trainer.global_step)

    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed", max_steps=warmup + timed,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_val_batches=0, gradient_clip_val=1.0, enable_model_summary=False, callbacks=[Clock()],
    )
    trainer.fit(module, data)
    finish(result, rec, losses, cuda)


def run_trl(spec: dict, result: dict, mode: str) -> None:
    import copy

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_lightning.models import ModelSpec, load_causal_lm, load_tokenizer

    cuda = mode == "gpu"
    warmup, timed = STEPS[mode]
    torch.manual_seed(SEED)
    model_spec = ModelSpec(config=dict(MODEL_CONFIG[mode]), tokenizer=tokenizer_dir(), seed=SEED)
    tokenizer = load_tokenizer(model_spec)
    model = load_causal_lm(model_spec, tokenizer)  # the same weights as ours (same spec, same seed)
    result["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    ref = copy.deepcopy(model).eval()
    rows, stats = make_rows(tokenizer, mode)
    result["data"] = stats
    kw = dict(
        output_dir=str(Path(os.environ.get("GPU_BENCH_WORK", "/tmp/gpu-bench")) / "trl-out"),
        per_device_train_batch_size=BATCH, max_steps=warmup + timed, learning_rate=1e-6, beta=0.1,
        max_length=MAX_LENGTH, bf16=True, gradient_checkpointing=False, report_to="none", logging_steps=100,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=SEED, use_cpu=not cuda,
    )
    if spec.get("liger"):
        kw["use_liger_kernel"] = True
    if spec.get("grouped"):
        kw.update(train_sampling_strategy="group_by_length", remove_unused_columns=False)
    args = DPOConfig(**kw)
    result["settings"] = dict(optim=str(args.optim), use_liger_kernel=bool(getattr(args, "use_liger_kernel", False)),
                              sampling=str(getattr(args, "train_sampling_strategy", None)))
    rec = Recorder(cuda, warmup, warmup + timed)
    losses: list = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **k):
            rec.step_end(state.global_step)

    class Trainer(DPOTrainer):
        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            losses.append(loss.detach())
            return loss

    trainer = Trainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, callbacks=[Clock()])
    if spec.get("grouped"):  # the `length` column LengthGroupedSampler reads
        trainer.train_dataset = trainer.train_dataset.map(
            lambda e: {"length": len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))})
    trainer.data_collator = CountingCollator(trainer.data_collator, rec)
    trainer.train()
    finish(result, rec, losses, cuda)


def finish(result: dict, rec: Recorder, losses: list, cuda: bool) -> None:
    import torch

    result.update(rec.summary())
    values = [float(x) for x in losses]
    if values:
        result.update(loss_first=round(values[0], 6), loss_last=round(values[-1], 6))
    if cuda:
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    else:
        import resource

        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if "samples_per_s" not in result:
        result["error"] = f"timed window incomplete: step ends seen {sorted(rec.ends)}"


def env_info(mode: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info: dict = dict(python=sys.version.split()[0], mode=mode)
    for name in ("torch", "transformers", "lightning", "trl", "datasets", "liger-kernel", "triton"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    import torch

    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1))
    import dpo_lightning

    info["dpo_lightning"] = str(Path(dpo_lightning.__file__).resolve().parent)
    return info


def head_check() -> dict:
    """On CUDA: the chunked head under bf16 autocast and the liger head (when installed) against
    a float64 reference, on one (1024, 896) x (151936, 896) problem; max abs log-prob errors."""
    import torch

    from dpo_lightning.modules.liger_head import liger_installed, liger_target_logprobs
    from dpo_lightning.modules.logprobs import ChunkedTargetLogProbs

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1024, 896, device="cuda", generator=g)
    weight = 0.02 * torch.randn(151936, 896, device="cuda", generator=g)
    targets = torch.randint(0, 151936, (1024,), device="cuda", generator=g)
    reference = ChunkedTargetLogProbs.apply(hidden.double(), weight.double(), targets, 256)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        chunked = ChunkedTargetLogProbs.apply(hidden, weight, targets, 1024)
    out = {"chunked_bf16_max_err": float((chunked.double() - reference).abs().max())}
    if liger_installed():
        liger = liger_target_logprobs(hidden.bfloat16(), weight.bfloat16(), targets)
        out["liger_bf16_max_err"] = float((liger.double() - reference).abs().max())
    return out


def child(name: str, result_path: str, mode: str) -> int:
    result: dict = dict(run=name)
    try:
        if name == "env":
            result.update(env_info(mode))
            if mode == "gpu":
                result.update(head_check())
        else:
            spec = RUNS[name]
            result["tool"] = spec["tool"]
            (run_ours if spec["tool"] == "ours" else run_trl)(spec, result, mode)
    except BaseException as err:  # noqa: BLE001 - every failure is the run's result
        result["error"] = f"{type(err).__name__}: {str(err)[:1500]}"
        result["traceback"] = traceback.format_exc()[-3000:]
    result["t_child_s"] = round(time.perf_counter() - T0, 2)
    Path(result_path).write_text(json.dumps(result, default=str))
    return 0


# ----------------------------------------------------------------------------------------- parent
def launch(name: str, mode: str, timeout: float, work: Path, log) -> dict:
    """Run ``name`` in a fresh subprocess; its JSON result (or why there is none)."""
    result_path, own_log = work / f"result-{name}.json", work / f"log-{name}.txt"
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(work / "hf"), TOKENIZERS_PARALLELISM="false",
               WANDB_DISABLED="true", GPU_BENCH_WORK=str(work))
    start = time.perf_counter()
    with own_log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, str(HERE), "--child", name, str(result_path), "--mode", mode],
                                stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    text = own_log.read_text(errors="replace")
    log.write(f"\n===== {name} (rc {rc}, {time.perf_counter() - start:.1f} s) =====\n{text}")
    log.flush()
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = dict(run=name, error=f"no result (rc {rc}); log tail: {text[-1500:]}")
    if timed_out:
        result["error"] = f"timeout after {timeout:.0f} s"
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def table(results: list[dict], mode: str, peak_tflops: float) -> list[str]:
    """The printed table: one line per run, ratios against trl-bf16-liger (else trl-bf16)."""
    base = next((r for name in ("trl-bf16-liger", "trl-bf16") for r in results
                 if r["run"] == name and "samples_per_s" in r), None)
    memory = "peak GiB" if mode == "gpu" else "peak RSS MiB"
    lines = [f"{'run':<20}{'samples/s':>11}{'tokens/s':>11}{memory:>14}{'MFU':>8}{'x base':>9}{'mem x base':>12}"]
    for r in results:
        if "samples_per_s" not in r:
            lines.append(f"{r['run']:<20} ERROR {str(r.get('error'))[:300]}")
            continue
        mem = r.get("peak_mem_gib", r.get("peak_rss_mib"))
        stats = r["data"]
        flops = model_flops_per_token(MODEL_CONFIG[mode], stats["prompt_tokens_mean"], stats["response_tokens_mean"])
        mfu = f"{r['tokens_per_s'] * flops / (peak_tflops * 1e12):.1%}" if mode == "gpu" else "-"
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
        base_mem = base.get("peak_mem_gib", base.get("peak_rss_mib")) if base else None
        mem_ratio = f"{mem / base_mem:.2f}x" if base_mem else "-"
        lines.append(f"{r['run']:<20}{r['samples_per_s']:>11.2f}{r['tokens_per_s']:>11.0f}{mem:>14}{mfu:>8}{ratio:>9}{mem_ratio:>12}")
    return lines


def trl_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny model, 2 + 3 steps; TRL only if installed")
    parser.add_argument("--runs", default="", help=f"comma-separated, of {list(RUNS)}; default all (smoke: ours-bf16 "
                                                   "and, when trl is installed, trl-bf16)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu-bench-out")
    parser.add_argument("--deadline", type=float, default=420.0, help="no run starts after this many seconds")
    parser.add_argument("--run-timeout", type=float, default=150.0)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak, for MFU")
    parser.add_argument("--child", nargs=2, metavar=("RUN", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="gpu", choices=list(STEPS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child[0], args.child[1], args.mode)
    mode = "smoke" if args.smoke else "gpu"
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if not names:
        names = list(RUNS) if mode == "gpu" else ["ours-bf16"] + (["trl-bf16"] if trl_installed() else [])
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        print(f"unknown runs {unknown}; known: {list(RUNS)}", flush=True)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_BENCH_WORK", "/tmp/gpu-bench"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# gpu_throughput: mode={mode} runs={names} steps={STEPS[mode]} batch={BATCH} out={out}", flush=True)
    results = []
    with (out / "gpu.jsonl").open("a") as sink, (out / "children.log").open("a") as log:
        for name in ["env", *names]:
            left = args.deadline - (time.perf_counter() - T0)
            if name != "env" and (left < 45 or (RUNS[name].get("extra") and left < 100)):
                record = dict(run=name, error=f"skipped: {left:.0f} s left before the deadline")
            else:
                record = launch(name, mode, min(args.run_timeout, max(left - 10, 30)), work, log)
            if "error" not in record:
                record.pop("traceback", None)
            print(json.dumps(record, default=str), flush=True)
            sink.write(json.dumps(record, default=str) + "\n")
            if name != "env":
                results.append(record)
    print(f"\n# {mode}: samples/s = pairs/s over the timed steps; x base = ratio to trl-bf16-liger (else trl-bf16)",
          flush=True)
    for line in table(results, mode, args.peak_tflops):
        print(line, flush=True)
    print(f"# total {time.perf_counter() - T0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
