"""The controlled-sentiment experiment in miniature: reward against KL for offline DPO, ODPO and
IPO, online DPO and iterative DPO, over several seeds, against the KL-optimal policy.

    make experiment          # or: .venv/bin/python scripts/sentiment_frontier.py
    .venv/bin/python scripts/sentiment_frontier.py --quick      # a few minutes, for development
    .venv/bin/python scripts/sentiment_frontier.py --plot-only  # redraw docs/*.png and the tables from docs/*.csv

1. SFT: the tiny Llama (data/tiny-llama) learns the review language of data/sentiment (mixed
   sentiment); recipes/base.yaml + recipes/sft.yaml, seed 0. It is the reference policy and the
   initial policy of every run below, for every seed (the seeds are paired: they vary the
   sampled pairs, the training and the evaluation samples, not the reference).
2. Pairs (offline methods), per seed: 4 samples per prompt from the SFT model on the 600
   training prompts of data/sentiment/pair_prompts.jsonl, scored by the ground truth
   (dpo_lightning.experiments.sentiment:score); best vs worst with their scores (for ODPO).
   Every 10th pair is held out: the offline runs validate on it every 10 steps
   (docs/logps.png). Every sample is kept (outputs/frontier/seed<s>/pair_samples.jsonl).
   DPO's theorem at full size: fresh SFT samples, 4 for each prompt of the 600 32 times over
   (76,800 samples), every two of a prompt's 4 whose scores differ as a pair
   (``--pairs all``), each labelled by a Bradley-Terry draw (``--label_temperature 0.25``: the
   higher-scored one chosen with probability sigmoid((s_a - s_b) / 0.25)): about 92,000 pairs,
   on which DPO at beta has pi* at beta * 0.25 as its exact optimum; 200 validation pairs from
   samples of their own.
3. Offline: DPO, ODPO and IPO (recipes/dpo.yaml; base.yaml + odpo.yaml / ipo.yaml), 3 epochs
   on the seed's pairs at lr 3e-4; DPO at lr 1e-3 (the recipe's own). On the Bradley-Terry
   pairs, one epoch at batch 256 and lr 3e-4: DPO at beta 1 (its optimum columns in
   docs/frontier.csv: pi* at beta * tau = 0.25), and IPO, ODPO and KTO at beta 1 on the same
   pairs, seed 0 only (their optimum columns: the same pi*, from which each one's distance is
   read).
4. Online DPO: base.yaml + recipes/online_dpo.yaml (OnlinePreferenceModule) from the SFT model:
   the recipe as shipped (2 samples per prompt, best vs worst, lr 1e-3, 2 epochs of 600
   prompts), 4 samples and every pair of them (1 epoch), and 8 samples, every pair, lr 3e-4
   for 3 epochs (deterministic labels, and Bradley-Terry labels through
   ``sampling.label_temperature``). Iterative DPO: base.yaml + recipes/iterative_dpo.yaml
   (2 rounds of 4 samples per prompt from the policy of the round's start, the reference reset
   to it each round), with every pair, at lr 3e-4. Judged samples per run: 2400 (offline: 4
   per prompt; online as shipped and with 4 samples; iterative: 2 rounds x 300 prompts x 4),
   14400 for the 8-sample online runs (3 epochs x 600 prompts x 8).
5. Evaluation, per run: 128 samples on each of the 40 held-out prompts (5120 samples; the
   prompts never occur in the SFT data or the preference prompts), the mean ground-truth
   reward and the Monte-Carlo KL(pi || pi_sft) (dpo_lightning.sampling.evaluate_policy) with
   their standard errors (the evaluation's own noise, reported beside the spread of the
   seeds), and a breakdown of the samples: the share that is a review template word for
   word, the share of their sentiment slots holding a negative word. The trajectory: every
   run exports 4 snapshots along its training (dpo_lightning.callbacks.ExportSnapshots),
   each earlier one evaluated on 16 samples per held-out prompt. For the seed-0 runs, where
   the KL goes (scripts/frontier_diagnosis.py): the exact per-position KL summed over
   positions that emitted a sentiment word, the end of sequence, and the rest.
6. Results: outputs/frontier/runs.csv (a row per run and seed), docs/frontier.csv (mean and
   standard error across seeds, the mean evaluation standard error, regret and KL
   efficiency), docs/frontier.png (reward against KL with error bars, trajectories, best-of-n
   and the KL-optimal frontier), docs/frontier_trajectories.csv, docs/logps.png +
   docs/logps.csv (log-probs of chosen and rejected during training), docs/frontier_pairs.csv
   (the pair data), docs/frontier_kl_split.csv (where the KL goes), docs/frontier_optimal.csv,
   docs/frontier_best_of_n.csv, outputs/frontier/timing.json = docs/frontier_timing.json
   (wall and CPU seconds of every part); the tables of docs/frontier.md and README.md, written
   between their marker lines (scripts/frontier_tables.py).
7. Reference frontiers (dpo_lightning.experiments.frontiers), from 512 SFT samples for each
   held-out prompt: best-of-n from the SFT model with its exact KL (the KL between the
   distributions of reward levels; log n - (n-1)/n is only a bound when rewards tie); the
   per-prompt KL-optimal policy pi* by self-normalised importance weights with its effective
   sample size; each run's regret (pi*'s reward at the run's KL minus its reward) and KL
   efficiency (pi*'s KL for the run's reward over the run's KL).

Jobs run in ``--jobs`` worker processes (default 2), each with ``--threads`` torch threads
(default 1: the 0.1M-parameter model gains nothing from more). Iterative DPO joins when
recipes/iterative_dpo.yaml exists.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import frontier_tables  # scripts/, beside this file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "outputs" / "frontier"
DOCS = ROOT / "docs"
PAIR_PROMPTS = ROOT / "data" / "sentiment" / "pair_prompts.jsonl"
EVAL_PROMPTS = ROOT / "data" / "sentiment" / "eval_prompts.jsonl"
ITERATIVE_RECIPE = ROOT / "recipes" / "iterative_dpo.yaml"

PAIR_SAMPLES = 4  # samples per prompt for the offline pairs
BT_LABEL_TEMPERATURE = 0.25  # the Bradley-Terry pairs: P(best chosen) = sigmoid((s_best - s_worst) / 0.25)
# DPO's theorem at full size: Bradley-Terry pairs of fresh SFT samples, every two of BT_PAIR_SAMPLES
# samples per prompt (BT_PAIRS), on each pair prompt BT_PROMPT_REPEATS times (19,200 x 4 samples, about
# 92,000 pairs; --quick: QUICK_BT_PROMPT_REPEATS), trained on for one epoch at batch 256 (BT_OFFLINE);
# validation on at most BT_VAL_PAIRS pairs of BT_VAL_PROMPTS prompts sampled with seed BT_VAL_SEED + seed
BT_PAIR_SAMPLES, BT_PAIRS, BT_PROMPT_REPEATS, QUICK_BT_PROMPT_REPEATS = 4, "all", 32, 2
BT_VAL_PROMPTS, BT_VAL_PAIRS, BT_VAL_SEED = 60, 200, 10_000
PROMPTS, QUICK_PROMPTS = 600, 200  # the budget is PROMPTS x PAIR_SAMPLES judged samples per run
HELD_OUT_EVERY = 10  # every 10th pair is the offline runs' validation set
VAL_EVERY_STEPS = 10
# defaults per kind; a series' settings override them
DEFAULTS = {
    "offline": {"max_epochs": 3, "lr": 3e-4, "batch_size": 16},
    "online": {"num_samples": 2, "pairs": "best_vs_worst", "lr": 1e-3, "batch_size": 16},  # online_dpo.yaml + base.yaml
    "iterative": {"num_samples": 4, "rounds": 2, "pairs": "best_vs_worst", "lr": 1e-3, "batch_size": 16,
                  "reset": "per_round"},  # iterative_dpo.yaml + base.yaml (reference.reset)
}
ALL_PAIRS = {"pairs": "all"}
# the online recipe that closes most of the gap to pi*: 8 samples, every pair, lr 3e-4 for 3 epochs
SLOW_ONLINE = {"num_samples": 8, **ALL_PAIRS, "lr": 3e-4, "max_epochs": 3}
BT = {"label_temperature": BT_LABEL_TEMPERATURE}
# offline training on the Bradley-Terry pairs: each pair seen once (a second epoch fits the label
# noise: docs/frontier.md), batch 256 at lr 3e-4 (the gradient noise of smaller batches is KL spent
# off the target: batch 128 on half the pairs ended 13 % above pi*'s KL), validation every 50 steps
BT_OFFLINE = {"bradley_terry_pairs": True, "max_epochs": 1, "batch_size": 256, "lr": 3e-4, "val_every": 50}
#: the losses on the Bradley-Terry pairs beside DPO: (series, recipe, loss arguments); every one is
#: measured against DPO beta 1's optimum, pi* at 1 * tau (BT_TARGET_BETA). They run on the first
#: BT_LOSS_SEEDS seeds only (IPO and ODPO about 180 CPU seconds a run, KTO about 450: every seed
#: would add about 7 minutes to `make experiment`, 0 takes off about 7); None: every seed.
#: SimPO is left out: reference-free, it ends at 0.88 at 24 nats on these pairs (docs/frontier.md)
BT_LOSSES = [("IPO, Bradley-Terry labels", "ipo", {"beta": 1.0}),
             ("ODPO, Bradley-Terry labels", "odpo", {"beta": 1.0, "alpha": 1.0}),
             ("KTO, Bradley-Terry labels", "kto", {"beta": 1.0})]
BT_TARGET_BETA = 1.0
BT_LOSS_SEEDS: int | None = 1
# (series, kind, recipe, loss arguments, settings)
SWEEP = [
    *[("DPO", "offline", "dpo", {"beta": b}, {}) for b in (0.1, 0.5, 1.0)],
    ("ODPO", "offline", "odpo", {"beta": 0.5, "alpha": 1.0}, {}),
    ("IPO", "offline", "ipo", {"beta": 1.0}, {}),
    ("DPO, lr 1e-3", "offline", "dpo", {"beta": 1.0}, {"lr": 1e-3}),
    # DPO's theorem at full size: on Bradley-Terry labels at tau its optimum is pi* at beta * tau
    ("DPO, Bradley-Terry labels", "offline", "dpo", {"beta": BT_TARGET_BETA}, BT_OFFLINE),
    *[(series, "offline", name, loss_args, {**BT_OFFLINE, "seeds": BT_LOSS_SEEDS}) for series, name, loss_args in BT_LOSSES],
    ("online DPO", "online", "online_dpo", {"beta": 1.0}, {}),
    ("online DPO, 4 samples, all pairs", "online", "online_dpo", {"beta": 1.0}, {"num_samples": 4, **ALL_PAIRS}),
    *[("online DPO, 8 samples, all pairs, lr 3e-4, 3 epochs", "online", "online_dpo", {"beta": b}, SLOW_ONLINE)
      for b in (0.5, 1.0)],
    ("online DPO, Bradley-Terry labels, 8 samples, lr 3e-4, 3 epochs", "online", "online_dpo", {"beta": 0.5},
     {**SLOW_ONLINE, **BT}),
    ("iterative DPO, all pairs", "iterative", "iterative_dpo", {"beta": 1.0}, {"lr": 3e-4, **ALL_PAIRS}),
]
#: series trained on Bradley-Terry labels: DPO's optimum is pi* at beta * tau (columns optimum_*)
LABEL_TEMPERATURE = {"DPO, Bradley-Terry labels": BT_LABEL_TEMPERATURE,
                     "online DPO, Bradley-Terry labels, 8 samples, lr 3e-4, 3 epochs": BT_LABEL_TEMPERATURE}
#: the other losses on the same pairs: their optimum_* columns are DPO beta 1's target, pi* at 1 * tau
#: (the distance of each from it), whatever their own beta means
TARGET_BETA = {series: BT_TARGET_BETA for series, _, _ in BT_LOSSES}
QUICK_SWEEP = [
    ("DPO", "offline", "dpo", {"beta": 0.5}, {}),
    ("DPO, Bradley-Terry labels", "offline", "dpo", {"beta": 1.0}, BT_OFFLINE),
    ("KTO, Bradley-Terry labels", "offline", "kto", {"beta": 1.0}, {**BT_OFFLINE, "seeds": BT_LOSS_SEEDS}),
    ("online DPO", "online", "online_dpo", {"beta": 1.0}, {}),
    ("online DPO, 8 samples, all pairs, lr 3e-4, 3 epochs", "online", "online_dpo", {"beta": 1.0},
     {**SLOW_ONLINE, "max_epochs": 1}),
    ("iterative DPO, all pairs", "iterative", "iterative_dpo", {"beta": 1.0}, {"lr": 3e-4, **ALL_PAIRS}),
]
EVAL = {"prompts": 40, "samples_per_prompt": 128, "max_new_tokens": 32}  # 5120 samples of the 40 held-out prompts
QUICK_EVAL = {"prompts": 40, "samples_per_prompt": 8, "max_new_tokens": 32}
SNAPSHOTS = 4  # points on each run's trajectory (ExportSnapshots; the last is the final policy)
TRAJECTORY_SAMPLES, QUICK_TRAJECTORY_SAMPLES = 16, 4  # per held-out prompt, for each earlier snapshot
SEEDS, QUICK_SEEDS = 5, 1
DIAGNOSIS_SAMPLES = 8  # per held-out prompt, for the KL split (320 samples)
REFERENCE_SAMPLES, QUICK_REFERENCE_SAMPLES = 512, 64  # SFT samples per evaluation prompt, for the reference frontiers
BEST_OF = (1, 2, 4, 8, 16, 32, 64)
OPTIMUM_BETAS = [10 ** (1 - i / 20) for i in range(61)]  # 10 down to 0.01

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
STYLE = {  # series: (colour, marker)
    "SFT": ("black", "s"), "DPO": ("tab:blue", "o"), "ODPO": ("tab:orange", "o"), "IPO": ("tab:green", "o"),
    "DPO, lr 1e-3": ("tab:cyan", "D"), "DPO, Bradley-Terry labels": ("navy", "X"),
    "IPO, Bradley-Terry labels": ("darkgreen", "X"), "ODPO, Bradley-Terry labels": ("darkorange", "X"),
    "KTO, Bradley-Terry labels": ("olive", "X"), "online DPO": ("tab:red", "^"),
    "online DPO, 4 samples, all pairs": ("tab:pink", "v"),
    "online DPO, 8 samples, all pairs, lr 3e-4, 3 epochs": ("darkred", "*"),
    "online DPO, Bradley-Terry labels, 8 samples, lr 3e-4, 3 epochs": ("tab:brown", "P"),
    "iterative DPO, all pairs": ("tab:purple", "P"),
}
SERIES = list(STYLE)


# -- the toy language: what a sample is made of -----------------------------------------------------
def template_patterns() -> list[re.Pattern]:
    """One regular expression per review template of dpo_lightning.experiments.sentiment, with
    named groups for the product ``p`` and the sentiment slots ``a``, ``b``, ``v``."""
    from dpo_lightning.experiments import sentiment

    patterns = []
    for template in sentiment.TEMPLATES:
        text = re.escape(template)
        for slot in "pabv":
            text = text.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>[a-z]+)")
        patterns.append(re.compile(f"^{text}$"))
    return patterns


def sample_breakdown(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Of scored samples (``completion``, ``score``): the share that is one of the review
    templates word for word (``wellformed``), the share of their sentiment slots holding a
    negative word (``negative_slots``), and their mean score (``reward_wellformed``)."""
    from dpo_lightning.experiments import sentiment

    patterns = template_patterns()
    wellformed, slots, negative, scores = 0, 0, 0, []
    for row in rows:
        match = next((m for m in (p.match(row["completion"]) for p in patterns) if m), None)
        if match is None:
            continue
        wellformed += 1
        scores.append(row["score"])
        for slot in "abv":
            word = match.groupdict().get(slot)
            if word is not None:
                slots += 1
                negative += word in sentiment._NEG
    return {
        "wellformed": wellformed / max(len(rows), 1),
        "negative_slots": negative / max(slots, 1),
        "reward_wellformed": sum(scores) / max(len(scores), 1),
    }


