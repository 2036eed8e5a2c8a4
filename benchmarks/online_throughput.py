"""Online DPO and an iterative DPO round: dpo-lightning against TRL, same model, prompts, judge and machine.

    python benchmarks/online_throughput.py                      # both settings, 3 interleaved repeats
    python benchmarks/online_throughput.py --quick              # a few steps of each run (under a minute)

Two run families (``--runs``):

* online DPO: ``ours-online`` (:class:`~dpo_lightning.modules.OnlinePreferenceModule` through
  the Python API, its defaults otherwise) against ``trl-online`` (TRL's
  ``trl.experimental.online_dpo.OnlineDPOTrainer``). Every step: 2 completions for each of
  ``batch`` prompts (TRL's fixed count), judged by one Python function, best against worst,
  DPO (beta 0.1) on the pair, AdamW (lr 1e-5, constant), gradient norm clipped at 1 (TRL's
  default ``max_grad_norm``), ``steps`` steps. Not in the default list: ``trl-online-random``,
  TRL with random batches instead of length-grouped ones; ``ours-online-share``, ours with
  ``share_prompt: auto`` (on a CPU each pair's prompt runs once: the online module's default;
  ``ours-online`` sets ``false``, the prompt twice as in TRL and the default before); ``ours-online-generate`` and ``ours-iter-generate``, ours with
  ``sampling.engine: generate`` (transformers' ``generate`` instead of the default sampling loop
  of ``dpo_lightning.decoding``, where this checkout has one); ``ours-online-k8-pairs`` and
  ``ours-online-k8-samples``, ours with 8 samples a prompt and every pair of them, trained as
  pairs (``samples_once: false``) or with each sample's sequence once (``true``; on a CPU each
  prompt once for all its samples), the second's ratio against the first (no TRL counterpart:
  its online trainer samples 2); ``ours-online-k8-samples-separate``, each sample's sequence
  once with its own copy of the prompt (``share_prompt: false``, the samples layout before the
  prompt was shared by a prompt's samples).
* an iterative round: ``ours-iter`` (one round of
  :class:`~dpo_lightning.iterative.IterativePairsDataModule` +
  :class:`~dpo_lightning.modules.IterativePreferenceModule`: ``k`` completions for each of
  ``iter_prompts`` prompts, judged, best against worst, one epoch of DPO on the pairs) against
  ``trl-iter``, the same loop written with TRL: ``model.generate`` (same settings, prompts in
  length order in generation batches of the same size, ``num_return_sequences=k``), the judge,
  best against worst as text in a ``datasets.Dataset``, then ``DPOTrainer`` at its best CPU
  settings (``throughput.py``'s ``trl-best``: fp32, no gradient checkpointing, length-grouped).

Sampling on both sides: temperature 1, top-p 1, top-k 0, the same ``max_new_tokens``, the KV
cache, stop at the tokenizer's EOS. TRL tokenizes a prompt with ``add_special_tokens=False``,
so its prompts are given with the tokenizer's BOS written in front: both tools sample after the
same token ids (checked and printed). TRL at its best on a CPU: fp32 (``bf16=False``), no
gradient checkpointing (so generation uses the KV cache), no vLLM, length-grouped prompt
batches (as dpo-lightning's ``group_by_length`` default).

Settings (``--settings small|sentiment|both``):

* ``small``: ``throughput.py``'s small Llama (4 layers, hidden 256, vocab 2,000 word-level
  tokens, 4.2M parameters), prompts of 32-96 random words, ``max_new_tokens`` 64, judge
  ``bench_common:word_score`` (a deterministic score of the words; ties almost never happen);
  online: 8 prompts a step, 16 steps; iterative: 64 prompts, k 4, generation batches of 16
  prompts, training batches of 8 pairs.
* ``sentiment``: the shape of ``recipes/online_dpo.yaml``: the shipped tiny Llama
  (``data/tiny-llama``: 2 layers, hidden 64, vocab 512), ``data/sentiment/pair_prompts.jsonl``,
  judge ``dpo_lightning.experiments.sentiment:score``, ``max_new_tokens`` 32; online: 16 prompts
  a step (base.yaml's batch), 64 steps; iterative: 512 prompts, k 4, generation batches of 64
  prompts (the recipe's), training batches of 16 pairs. The sentiment judge often gives two
  samples the same score (0.5: no sentiment word): dpo-lightning skips such a prompt (no pair),
  TRL trains on it as a pair; the pairs each side trained on are printed.

Every run: one thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), its own
subprocess, repeats interleaved (every run once, then again). The clock runs from loading the
model to the end of training (imports outside). Printed per run: prompts/s end to end (wall),
prompts per CPU-second (the process's own CPU time: the steadier figure on a shared machine),
peak RSS, and where the CPU time went. Phases, by wrapping functions inside the worker process
(no library code changed), CPU seconds:

* online, per step (a Lightning callback's ``on_train_batch_start`` -> ``on_train_batch_end``;
  TRL's ``on_step_begin`` -> ``on_step_end``): ``generate`` (ours ``sample_completions``,
  decoding included; TRL ``OnlineDPOTrainer._generate``), ``score`` (ours ``judge_and_pair``:
  the judge and the pairing; TRL ``_calculate_rewards_from_functions``), ``train`` = the rest
  of the step (log-prob passes of policy and reference, loss, backward, optimizer, logging;
  TRL's decoding of the completions too). The shares are of the steps' CPU time; ``steps/e2e``
  is the steps' share of the run's CPU time (the rest: model loading, data, setup).
* iterative, of the whole run: ``generate`` and ``score`` as above, ``train`` the training
  steps (timed as the online steps, on both sides: batch start to batch end), ``other`` the rest
  (loading, setup, the training loop between steps, tokenizing the pairs: TRL's
  ``DPOTrainer.__init__`` tokenizes them, dpo-lightning keeps the sampled token ids).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench_common import ARCH, chosen_runs, peak_rss_mb, random_words, run_worker, save_model, save_word_tokenizer, summary

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-5
BETA = 0.1
#: prompts written for the small setting (online steps and the iterative round draw from them)
SMALL_PROMPTS = 512


@dataclass(frozen=True)
class Setting:
    """One benchmark shape (see the module docstring)."""

    judge: str  # module:function of a str -> float judge
    max_new_tokens: int
    batch: int  # prompts per online step
    steps: int  # online steps
    iter_prompts: int
    k: int  # samples per prompt in the iterative round
    generation_batch: int  # prompts per generate call in the iterative round
    train_batch: int  # pairs per training step in the iterative round
    max_length: int  # prompt + completion tokens (TRL's max_length)
    quick_steps: int = 2
    quick_iter_prompts: int = 16


SETTINGS = {
    "small": Setting(judge="bench_common:word_score", max_new_tokens=64, batch=8, steps=16, iter_prompts=64, k=4,
                     generation_batch=16, train_batch=8, max_length=256, quick_iter_prompts=16),
    "sentiment": Setting(judge="dpo_lightning.experiments.sentiment:score", max_new_tokens=32, batch=16, steps=64,
                         iter_prompts=512, k=4, generation_batch=64, train_batch=16, max_length=128,
                         quick_iter_prompts=32),
}
RUNS = {  # name: (family, tool)
    "trl-online": ("online", "trl"),
    "ours-online": ("online", "ours"),
    "trl-iter": ("iter", "trl"),
    "ours-iter": ("iter", "ours"),
    "trl-online-random": ("online", "trl"),
    "ours-online-share": ("online", "ours"),
    "ours-online-generate": ("online", "ours"),
    "ours-iter-generate": ("iter", "ours"),
    "ours-online-k8-pairs": ("online", "ours"),
    "ours-online-k8-samples": ("online", "ours"),
    "ours-online-k8-samples-separate": ("online", "ours"),
}
DEFAULT_RUNS = ["trl-online", "ours-online", "trl-iter", "ours-iter"]
BASELINE = {"ours-online": "trl-online", "ours-online-share": "trl-online", "ours-online-generate": "trl-online",
            "ours-iter": "trl-iter", "ours-iter-generate": "trl-iter",
            "ours-online-k8-samples": "ours-online-k8-pairs",
            "ours-online-k8-samples-separate": "ours-online-k8-pairs"}


# -- inputs ---------------------------------------------------------------------------------------------
def make_inputs(folder: Path, name: str) -> None:
    """The setting's model and tokenizer folders and ``prompts.jsonl`` in ``folder``: the small
    Llama built once (``bench_common.save_model``) with random word prompts; the tiny Llama and
    the sentiment prompts copied from the repository."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "small":
        vocab = 2_000
        save_word_tokenizer(folder / "tokenizer", vocab)
        save_model(folder / "model", vocab)
        rng = random.Random(0)
        rows = [{"prompt": random_words(rng, vocab, (32, 96))} for _ in range(SMALL_PROMPTS)]
    else:
        shutil.copytree(ROOT / "data" / "tiny-llama", folder / "model")
        shutil.copytree(ROOT / "data" / "tiny-llama", folder / "tokenizer")
        rows = [json.loads(line) for line in (ROOT / "data" / "sentiment" / "pair_prompts.jsonl").read_text().splitlines()]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))