# -- recipes and fits -------------------------------------------------------------------------------
def recipe(name: str) -> list[str]:
    """The ``--config`` arguments of a shipped recipe: dpo.yaml is complete, the others are
    overlays on base.yaml."""
    path = str(ROOT / "recipes" / f"{name}.yaml")
    return ["--config", path] if name == "dpo" else ["--config", str(ROOT / "recipes" / "base.yaml"), "--config", path]


def fit(out: Path, name: str, recipe_name: str, changes: dict):
    """Fit a shipped recipe with ``changes`` on top (a config file of their own, merged last);
    returns the CLI (its ``model`` holds the validation history)."""
    import yaml

    from dpo_lightning.cli import run

    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(changes, sort_keys=False))
    return run(["fit", *recipe(recipe_name), "--config", str(path), *QUIET])


def csv_logger(save_dir: Path) -> dict:
    return {"class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(save_dir), "name": "", "version": ""}}


def train_sft(out: Path, epochs: int | None = None) -> Path:
    trainer = {"default_root_dir": str(out / "runs" / "sft"), "enable_checkpointing": False, "logger": False}
    if epochs is not None:
        trainer["max_epochs"] = epochs
    fit(out, "sft", "sft", {"seed_everything": 0, "trainer": trainer,
                            "model": {"init_args": {"export_dir": str(out / "sft")}}})
    return out / "sft"


def subset(source: Path, target: Path, n: int) -> Path:
    """The first ``n`` rows of a JSON-lines file."""
    lines = [line for line in source.read_text().splitlines() if line.strip()][:n]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(line + "\n" for line in lines))
    return target