def trl_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as TRL is given it: with the BOS text in front when the tokenizer adds one
    (TRL tokenizes prompts with ``add_special_tokens=False``)."""
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return tokenizer.bos_token + prompt if adds_bos else prompt


def check_same_prompt_ids(folder: Path) -> bool:
    """Whether TRL's tokenization of :func:`trl_prompt` gives dpo-lightning's prompt ids for the
    first 16 prompts."""
    from transformers import AutoTokenizer

    from dpo_lightning.generation import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    prompts = [json.loads(line)["prompt"] for line in (folder / "prompts.jsonl").read_text().splitlines()[:16]]
    return all(
        tokenizer(trl_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] == encode_prompt(tokenizer, p)
        for p in prompts
    )


def load_judge(path: str) -> Callable[[str], float]:
    """The judge function ``module:function``."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# -- timing inside a worker ---------------------------------------------------------------------------
class Phases:
    """CPU seconds (``time.process_time``) per named phase, and per training step."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._step_start: float | None = None

    def wrap(self, name: str, fn: Callable) -> Callable:
        """``fn`` with its CPU time added to phase ``name``."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[name] += time.process_time() - start
        return timed

    def step_start(self) -> None:
        self._step_start = time.process_time()

    def step_end(self) -> None:
        assert self._step_start is not None
        self.cpu["step"] += time.process_time() - self._step_start
        self.steps += 1
        self._step_start = None

    def lightning_callback(self):
        import lightning as L

        phases = self

        class StepTimer(L.Callback):
            def on_train_batch_start(self, *args: Any) -> None:
                phases.step_start()

            def on_train_batch_end(self, *args: Any) -> None:
                phases.step_end()

        return StepTimer()

    def trainer_callback(self):
        from transformers import TrainerCallback

        phases = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
                phases.step_start()

            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                phases.step_end()

        return StepTimer()


def lightning_trainer(callback: Any, root: Path, **options: Any):
    """A CPU Lightning trainer without logger, checkpoints, progress bar or validation."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
        default_root_dir=str(root), callbacks=[callback], **options,
    )


# -- the runs (each in its own process) ------------------------------------------------------------------
def sampling_spec(setting: Setting, num_samples: int, engine: str | None, pairs: str = "best_vs_worst"):
    """The runs' ``SamplingSpec``: exact sampling, the setting's ``max_new_tokens``, and
    ``engine`` when given (refused on a checkout without ``sampling.engine``)."""
    from dpo_lightning.generation import SamplingSpec

    options = {}
    if engine is not None:
        if "engine" not in SamplingSpec.__dataclass_fields__:
            raise SystemExit("this dpo-lightning has no sampling.engine: the *-generate runs need the decoding loop")
        options["engine"] = engine
    if pairs != "best_vs_worst":
        options["pairs"] = pairs
    return SamplingSpec(num_samples=num_samples, max_new_tokens=setting.max_new_tokens, temperature=1.0, top_p=1.0,
                        top_k=0, **options)


def online_ours(folder: Path, setting: Setting, steps: int, engine: str | None = None, num_samples: int = 2,
                pair_mode: str = "best_vs_worst", **options: Any) -> dict:
    """``options`` go to ``OnlinePreferenceModule``; ``num_samples`` and ``pair_mode``
    (``sampling.pairs``) to its sampling."""
    import lightning as L
    import torch

    import dpo_lightning.modules.online as online
    from dpo_lightning.data import PromptDataModule
    from dpo_lightning.judges import FunctionJudge
    from dpo_lightning.losses import DPOLoss
    from dpo_lightning.models import ModelSpec
    from dpo_lightning.modules import OnlinePreferenceModule

    phases = Phases()
    online.sample_completions = phases.wrap("generate", online.sample_completions)
    online.judge_and_pair = phases.wrap("score", online.judge_and_pair)
    pairs = []
    original_step = OnlinePreferenceModule.log_judged

    def log_judged(self, judged):  # counts the pairs trained on
        pairs.append(len(judged.pairs))
        return original_step(self, judged)

    OnlinePreferenceModule.log_judged = log_judged
    start, cpu = time.perf_counter(), time.process_time()
    L.seed_everything(0, verbose=False)
    module = OnlinePreferenceModule(
        model=ModelSpec(name_or_path=str(folder / "model"), tokenizer=str(folder / "tokenizer")),
        judge=FunctionJudge(setting.judge), loss=DPOLoss(beta=BETA),
        sampling=sampling_spec(setting, num_samples, engine, pair_mode), optimizer=lambda params: torch.optim.AdamW(params, lr=LR), **options,
    )
    data = PromptDataModule(train_data=str(folder / "prompts.jsonl"), batch_size=setting.batch, max_length=setting.max_length)
    data.connect(module.tokenizer, module.data_requirements)
    trainer = lightning_trainer(phases.lightning_callback(), folder / "runs", max_steps=steps)
    trainer.fit(module, data)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "phases": dict(phases.cpu),
            "steps": phases.steps, "prompts": phases.steps * setting.batch, "pairs": sum(pairs)}


def online_trl(folder: Path, setting: Setting, steps: int, grouped: bool = True) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    phases = Phases()
    OnlineDPOTrainer._generate = phases.wrap("generate", OnlineDPOTrainer._generate)
    OnlineDPOTrainer._calculate_rewards_from_functions = phases.wrap("score", OnlineDPOTrainer._calculate_rewards_from_functions)
    judge = load_judge(setting.judge)

    def reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        return [float(judge(c)) for c in completions]

    start, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(folder / "model"), dtype=torch.float32)
    rows = datasets.load_dataset("json", data_files=str(folder / "prompts.jsonl"), split="train")
    rows = rows.map(lambda row: {"prompt": trl_prompt(tokenizer, row["prompt"])})
    settings = dict(
        output_dir=str(folder / "runs" / "trl"), per_device_train_batch_size=setting.batch, max_steps=steps,
        learning_rate=LR, beta=BETA, max_new_tokens=setting.max_new_tokens, max_length=setting.max_length,
        temperature=1.0, top_p=1.0, top_k=0, bf16=False, fp16=False, gradient_checkpointing=False,
        lr_scheduler_type="constant", save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True, logging_steps=10_000,
    )
    if grouped:
        rows = rows.map(lambda row: {"length": len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])})
        settings.update(train_sampling_strategy="group_by_length", length_column_name="length")
    trainer = OnlineDPOTrainer(model=model, reward_funcs=reward, args=OnlineDPOConfig(**settings), train_dataset=rows,
                               processing_class=tokenizer, callbacks=[phases.trainer_callback()])
    trainer.train()
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "phases": dict(phases.cpu),
            "steps": phases.steps, "prompts": phases.steps * setting.batch, "pairs": phases.steps * setting.batch}


def iter_ours(folder: Path, setting: Setting, prompts: int, engine: str | None = None) -> dict:
    import lightning as L
    import torch

    import dpo_lightning.iterative as iterative
    from dpo_lightning.judges import FunctionJudge
    from dpo_lightning.losses import DPOLoss
    from dpo_lightning.models import ModelSpec
    from dpo_lightning.modules import IterativePreferenceModule

    phases = Phases()
    iterative.sample_completions = phases.wrap("generate", iterative.sample_completions)
    iterative.judge_and_pair = phases.wrap("score", iterative.judge_and_pair)
    start, cpu = time.perf_counter(), time.process_time()
    L.seed_everything(0, verbose=False)
    module = IterativePreferenceModule(
        model=ModelSpec(name_or_path=str(folder / "model"), tokenizer=str(folder / "tokenizer")), loss=DPOLoss(beta=BETA),
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
    )
    data = iterative.IterativePairsDataModule(
        train_data=str(folder / f"prompts-{prompts}.jsonl"), judge=FunctionJudge(setting.judge),
        sampling=sampling_spec(setting, setting.k, engine),
        generation_batch_size=setting.generation_batch, batch_size=setting.train_batch, max_length=setting.max_length,
    )
    data.connect(module.tokenizer, module.data_requirements)
    trainer = lightning_trainer(phases.lightning_callback(), folder / "runs", max_epochs=1, reload_dataloaders_every_n_epochs=1)
    trainer.fit(module, data)
    cpu_total = time.process_time() - cpu
    result = dict(phases.cpu)
    result["train"] = result.pop("step")
    result["other"] = cpu_total - sum(result.values())
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_total, "phases": result, "steps": phases.steps,
            "prompts": prompts, "pairs": len(data.round_rows or [])}


def iter_trl(folder: Path, setting: Setting, prompts: int) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    judge = load_judge(setting.judge)
    cpu_of: dict[str, float] = defaultdict(float)
    start, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(folder / "model"), dtype=torch.float32)
    texts = [json.loads(line)["prompt"] for line in (folder / f"prompts-{prompts}.jsonl").read_text().splitlines()]
    lengths = [len(tokenizer(trl_prompt(tokenizer, t), add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])  # length-ordered generation batches, as ours
    eos = [tokenizer.eos_token_id]
    pairs = []
    model.eval()
    for g in range(0, len(order), setting.generation_batch):
        batch = [texts[i] for i in order[g : g + setting.generation_batch]]
        t = time.process_time()
        enc = tokenizer([trl_prompt(tokenizer, p) for p in batch], return_tensors="pt", padding=True,
                        padding_side="left", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, num_return_sequences=setting.k, max_new_tokens=setting.max_new_tokens,
                                 temperature=1.0, top_p=1.0, top_k=0, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos)
        completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        cpu_of["generate"] += time.process_time() - t
        t = time.process_time()
        for j, prompt in enumerate(batch):
            samples = completions[j * setting.k : (j + 1) * setting.k]
            scores = [float(judge(c)) for c in samples]
            best, worst = scores.index(max(scores)), scores.index(min(scores))
            if scores[best] > scores[worst]:
                space = lambda c: c if c[:1].isspace() else " " + c  # noqa: E731  (the word-level tokenizer splits at spaces)
                pairs.append({"prompt": prompt, "chosen": space(samples[best]), "rejected": space(samples[worst])})
        cpu_of["score"] += time.process_time() - t
    model.train()
    rows = datasets.Dataset.from_list(pairs)

    def length(row: dict) -> dict:  # what transformers' LengthGroupedSampler groups by, as throughput.py's trl-best
        n = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        return {"length": min(n(row["prompt"]) + 2 + max(n(row["chosen"]), n(row["rejected"])), setting.max_length)}

    rows = rows.map(length)
    args = DPOConfig(
        output_dir=str(folder / "runs" / "trl-dpo"), per_device_train_batch_size=setting.train_batch,
        max_length=setting.max_length, num_train_epochs=1, learning_rate=LR, beta=BETA, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=10_000, lr_scheduler_type="constant",
        train_sampling_strategy="group_by_length", length_column_name="length", remove_unused_columns=False,
    )
    phases = Phases()
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args, train_dataset=rows,
                         processing_class=tokenizer, callbacks=[phases.trainer_callback()])
    trainer.train()
    cpu_of["train"] = phases.cpu["step"]
    cpu_total = time.process_time() - cpu
    cpu_of["other"] = cpu_total - sum(cpu_of.values())
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_total, "phases": dict(cpu_of),
            "steps": phases.steps, "prompts": prompts, "pairs": len(pairs)}


def worker(name: str, setting_name: str, folder: Path, quick: bool) -> None:
    import torch

    torch.set_num_threads(1)
    setting = SETTINGS[setting_name]
    steps = setting.quick_steps if quick else setting.steps
    prompts = setting.quick_iter_prompts if quick else setting.iter_prompts
    result = {
        "trl-online": lambda: online_trl(folder, setting, steps),
        "trl-online-random": lambda: online_trl(folder, setting, steps, grouped=False),
        "ours-online": lambda: online_ours(folder, setting, steps, share_prompt=False),
        "ours-online-share": lambda: online_ours(folder, setting, steps, share_prompt="auto"),
        "trl-iter": lambda: iter_trl(folder, setting, prompts),
        "ours-iter": lambda: iter_ours(folder, setting, prompts),
        "ours-online-generate": lambda: online_ours(folder, setting, steps, engine="generate", share_prompt=False),
        "ours-iter-generate": lambda: iter_ours(folder, setting, prompts, engine="generate"),
        # 8 samples a prompt, every pair (up to 56 pair sides from 8 sequences): as pairs / each sample once
        "ours-online-k8-pairs": lambda: online_ours(folder, setting, steps, num_samples=8, pair_mode="all", samples_once=False),
        "ours-online-k8-samples": lambda: online_ours(folder, setting, steps, num_samples=8, pair_mode="all", samples_once=True),
        "ours-online-k8-samples-separate": lambda: online_ours(folder, setting, steps, num_samples=8, pair_mode="all",
                                                               samples_once=True, share_prompt=False),
    }[name]()
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


# -- the table ------------------------------------------------------------------------------------------
def shares(result: dict, family: str) -> dict[str, float]:
    """CPU shares: online, of the steps' CPU time (generate, score, train = the rest of the step);
    iterative, of the run's (generate, score, train, other)."""
    p = result["phases"]
    if family == "online":
        step = p["step"]
        return {"generate": p.get("generate", 0.0) / step, "score": p.get("score", 0.0) / step,
                "train": (step - p.get("generate", 0.0) - p.get("score", 0.0)) / step}
    return {name: p.get(name, 0.0) / result["cpu_seconds"] for name in ("generate", "score", "train", "other")}