def validation_batch(val_pairs: str, settings: dict) -> dict:
    """The Bradley-Terry runs validate on all their (at most ``BT_VAL_PAIRS``) pairs in one batch:
    KTO's validation goes in row order, and a last batch holding one pair's two replies has no
    other prompt for its KL rows."""
    if not settings.get("bradley_terry_pairs"):
        return {}
    pairs = sum(1 for line in Path(val_pairs).read_text().splitlines() if line.strip())
    return {"eval_batch_size": max(2 * pairs, 1)}


def train(job: dict) -> Path:
    """One preference run: offline on the seed's pairs, online or iterative from the prompts."""
    out, name, kind, seed = Path(job["out"]), job["name"], job["kind"], job["seed"]
    settings = {**DEFAULTS[kind], **job["settings"]}
    run_dir = out / "runs" / name
    policy = out / "policies" / name
    trainer = {"default_root_dir": str(run_dir), "enable_checkpointing": False, "log_every_n_steps": 1,
               "logger": csv_logger(run_dir)}
    snapshots = lambda steps: [{"class_path": "dpo_lightning.callbacks.ExportSnapshots",  # noqa: E731
                                "init_args": {"dirpath": str(out / "snapshots" / name),
                                              "every_n_steps": max(1, math.ceil(steps / SNAPSHOTS))}}]
    model = {
        "model": {"name_or_path": job["sft"]},  # the SFT model is the initial policy and the reference
        "loss": {"init_args": job["loss_args"]},
        "optimizer": {"init_args": {"lr": settings["lr"]}},
        "export_dir": str(policy),
    }
    if kind == "offline":  # validation on the held-out pairs at step 0 (sanity check) and every 10 steps
        labels = "bt_" if settings.get("bradley_terry_pairs") else ""  # the seed's pairs with Bradley-Terry labels
        train_pairs, val_pairs = job[f"{labels}pairs_train"], job[f"{labels}pairs_val"]
        batches = math.ceil(sum(1 for l in Path(train_pairs).read_text().splitlines() if l.strip()) / settings["batch_size"])
        every = settings.get("val_every", VAL_EVERY_STEPS)
        cli = fit(out, name, job["recipe"], {
            "seed_everything": seed,
            "trainer": {**trainer, "max_epochs": settings["max_epochs"], "num_sanity_val_steps": -1,
                        "callbacks": snapshots(batches * settings["max_epochs"]),
                        "val_check_interval": every if batches >= every else 1.0},
            "model": {"init_args": model},
            "data": {"init_args": {"train_data": train_pairs, "val_data": val_pairs,
                                   "batch_size": settings["batch_size"], **validation_batch(val_pairs, settings)}},
        })
        history = [{k: (float(v) if not isinstance(v, bool) else v) for k, v in h.items()}
                   for h in cli.model.validation_history]
        (run_dir / "validation.json").write_text(json.dumps(history))
    elif kind == "online":  # the budget: epochs x prompts x num_samples
        k = settings["num_samples"]
        epochs = settings.get("max_epochs") or max(1, job["budget"] // (job["prompts"] * k))
        n = job["prompts"] if settings.get("max_epochs") else job["budget"] // (epochs * k)
        prompts = subset(Path(job["prompt_file"]), out / "data" / f"prompts_{name}.jsonl", n)
        fit(out, name, job["recipe"], {
            "seed_everything": seed,
            "trainer": {**trainer, "max_epochs": epochs, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                        "callbacks": snapshots(epochs * math.ceil(n / settings["batch_size"]))},
            "model": {"init_args": {**model, "sampling": {"num_samples": k, "pairs": settings["pairs"],
                                                          "label_temperature": settings.get("label_temperature")}}},
            "data": {"init_args": {"train_data": str(prompts), "val_data": None, "batch_size": settings["batch_size"]}},
        })
    elif kind == "iterative":  # the budget: rounds x prompts x num_samples
        rounds, k = settings["rounds"], settings["num_samples"]
        n = job["budget"] // (rounds * k)
        prompts = subset(Path(job["prompt_file"]), out / "data" / f"prompts_{name}.jsonl", n)
        pairs_per_round = n * (k * (k - 1) // 2 if settings["pairs"] == "all" else 1) * 0.8  # about 20 % tie
        fit(out, name, job["recipe"], {
            "seed_everything": seed,
            "trainer": {**trainer, "max_epochs": rounds, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                        "callbacks": snapshots(rounds * math.ceil(pairs_per_round / settings["batch_size"]))},
            "model": {"init_args": {**model, "reference": {"reset": settings["reset"]}}},
            "data": {"init_args": {"train_data": str(prompts), "val_data": None, "batch_size": settings["batch_size"],
                                   "sampling": {"num_samples": k, "pairs": settings["pairs"],
                                                "label_temperature": settings.get("label_temperature")}}},
        })
    else:
        raise ValueError(kind)
    return policy


def evaluate(job: dict, policy: str) -> dict[str, Any]:
    """The library's evaluation of ``policy`` against the SFT reference, plus the sample breakdown
    (when ``evaluate_policy`` can save its samples)."""
    import inspect

    from dpo_lightning.sampling import evaluate_policy

    samples = Path(job["out"]) / "samples" / f"{job['name']}.jsonl"
    kwargs = {"samples_per_prompt": job["eval"]["samples_per_prompt"], "max_new_tokens": job["eval"]["max_new_tokens"],
              "seed": job["seed"]}
    can_save = "save_samples" in inspect.signature(evaluate_policy).parameters
    if can_save:
        kwargs["save_samples"] = str(samples)
    result = dict(evaluate_policy(policy, job["sft"], job["eval_prompts"], **kwargs))
    if can_save and samples.exists():
        result.update(sample_breakdown([json.loads(line) for line in samples.read_text().splitlines() if line.strip()]))
    return result


def evaluate_sft(job: dict) -> dict[str, Any]:
    """The SFT model's own reward on the evaluation's samples (the same prompts, samples per
    prompt and seed as a run's evaluation) and its sample breakdown; its KL to itself is 0."""
    import torch

    from dpo_lightning.experiments.sentiment import score
    from dpo_lightning.sampling import mean_and_stderr, read_prompts, sample
    from frontier_diagnosis import load

    torch.manual_seed(job["seed"])
    model, tokenizer = load(job["sft"])
    rows = []
    for prompt in read_prompts(job["eval_prompts"]):
        texts = sample(model, tokenizer, prompt, job["eval"]["samples_per_prompt"], job["eval"]["max_new_tokens"]).texts
        rows += [{"prompt": prompt, "completion": t, "score": score(t)} for t in texts]
    reward, reward_se = mean_and_stderr([r["score"] for r in rows])
    return {"reward": reward, "reward_stderr": reward_se, "kl": 0.0, "kl_stderr": 0.0, "samples": len(rows),
            **sample_breakdown(rows)}


def trajectory(job: dict, final: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's path: ``{"point", "step", "reward", "kl"}`` for each snapshot before the last
    (``job["trajectory_samples"]`` samples per held-out prompt each), then the final policy's
    full evaluation; point 0 is the SFT model (reward and KL from the run's own SFT row)."""
    from dpo_lightning.sampling import evaluate_policy

    folder = Path(job["out"]) / "snapshots" / job["name"]
    steps = sorted(folder.iterdir()) if folder.exists() else []
    final_weights = (Path(job["out"]) / "policies" / job["name"] / "model.safetensors").read_bytes()
    if steps and (steps[-1] / "model.safetensors").read_bytes() == final_weights:
        steps = steps[:-1]  # the last snapshot is the final policy, evaluated in full below
    points = []
    for i, snapshot in enumerate(steps, start=1):
        result = evaluate_policy(str(snapshot), job["sft"], job["eval_prompts"], samples_per_prompt=job["trajectory_samples"],
                                 max_new_tokens=job["eval"]["max_new_tokens"], seed=job["seed"])
        points.append({"point": i, "step": int(snapshot.name.split("-")[1]), "reward": result["reward"], "kl": result["kl"]})
    points.append({"point": len(points) + 1, "step": "final", "reward": final["reward"], "kl": final["kl"]})
    return points


def sample_pairs_job(job: dict) -> None:
    """The seed's pairs from the SFT model, every sample kept; every 10th pair held out. Then the
    Bradley-Terry pairs of DPO's theorem, from fresh SFT samples: ``BT_PAIR_SAMPLES`` samples
    for each pair prompt, the prompt file ``job["bt_repeats"]`` times over, every two samples
    whose scores differ as a pair (``pairs="all"``), each labelled on its own at
    ``BT_LABEL_TEMPERATURE`` (the pairs on which DPO at beta has pi* at ``beta * tau`` as its
    optimum); their validation pairs (at most ``BT_VAL_PAIRS``) come from samples of their own,
    on the first ``BT_VAL_PROMPTS`` prompts with another seed, so that no validation sample is
    trained on."""
    import inspect

    from dpo_lightning.sampling import sample_pairs

    kwargs = {"samples_per_prompt": PAIR_SAMPLES, "seed": job["seed"]}
    if "save_samples" in inspect.signature(sample_pairs).parameters:
        kwargs["save_samples"] = job["pair_samples"]
    sample_pairs(job["sft"], job["prompt_file"], job["pairs"], **kwargs)
    lines = [line for line in Path(job["pairs"]).read_text().splitlines() if line.strip()]
    Path(job["pairs_train"]).write_text("".join(l + "\n" for i, l in enumerate(lines) if i % HELD_OUT_EVERY))
    Path(job["pairs_val"]).write_text("".join(l + "\n" for i, l in enumerate(lines) if not i % HELD_OUT_EVERY))

    prompts = [line for line in Path(job["prompt_file"]).read_text().splitlines() if line.strip()]
    folder = Path(job["bt_pairs_train"]).parent
    repeated, val_prompts = folder / "bt_prompts.jsonl", folder / "bt_val_prompts.jsonl"
    repeated.write_text("".join(l + "\n" for l in prompts * job["bt_repeats"]))
    val_prompts.write_text("".join(l + "\n" for l in prompts[:BT_VAL_PROMPTS]))
    bt = {"samples_per_prompt": BT_PAIR_SAMPLES, "pairs": BT_PAIRS, "label_temperature": BT_LABEL_TEMPERATURE}
    sample_pairs(job["sft"], str(repeated), job["bt_pairs_train"], seed=job["seed"], **bt)
    sample_pairs(job["sft"], str(val_prompts), job["bt_pairs_val"], seed=BT_VAL_SEED + job["seed"], **bt)
    val = [line for line in Path(job["bt_pairs_val"]).read_text().splitlines() if line.strip()][:BT_VAL_PAIRS]
    Path(job["bt_pairs_val"]).write_text("".join(l + "\n" for l in val))


def reference_scores_job(job: dict) -> None:
    """``job["reference_samples"]`` SFT samples for each evaluation prompt (a prompt listed twice
    is sampled once and counted twice, as the evaluation counts it), scored; written as a
    ``(P, M)`` JSON list to ``job["reference_scores"]``."""
    import torch

    from dpo_lightning.experiments.sentiment import score
    from dpo_lightning.sampling import read_prompts, sample
    from frontier_diagnosis import load

    torch.manual_seed(1000 + job["seed"])
    model, tokenizer = load(job["sft"])
    by_prompt: dict[str, list[float]] = {}
    rows = []
    for prompt in read_prompts(job["eval_prompts"]):
        key = json.dumps(prompt)
        if key not in by_prompt:
            texts = sample(model, tokenizer, prompt, job["reference_samples"], job["eval"]["max_new_tokens"]).texts
            by_prompt[key] = [score(t) for t in texts]
        rows.append(by_prompt[key])
    Path(job["reference_scores"]).write_text(json.dumps(rows))


def reference_frontiers(scores: list[list[float]]) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Best-of-n from the SFT model with its exact KL, for n in BEST_OF, and the per-prompt
    KL-optimal policy pi* = pi_sft exp(r / beta) / Z (self-normalised importance weights over
    the SFT samples, effective sample size ``ess_min`` / ``ess_mean``), for beta in OPTIMUM_BETAS
    (dpo_lightning.experiments.frontiers)."""
    import torch

    from dpo_lightning.experiments import frontiers

    table = torch.tensor(scores, dtype=torch.float64)
    # n at most M / 4: the plug-in distribution of M samples says little about the best of more
    best = [dict(zip(("n", "reward", "kl"), (n, *frontiers.best_of_n(table, n)))) for n in BEST_OF
            if n <= table.shape[1] // 4]
    for row in best:
        row["kl_bound"] = math.log(row["n"]) - (row["n"] - 1) / row["n"]
    return best, [frontiers.optimum(table, b) for b in OPTIMUM_BETAS]


def add_regret(summary: list[dict[str, Any]], scores: list[list[float]]) -> None:
    """Each run's regret (pi*'s reward at its KL minus its reward) and KL efficiency (pi*'s KL
    for its reward over its KL), in place."""
    import torch

    from dpo_lightning.experiments import frontiers

    table = torch.tensor(scores, dtype=torch.float64)
    for r in summary:
        tau = LABEL_TEMPERATURE.get(r["series"])
        target = TARGET_BETA.get(r["series"], float(r["beta"]) if tau is not None and r["beta"] != "" else None)
        if target is not None:  # DPO's optimum on these labels: pi* at beta * tau
            beta_tau = target * (tau if tau is not None else BT_LABEL_TEMPERATURE)
            optimum = frontiers.optimum(table, beta_tau)
            r.update(optimum_beta=beta_tau, optimum_reward=optimum["reward"], optimum_kl=optimum["kl"])
        kl = max(float(r["kl"]), 0.0)
        r["regret"] = frontiers.regret(table, kl, r["reward"]) if kl > 0 else ""
        r["kl_efficiency"] = frontiers.kl_efficiency(table, kl, r["reward"]) if kl > 0 else ""


def run_job(job: dict) -> dict[str, Any]:
    """A worker process: sample pairs, train and evaluate a run, evaluate SFT, or diagnose a policy."""
    import torch

    torch.set_num_threads(job["threads"])
    sys.argv = sys.argv[:1]  # LightningCLI takes its arguments from run(), not from this script's command line
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    row: dict[str, Any] = {"series": job["series"], "label": job["label"], "seed": job["seed"], "name": job["name"],
                           **{k: job["loss_args"].get(k, "") for k in ("beta", "alpha")}}
    if job["kind"] == "pairs":
        sample_pairs_job(job)
    elif job["kind"] == "reference":
        reference_scores_job(job)
    elif job["kind"] == "sft":
        row.update(evaluate_sft(job))
    elif job["kind"] == "diagnose":
        from frontier_diagnosis import diagnose

        row.update(diagnose(job["policy"], job["sft"], job["eval_prompts"], DIAGNOSIS_SAMPLES,
                            job["eval"]["max_new_tokens"], seed=job["seed"]))
    else:
        policy = train(job)
        row.update(evaluate(job, str(policy)))
        row["trajectory"] = trajectory(job, row)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    row.update({"kind": job["kind"], "wall_s": time.perf_counter() - start, "cpu_s": cpu})
    return row


# -- aggregation ------------------------------------------------------------------------------------
def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run label: the mean across seeds and its standard error (``*_se``); with one
    seed, the evaluation's own standard error for reward and KL."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["label"]].append(r)
    result = []
    for label, group in groups.items():
        first = group[0]
        agg = {"series": first["series"], "label": label, "beta": first["beta"], "alpha": first["alpha"],
               "seeds": len(group)}
        for key in ("reward", "kl", "wellformed", "negative_slots"):
            values = [g[key] for g in group if isinstance(g.get(key), float)]
            if not values:
                agg[key], agg[f"{key}_se"] = "", ""
                continue
            agg[key], agg[f"{key}_se"] = mean_se(values)
            if key in ("reward", "kl"):  # the evaluation's own noise: a run's standard error, mean over seeds
                own = [g[f"{key}_stderr"] for g in group if isinstance(g.get(f"{key}_stderr"), float)]
                agg[f"{key}_eval_se"] = sum(own) / len(own) if own else ""
                if len(values) == 1:
                    agg[f"{key}_se"] = group[0][f"{key}_stderr"]
        result.append(agg)
    return result


def trajectory_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each run's trajectory as rows (``label, seed, point, step, reward, kl``), and their mean and
    standard error across seeds per label and point (point 0: the SFT model)."""
    flat = [{"series": r["series"], "label": r["label"], "seed": r["seed"], **p}
            for r in rows for p in r.get("trajectory") or []]
    sft = [r for r in rows if r["series"] == "SFT"]
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for p in flat:
        groups[(p["label"], p["point"])].append(p)
    summary = []
    for label in dict.fromkeys(p["label"] for p in flat):
        series = next(p["series"] for p in flat if p["label"] == label)
        if sft:
            summary.append({"series": series, "label": label, "point": 0, "seeds": len(sft),
                            "reward": mean_se([r["reward"] for r in sft])[0], "reward_se": "", "kl": 0.0, "kl_se": ""})
        for (name, point), group in sorted(groups.items(), key=lambda item: item[0][1]):
            if name != label:
                continue
            reward, reward_se = mean_se([g["reward"] for g in group])
            kl, kl_se = mean_se([g["kl"] for g in group])
            summary.append({"series": series, "label": label, "point": point, "seeds": len(group), "reward": reward,
                            "reward_se": reward_se, "kl": kl, "kl_se": kl_se})
    return flat, summary


def write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.4f}" if isinstance(r.get(k), float) else r.get(k, "")) for k in fields})


def read_csv(path: Path) -> list[dict[str, Any]]:
    def value(v: str) -> Any:
        try:
            return float(v)
        except ValueError:
            return v

    with path.open() as f:
        return [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]


def pair_coverage(pairs: Path, samples: Path) -> dict[str, Any]:
    """What a seed's pair data holds: mean scores of chosen and rejected, the share of chosen that
    are perfect (1.0), of pairs whose gap is at most 1/3 (one slot of three), of pairs whose
    rejected reply is at least half positive, the negative-slot share of the chosen replies,
    and (every sample saved) the SFT model's mean and best-of-4 reward."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]
    chosen = [r["score_chosen"] for r in rows]
    rejected = [r["score_rejected"] for r in rows]
    stats: dict[str, Any] = {
        "pairs": len(rows),
        "chosen_mean": sum(chosen) / len(chosen),
        "rejected_mean": sum(rejected) / len(rejected),
        "chosen_perfect": sum(c >= 1.0 for c in chosen) / len(chosen),
        "small_gap": sum(c - r <= 1 / 3 + 1e-6 for c, r in zip(chosen, rejected)) / len(rows),
        "rejected_half_positive": sum(r >= 0.5 for r in rejected) / len(rows),
        "chosen_negative_slots": sample_breakdown([{"completion": r["chosen"], "score": r["score_chosen"]}
                                                   for r in rows])["negative_slots"],
    }
    if samples.exists():  # written in order, PAIR_SAMPLES a prompt
        scores = [json.loads(line)["score"] for line in samples.read_text().splitlines() if line.strip()]
        groups = [scores[i : i + PAIR_SAMPLES] for i in range(0, len(scores), PAIR_SAMPLES)]
        stats["sft_mean"] = sum(scores) / len(scores)
        stats["best_of_4"] = sum(max(g) for g in groups) / len(groups)
    return stats


def optimal_frontier(scores: list[float]) -> list[dict[str, float]]:
    """The KL-optimal policies pi_b = pi_sft exp(r / b) / Z_b, for b from 10 down to 0.01: their
    reward E_pi_b[r] and KL(pi_b || pi_sft) = E_pi_b[r] / b - log Z_b depend only on the SFT
    model's distribution of rewards, estimated here from its samples ``scores``. No policy has
    a higher reward at the same KL (the KL-regularised objective's maximiser)."""
    points = []
    top = max(scores)
    for i in range(61):
        b = 10 ** (1 - i / 20)
        weights = [math.exp((s - top) / b) for s in scores]  # shifted for range; Z_b = exp(top / b) mean(w)
        z = sum(weights) / len(weights)
        reward = sum(s * w for s, w in zip(scores, weights)) / sum(weights)
        points.append({"beta": b, "kl": reward / b - (top / b + math.log(z)), "reward": reward})
    return points


# -- plots ------------------------------------------------------------------------------------------
def plot_frontier(rows: list[dict[str, Any]], path: Path, optimal: list[dict[str, Any]],
                  pairs: list[dict[str, Any]], best_of: list[dict[str, Any]] | None = None,
                  trajectories: list[dict[str, Any]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.25, 1]})
    for ax, xmax in zip(axes, (None, 2.2)):
        ax.plot([p["kl"] for p in optimal], [p["reward"] for p in optimal], color="grey", ls="--", lw=1,
                label="KL-optimal: π_sft·exp(r/β)/Z" + (" per prompt" if best_of else ""))
        if best_of:
            ax.plot([p["kl"] for p in best_of], [p["reward"] for p in best_of], color="grey", ls=":", marker=".",
                    lw=1, label="best-of-n from SFT (exact KL), n = " + ", ".join(f"{p['n']:g}" for p in best_of))
        if pairs:
            chosen = sum(p["chosen_mean"] for p in pairs) / len(pairs)
            ax.axhline(chosen, color="tab:blue", ls=":", lw=1, label=f"mean score of the chosen replies ({chosen:.2f})")
        for label in dict.fromkeys(t["label"] for t in trajectories or []):  # each run's path, mean over seeds
            path_points = sorted((t for t in trajectories if t["label"] == label), key=lambda t: t["point"])
            ax.plot([t["kl"] for t in path_points], [t["reward"] for t in path_points], color=STYLE[path_points[0]["series"]][0],
                    lw=0.6, alpha=0.35, marker=".", ms=2)
        for series in SERIES:
            pts = sorted((r for r in rows if r["series"] == series), key=lambda r: r["kl"])
            if not pts:
                continue
            color, marker = STYLE[series]
            se = lambda r, k: r[f"{k}_se"] if isinstance(r[f"{k}_se"], float) and not math.isnan(r[f"{k}_se"]) else 0.0
            ax.errorbar([r["kl"] for r in pts], [r["reward"] for r in pts], xerr=[se(r, "kl") for r in pts],
                        yerr=[se(r, "reward") for r in pts], fmt=marker, color=color, label=series, capsize=2, ms=4,
                        ls="-" if series != "SFT" else "none", lw=0.8, alpha=0.9)
            for i, r in enumerate(pts):
                if series == "SFT" or (xmax is not None and r["kl"] > xmax):
                    continue
                short = f"β{r['beta']:g}" + (f",α{r['alpha']:g}" if r["alpha"] != "" else "")
                ax.annotate(short, (r["kl"], r["reward"]), fontsize=6, color=color,
                            xytext=(4, -9 if i % 2 else 4), textcoords="offset points")
        ax.set_xlabel("sequence-level KL(π || π_sft), nats (Monte-Carlo)")
        ax.grid(alpha=0.3)
        if xmax is None:
            ax.set_xlim(-0.2, max(r["kl"] for r in rows) * 1.05 + 0.2)
            ax.set_ylim(0.45, 1.01)
            ax.set_ylabel("mean ground-truth sentiment reward")
            ax.legend(fontsize=7, loc="lower right")
        else:
            ax.set_xlim(-0.05, xmax)
            ax.set_ylim(0.7, 1.01)
            ax.set_title("zoom: KL ≤ 2.2 nats", fontsize=9)
    seeds = int(max(r["seeds"] for r in rows))
    axes[0].set_title(f"Controlled sentiment in miniature: reward vs KL ({seeds} seed{'s' if seeds > 1 else ''}; "
                      "mean ± 1 s.e. across seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves(out: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Log-probs of chosen and rejected replies during training: offline runs on the held-out
    pairs (their validation, ``source`` held_out), online and iterative runs on the pairs they
    trained on at each step (their own samples, ``source`` own_samples)."""
    curves = []
    for r in rows:
        run_dir = out / "runs" / r["name"]
        base = {"series": r["series"], "label": r["label"], "seed": r["seed"]}
        if (run_dir / "validation.json").exists():
            for h in json.loads((run_dir / "validation.json").read_text()):
                curves.append({**base, "source": "held_out", "step": int(h["step"]),
                               "chosen": h["logps/chosen"], "rejected": h["logps/rejected"]})
        elif (run_dir / "metrics.csv").exists():
            with (run_dir / "metrics.csv").open() as f:
                for m in csv.DictReader(f):
                    if m.get("train/logps/chosen") and m.get("train/logps/rejected"):
                        curves.append({**base, "source": "own_samples", "step": int(m["step"]),
                                       "chosen": float(m["train/logps/chosen"]),
                                       "rejected": float(m["train/logps/rejected"])})
    return curves


def beta_of(label: str) -> float:
    match = re.search(r"beta=([0-9.e-]+)", label)
    return float(match.group(1)) if match else 0.0


def plot_logps(curves: list[dict[str, Any]], path: Path, smooth: int = 10) -> None:
    """One panel per series: the mean over seeds of log π(chosen) (solid) and log π(rejected)
    (dashed) per β; own-sample curves are running means over ``smooth`` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [s for s in SERIES if any(c["series"] == s for c in curves)]
    if not series:
        return
    cols = min(3, len(series))
    nrows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.3 * cols, 3.4 * nrows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes.flat, series):
        labels = sorted({c["label"] for c in curves if c["series"] == name}, key=beta_of)
        own = False
        for i, label in enumerate(labels):
            by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
            for c in curves:
                if c["label"] == label:
                    by_step[int(c["step"])].append((c["chosen"], c["rejected"]))
                    own = c["source"] == "own_samples"
            steps = sorted(by_step)
            color = cmap(i / max(len(labels) - 1, 1))
            for j, ls in ((0, "-"), (1, "--")):
                ys = [sum(v[j] for v in by_step[s]) / len(by_step[s]) for s in steps]
                if own and len(ys) > smooth:
                    ys = [sum(ys[max(0, t - smooth + 1) : t + 1]) / len(ys[max(0, t - smooth + 1) : t + 1])
                          for t in range(len(ys))]
                ax.plot(steps, ys, ls=ls, color=color, lw=1.2, label=label[len(name):].strip() if j == 0 else None)
        where = f"its own samples, running mean of {smooth} steps" if own else "held-out pairs sampled from SFT"
        ax.set_title(f"{name}\n({where})", fontsize=8)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel("mean log π(y|x)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, title="chosen —, rejected - -", title_fontsize=6)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(docs: Path = DOCS) -> None:
    """Redraw docs/frontier.png and docs/logps.png from docs/*.csv (``--plot-only``)."""
    pairs = read_csv(docs / "frontier_pairs.csv") if (docs / "frontier_pairs.csv").exists() else []
    optimal = read_csv(docs / "frontier_optimal.csv") if (docs / "frontier_optimal.csv").exists() else []
    best_of = read_csv(docs / "frontier_best_of_n.csv") if (docs / "frontier_best_of_n.csv").exists() else None
    trajectories = read_csv(docs / "frontier_trajectories.csv") if (docs / "frontier_trajectories.csv").exists() else None
    plot_frontier(read_csv(docs / "frontier.csv"), docs / "frontier.png", optimal, pairs, best_of, trajectories)
    if (docs / "logps.csv").exists():
        plot_logps(read_csv(docs / "logps.csv"), docs / "logps.png")


# -- the experiment ---------------------------------------------------------------------------------
def label_of(series: str, loss_args: dict) -> str:
    return f"{series} " + " ".join(f"{k}={v}" for k, v in loss_args.items())


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished worker processes (imports included)."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def run_pool(jobs: list[dict], workers: int) -> list[dict[str, Any]]:
    """The jobs on ``workers`` worker processes, each running one job after another (as the
    first version of this script ran every fit in one process: every fit and evaluation seeds
    itself). A job's ``cpu_s`` is its own; :func:`cpu_seconds` counts the workers' start too."""
    if not jobs:
        return []
    results = []
    with ProcessPoolExecutor(max(1, workers), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job): job for job in jobs}
        for future in as_completed(futures):
            results.append(future.result())
            r = results[-1]
            print(f"[{len(results)}/{len(jobs)}] {futures[future]['name']}: {r['wall_s']:.0f} s wall, "
                  f"{r['cpu_s']:.0f} s CPU", flush=True)
    return results


def reference_only(out: Path) -> None:
    """``--reference-only``: best-of-n and pi* from the SFT model of HEAD's recipe, and the
    regret and KL efficiency of the runs in docs/frontier.csv against them (printed)."""
    sft = out / "sft"
    if not sft.exists():
        train_sft(out)
    job = {"seed": 0, "sft": str(sft), "eval": EVAL, "reference_samples": REFERENCE_SAMPLES,
           "eval_prompts": str(subset(EVAL_PROMPTS, out / "data" / "eval_prompts.jsonl", EVAL["prompts"])),
           "reference_scores": str(out / "reference_scores.json")}
    reference_scores_job(job)
    table = json.loads((out / "reference_scores.json").read_text())
    best_of, optimal = reference_frontiers(table)
    for r in best_of:
        print(f"best-of-{r['n']:<3} reward {r['reward']:.3f}  exact KL {r['kl']:.2f}  (bound {r['kl_bound']:.2f})")
    for r in optimal[::5]:
        print(f"pi* beta {r['beta']:<8.3g} reward {r['reward']:.3f}  KL {r['kl']:.2f}  ESS min {r['ess_min']:.0f} "
              f"mean {r['ess_mean']:.0f} of {len(table[0])}")
    rows = read_csv(DOCS / "frontier.csv")
    add_regret(rows, table)
    for r in rows:
        if isinstance(r["regret"], float):
            print(f"{r['label']:<44} reward {r['reward']:.3f}  KL {r['kl']:.2f}  regret {r['regret']:.3f}  "
                  f"KL efficiency {r['kl_efficiency']:.2f}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per run (default {SEEDS}; --quick: {QUICK_SEEDS})")
    parser.add_argument("--quick", action="store_true", help="development: SFT for 1 epoch, 200 prompts, one run per "
                        "series, 256 evaluation samples, 1 seed; writes only under outputs/frontier_quick")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--only", default=None, help="a regular expression: only the run labels it matches")
    parser.add_argument("--no-diagnosis", action="store_true", help="skip the KL split of the seed-0 policies")
    parser.add_argument("--plot-only", action="store_true", help="redraw docs/*.png and the tables of docs/frontier.md "
                        "and README.md from docs/*.csv")
    parser.add_argument("--reference-only", action="store_true", help="train the SFT model (or reuse outputs/"
                        "frontier_reference/sft), sample the reference frontiers and print them with the regret and "
                        "KL efficiency of the runs in docs/frontier.csv; writes only under outputs/frontier_reference")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = QUICK_SEEDS if args.quick else SEEDS
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.plot_only:
        replot()
        frontier_tables.write_tables(DOCS, DOCS / "frontier.md", ROOT / "README.md")
        return
    if args.reference_only:
        reference_only(OUT.with_name("frontier_reference"))
        return
    start = time.perf_counter()
    out = OUT.with_name("frontier_quick") if args.quick else OUT
    docs = out / "docs" if args.quick else DOCS
    if out.exists():
        shutil.rmtree(out)
    n_prompts = QUICK_PROMPTS if args.quick else PROMPTS
    evaluation = QUICK_EVAL if args.quick else EVAL
    prompt_file = subset(PAIR_PROMPTS, out / "data" / "pair_prompts.jsonl", n_prompts)
    eval_prompts = subset(EVAL_PROMPTS, out / "data" / "eval_prompts.jsonl", evaluation["prompts"])
    sweep = QUICK_SWEEP if args.quick else SWEEP
    if not ITERATIVE_RECIPE.exists():  # HOOK: iterative DPO joins as soon as recipes/iterative_dpo.yaml exists
        print(f"{ITERATIVE_RECIPE.relative_to(ROOT)} not found: iterative DPO left out")
        sweep = [s for s in sweep if s[1] != "iterative"]
    if args.only:
        sweep = [s for s in sweep if re.search(args.only, label_of(s[0], s[3]))]
    seeds = list(range(args.seeds))

    print("== SFT (the reference policy, seed 0)", flush=True)
    sft_start = time.perf_counter()
    sft = str(train_sft(out, epochs=1 if args.quick else None))
    timing: dict[str, Any] = {"sft": {"wall_s": time.perf_counter() - sft_start, "cpu_s": cpu_seconds()}}

    base = {"out": str(out), "sft": sft, "threads": args.threads, "budget": n_prompts * PAIR_SAMPLES,
            "bt_repeats": QUICK_BT_PROMPT_REPEATS if args.quick else BT_PROMPT_REPEATS,
            "prompts": n_prompts, "prompt_file": str(prompt_file), "eval": evaluation, "eval_prompts": str(eval_prompts),
            "trajectory_samples": QUICK_TRAJECTORY_SAMPLES if args.quick else TRAJECTORY_SAMPLES,
            "loss_args": {}, "settings": {}}
    pair_jobs, run_jobs = [], []
    for seed in seeds:
        folder = out / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        pairs = {f"{prefix}{part}": str(folder / f"{prefix}{part}.jsonl") for prefix in ("", "bt_")
                 for part in ("pairs", "pairs_train", "pairs_val")}
        pairs["pair_samples"] = str(folder / "pair_samples.jsonl")
        pair_jobs.append({**base, **pairs, "kind": "pairs", "series": "pairs", "label": "pairs",
                          "name": f"pairs_seed{seed}", "seed": seed})
        run_jobs.append({**base, "kind": "sft", "series": "SFT", "label": "SFT", "name": f"SFT_seed{seed}", "seed": seed})
        for series, kind, recipe_name, loss_args, settings in sweep:
            label = label_of(series, loss_args)
            if settings.get("seeds") is not None and seed >= settings["seeds"]:  # a series run on fewer seeds
                continue
            name = re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_") + f"_seed{seed}"
            run_jobs.append({**base, **pairs, "kind": kind, "series": series, "label": label, "name": name,
                             "seed": seed, "recipe": recipe_name, "loss_args": dict(loss_args), "settings": settings})
    reference_scores = out / "reference_scores.json"
    pair_jobs.append({**base, "kind": "reference", "series": "reference", "label": "reference", "name": "reference",
                      "seed": 0, "reference_scores": str(reference_scores),
                      "reference_samples": QUICK_REFERENCE_SAMPLES if args.quick else REFERENCE_SAMPLES})
    print(f"== pairs: {PAIR_SAMPLES} SFT samples for each of {n_prompts} prompts, seeds {seeds}; "
          f"{pair_jobs[-1]['reference_samples']} for each evaluation prompt (reference frontiers)", flush=True)
    phase, cpu = time.perf_counter(), cpu_seconds()
    run_pool(pair_jobs, args.jobs)
    timing["pairs"] = {"wall_s": time.perf_counter() - phase, "cpu_s": cpu_seconds() - cpu}
    order = {"iterative": 0, "online": 1, "offline": 2, "sft": 3}  # the longest first: the workers finish together
    run_jobs.sort(key=lambda j: order[j["kind"]])
    print(f"== {len(run_jobs)} runs ({len(sweep)} settings + SFT, {len(seeds)} seeds) on {args.jobs} workers", flush=True)
    phase, cpu = time.perf_counter(), cpu_seconds()
    rows = run_pool(run_jobs, args.jobs)
    timing["runs"] = {"wall_s": time.perf_counter() - phase, "cpu_s": cpu_seconds() - cpu}
    rows.sort(key=lambda r: (SERIES.index(r["series"]), str(r["beta"]), str(r["alpha"]), r["seed"]))

    split_rows = []
    if not args.no_diagnosis:
        print("== where the KL goes (seed 0)", flush=True)
        phase, cpu = time.perf_counter(), cpu_seconds()
        jobs = [{**base, "kind": "diagnose", "series": r["series"], "label": r["label"], "name": f"diagnose_{r['name']}",
                 "seed": 0, "loss_args": {k: r[k] for k in ("beta", "alpha") if r[k] != ""},
                 "policy": sft if r["series"] == "SFT" else str(out / "policies" / r["name"])}
                for r in rows if r["seed"] == 0]
        split_rows = run_pool(jobs, args.jobs)
        split_rows.sort(key=lambda r: (SERIES.index(r["series"]), str(r["beta"]), str(r["alpha"])))
        timing["diagnosis"] = {"wall_s": time.perf_counter() - phase, "cpu_s": cpu_seconds() - cpu}

    coverage = [{"seed": s, **pair_coverage(out / f"seed{s}" / "pairs.jsonl", out / f"seed{s}" / "pair_samples.jsonl")}
                for s in seeds]
    sft_scores = [json.loads(line)["score"] for s in seeds if (out / f"seed{s}" / "pair_samples.jsonl").exists()
                  for line in (out / f"seed{s}" / "pair_samples.jsonl").read_text().splitlines() if line.strip()]
    summary = aggregate(rows)
    best_of: list[dict[str, float]] = []
    if reference_scores.exists():  # per evaluation prompt: best-of-n and pi*, and each run's regret against pi*
        table = json.loads(reference_scores.read_text())
        best_of, optimal = reference_frontiers(table)
        add_regret(summary, table)
    else:
        optimal = optimal_frontier(sft_scores) if sft_scores else []
    curves = training_curves(out, rows)
    trajectories, trajectory_means = trajectory_rows(rows)

    write_csv(out / "runs.csv", rows, ["series", "label", "beta", "alpha", "seed", "reward", "reward_stderr", "kl",
                                       "kl_stderr", "wellformed", "negative_slots", "reward_wellformed", "samples",
                                       "wall_s", "cpu_s"])
    write_csv(docs / "frontier.csv", summary, ["series", "label", "beta", "alpha", "seeds", "reward", "reward_se",
                                               "reward_eval_se", "kl", "kl_se", "kl_eval_se", "wellformed",
                                               "wellformed_se", "negative_slots", "negative_slots_se", "regret",
                                               "kl_efficiency", "optimum_beta", "optimum_reward", "optimum_kl"])
    write_csv(out / "trajectories.csv", trajectories, ["series", "label", "seed", "point", "step", "reward", "kl"])
    write_csv(docs / "frontier_trajectories.csv", trajectory_means,
              ["series", "label", "point", "seeds", "reward", "reward_se", "kl", "kl_se"])
    write_csv(docs / "frontier_pairs.csv", coverage, ["seed", "pairs", "sft_mean", "best_of_4", "chosen_mean",
                                                      "rejected_mean", "chosen_perfect", "small_gap",
                                                      "rejected_half_positive", "chosen_negative_slots"])
    write_csv(docs / "frontier_optimal.csv", optimal, ["beta", "kl", "reward", "ess_min", "ess_mean"])
    write_csv(docs / "frontier_best_of_n.csv", best_of, ["n", "reward", "kl", "kl_bound"])
    write_csv(docs / "logps.csv", curves, ["series", "label", "seed", "source", "step", "chosen", "rejected"])
    if split_rows:
        write_csv(docs / "frontier_kl_split.csv", split_rows, [
            "series", "label", "beta", "alpha", "samples", "reward", "kl_exact", "kl_sentiment", "kl_eos", "kl_other",
            "kl_sentiment_share", "wellformed", "negative_slots", "length", "eos", "product_reward_min",
            "product_reward_max", "worst_product"])
    plot_frontier(summary, docs / "frontier.png", optimal, coverage, best_of, trajectory_means)
    plot_logps(curves, docs / "logps.png")

    total = time.perf_counter() - start
    cpu = cpu_seconds()  # every process, start to end
    timing.update({
        "total": {"wall_s": total, "cpu_s": cpu}, "jobs": args.jobs, "threads": args.threads,
        "cpu_s_by_series": {s: sum(r["cpu_s"] for r in rows if r["series"] == s) for s in SERIES},
        # on a quiet machine with --jobs workers: SFT alone, then the rest shared by the workers
        "quiet_estimate_s": timing["sft"]["cpu_s"] + (cpu - timing["sft"]["cpu_s"]) / max(args.jobs, 1),
    })
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    (docs / "frontier_timing.json").write_text(json.dumps(timing, indent=2))
    frontier_md, readme = DOCS / "frontier.md", ROOT / "README.md"
    if args.quick:  # the tables go into copies, the real ones untouched
        frontier_md, readme = (Path(shutil.copy(f, docs / f.name)) for f in (frontier_md, readme))
    frontier_tables.write_tables(docs, frontier_md, readme)
    print(f"\nwrote {out / 'runs.csv'} and {docs}/frontier*.csv, logps.csv, frontier.png, logps.png in {total:.0f} s "
          f"({cpu:.0f} CPU seconds in all processes; quiet estimate {timing['quiet_estimate_s']:.0f} s)")
    for c in coverage:
        print(f"  pairs, seed {c['seed']}: {c['pairs']} pairs, SFT mean {c.get('sft_mean', float('nan')):.3f}, best of 4 "
              f"{c.get('best_of_4', float('nan')):.3f}, chosen {c['chosen_mean']:.3f}, rejected {c['rejected_mean']:.3f}")
    for r in best_of:
        print(f"  best-of-{r['n']:<3} from SFT: reward {r['reward']:.3f}, exact KL {r['kl']:.2f} (bound {r['kl_bound']:.2f})")
    for r in summary:
        print(f"  {r['label']:<44} reward {r['reward']:.3f} ± {r['reward_se']:.3f}   KL {r['kl']:.2f} ± {r['kl_se']:.2f}"
              + (f"   well-formed {r['wellformed']:.2f}, negative slots {r['negative_slots']:.3f}"
                 if isinstance(r.get("negative_slots"), float) else "")
              + (f"   regret {r['regret']:.3f}, KL efficiency {r['kl_efficiency']:.2f}"
                 if isinstance(r.get("regret"), float) else ""))
    for r in split_rows:
        print(f"  KL split {r['label']:<36} {r['kl_exact']:.2f} nats: sentiment words {r['kl_sentiment']:.2f}, "
              f"EOS {r['kl_eos']:.2f}, other tokens {r['kl_other']:.2f}")


if __name__ == "__main__":
    main()