def print_table(results: dict[tuple[str, str], list[dict]], settings: list[str], names: list[str], repeats: int) -> None:
    print(f"\nmedian [min-max] over {repeats} interleaved repeat(s); one thread per run")
    header = (f"{'setting':<10}{'run':<24}{'prompts/s':>20}{'x TRL':>7}{'per CPU-s':>11}{'x (CPU)':>9}"
              f"{'peak RSS MB':>13}{'pairs':>7}{'generate':>10}{'score':>7}{'train':>7}{'other':>7}{'steps/e2e':>11}")
    print(header)
    print("-" * len(header))
    for s in settings:
        for name in names:
            rs = results.get((s, name))
            if not rs:
                continue
            family = RUNS[name][0]
            med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
            base = results.get((s, BASELINE.get(name, "")))
            ratio = cpu_ratio = ""
            if base:
                ratio = f"{med(lambda r: r['prompts_s']) / statistics.median(r['prompts_s'] for r in base):.2f}"
                cpu_ratio = f"{med(lambda r: r['cpu_prompts_s']) / statistics.median(r['cpu_prompts_s'] for r in base):.2f}"
            part = {k: med(lambda r, k=k: shares(r, family)[k]) for k in shares(rs[0], family)}
            other = f"{part['other']:.0%}" if "other" in part else "-"
            steps_share = f"{med(lambda r: r['phases']['step'] / r['cpu_seconds']):.0%}" if family == "online" else "-"
            print(f"{s:<10}{name:<24}{summary([r['prompts_s'] for r in rs]):>20}{ratio:>7}{med(lambda r: r['cpu_prompts_s']):>11.2f}"
                  f"{cpu_ratio:>9}{med(lambda r: r['peak_rss_mb']):>13.0f}{med(lambda r: r['pairs']):>7.0f}"
                  f"{part['generate']:>10.0%}{part['score']:>7.0%}{part['train']:>7.0%}{other:>7}{steps_share:>11}")
    print("\nCPU milliseconds per step (online) / CPU seconds per run (iterative), medians:")
    for s in settings:
        for name in names:
            rs = results.get((s, name))
            if not rs:
                continue
            part = lambda k: statistics.median(r["phases"].get(k, 0.0) for r in rs)  # noqa: E731
            if RUNS[name][0] == "online":
                n = rs[0]["steps"]
                gen, score, step = part("generate"), part("score"), part("step")
                outside = statistics.median(r["cpu_seconds"] - r["phases"]["step"] for r in rs)
                print(f"  {s:<10}{name:<24}generate {1e3 * gen / n:7.0f} ms  score {1e3 * score / n:6.1f} ms  train "
                      f"{1e3 * (step - gen - score) / n:7.0f} ms  step {1e3 * step / n:7.0f} ms; outside the steps {outside:.2f} s")
            else:
                print(f"  {s:<10}{name:<24}" + "  ".join(f"{k} {part(k):.2f} s" for k in ("generate", "score", "train", "other"))
                      + f"  total {statistics.median(r['cpu_seconds'] for r in rs):.2f} s")
    print("\nprompts/s: prompts trained on over wall seconds from model load to the end of training; per CPU-s: over the "
          "run's own CPU seconds; x TRL, x (CPU): ours over TRL's median. generate / score / train: shares of CPU time, "
          "online of the training steps (train = the rest of the step), iterative of the whole run (other = loading, "
          "setup, tokenizing); steps/e2e: the steps' share of the online run's CPU time; pairs: pairs trained on (ours "
          "skips prompts whose samples tied)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="both", choices=["small", "sentiment", "both"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--quick", action="store_true", help="a few steps and prompts per run, one repeat")
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument("--worker", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.settings, Path(args.folder), args.quick)
        return
    names, trl = chosen_runs(parser, args.runs, list(RUNS), lambda n: RUNS[n][1] == "trl")
    import torch
    import transformers

    repeats = 1 if args.quick else args.repeats
    settings = ["small", "sentiment"] if args.settings == "both" else [args.settings]
    root = Path(tempfile.mkdtemp(prefix="dpo-online-bench-"))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {getattr(trl, '__version__', '-')}; "
          f"one thread per run; {'quick' if args.quick else 'full'} mode")
    for s in settings:
        setting = SETTINGS[s]
        make_inputs(root / s, s)
        lines = (root / s / "prompts.jsonl").read_text().splitlines()
        for n in {setting.quick_iter_prompts, setting.iter_prompts}:
            (root / s / f"prompts-{n}.jsonl").write_text("".join(line + "\n" for line in lines[:n]))
        model = "benchmark Llama, vocab 2000, " + f"{ARCH['num_hidden_layers']} layers, hidden {ARCH['hidden_size']}" \
            if s == "small" else "data/tiny-llama (2 layers, hidden 64, vocab 512)"
        steps = setting.quick_steps if args.quick else setting.steps
        prompts = setting.quick_iter_prompts if args.quick else setting.iter_prompts
        print(f"{s}: {model}; judge {setting.judge}; max_new_tokens {setting.max_new_tokens}; online: {setting.batch} "
              f"prompts x 2 samples a step, {steps} steps; iterative: {prompts} prompts x {setting.k} samples, "
              f"generation batches of {setting.generation_batch} prompts, training batches of {setting.train_batch} pairs; "
              f"TRL and dpo-lightning prompt ids identical: {check_same_prompt_ids(root / s)}")

    results: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(repeats):
        for s in settings:
            for name in names:
                cmd = [sys.executable, __file__, "--worker", name, "--settings", s, "--folder", str(root / s)]
                r = run_worker(cmd + (["--quick"] if args.quick else []), root / s)
                if r is None:
                    continue
                r.update(prompts_s=r["prompts"] / r["seconds"], cpu_prompts_s=r["prompts"] / r["cpu_seconds"],
                         repeat=repeat, setting=s, run=name)
                results.setdefault((s, name), []).append(r)
                print(f"  [{repeat + 1}/{repeats}] {s:<10}{name:<24}{r['prompts_s']:8.2f} prompts/s{r['seconds']:8.1f} s"
                      f"{r['cpu_seconds']:8.1f} CPU s{r['peak_rss_mb']:8.0f} MB  {r['steps']} steps, {r['pairs']} pairs",
                      flush=True)
    print_table(results, settings, names, repeats)
    if args.json:
        Path(args.json).write_text(json.dumps([r for rs in results.values() for r in rs], indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
