"""The controlled-sentiment experiment in miniature: reward against KL for DPO, ODPO and IPO.

    make experiment          # or: .venv/bin/python scripts/sentiment_frontier.py

1. SFT: the tiny Llama (data/tiny-llama) learns the review language of data/sentiment (mixed
   sentiment); recipes/base.yaml + recipes/sft.yaml. It is the reference policy of every run below.
2. Pairs: 4 samples per prompt from the SFT model, scored by the ground truth
   (dpo_lightning.experiments.sentiment:score); best vs worst, with their scores (for ODPO).
3. Sweep: DPO, ODPO and IPO (recipes/dpo.yaml; base.yaml + odpo.yaml / ipo.yaml) over a few betas
   (and alphas for ODPO) on the same pairs.
4. Evaluation: for SFT and every run, samples on held-out prompts; mean ground-truth reward and
   the Monte-Carlo sequence-level KL(pi || pi_sft).
5. Result: outputs/frontier/results.csv and docs/frontier.png (plus docs/frontier.csv).
"""

from __future__ import annotations

import copy
import csv
import shutil
import sys
import time
from pathlib import Path

import yaml

from dpo_lightning.cli import run
from dpo_lightning.sampling import evaluate_policy, sample_pairs

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "outputs" / "frontier"
SWEEP = [
    ("DPO", "dpo", {"beta": 0.02}), ("DPO", "dpo", {"beta": 0.05}), ("DPO", "dpo", {"beta": 0.1}),
    ("DPO", "dpo", {"beta": 0.5}), ("DPO", "dpo", {"beta": 1.0}),
    ("ODPO", "odpo", {"beta": 0.1, "alpha": 0.5}), ("ODPO", "odpo", {"beta": 0.1, "alpha": 1.0}),
    ("ODPO", "odpo", {"beta": 0.5, "alpha": 1.0}), ("ODPO", "odpo", {"beta": 1.0, "alpha": 1.0}),
    ("IPO", "ipo", {"beta": 0.1}), ("IPO", "ipo", {"beta": 0.5}), ("IPO", "ipo", {"beta": 1.0}),
]
EVAL = {"samples_per_prompt": 16, "max_new_tokens": 32, "seed": 0}  # 64 prompts x 16 = 1024 samples
METRICS = ("reward", "reward_stderr", "kl", "kl_stderr")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.logger", "false"]


def recipe(name: str) -> list[str]:
    """The ``--config`` arguments of a shipped recipe: dpo.yaml is complete, the others are
    overlays on base.yaml."""
    path = str(ROOT / "recipes" / f"{name}.yaml")
    return ["--config", path] if name == "dpo" else ["--config", str(ROOT / "recipes" / "base.yaml"), "--config", path]


def fit(name: str, recipe_name: str, changes: dict) -> None:
    """Fit a shipped recipe with ``changes`` on top: a config file of their own, merged last."""
    path = OUT / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(changes, sort_keys=False))
    run(["fit", *recipe(recipe_name), "--config", str(path), *QUIET])


def train_sft() -> Path:
    fit("sft", "sft", {
        "trainer": {"default_root_dir": str(OUT / "runs" / "sft"), "enable_checkpointing": False},
        "model": {"init_args": {"export_dir": str(OUT / "sft")}},
    })
    return OUT / "sft"


def train_preference(recipe_name: str, loss_args: dict, name: str, sft: Path, pairs: Path) -> Path:
    fit(name, recipe_name, {
        "trainer": {"default_root_dir": str(OUT / "runs" / name), "max_epochs": 3, "enable_checkpointing": False,
                    "num_sanity_val_steps": 0},
        "model": {"init_args": {
            "model": {"name_or_path": str(sft)},  # the SFT model is the initial policy and the reference
            "loss": {"init_args": loss_args},
            "optimizer": {"init_args": {"lr": 3e-4}},
            "export_dir": str(OUT / "policies" / name),
        }},
        "data": {"init_args": {"train_data": str(pairs), "val_data": None, "val_fraction": 0.1, "batch_size": 16}},
    })
    return OUT / "policies" / name


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"SFT": "black", "DPO": "tab:blue", "ODPO": "tab:orange", "IPO": "tab:green"}
    for loss in colors:
        pts = [r for r in rows if r["loss"] == loss]
        if not pts:
            continue
        ax.errorbar([r["kl"] for r in pts], [r["reward"] for r in pts], xerr=[r["kl_stderr"] for r in pts],
                    yerr=[r["reward_stderr"] for r in pts], fmt="o", color=colors[loss], label=loss, capsize=2)
        if loss != "SFT":  # one line per loss, in order of KL; the betas label the points
            pts = sorted(pts, key=lambda r: r["kl"])
            ax.plot([r["kl"] for r in pts], [r["reward"] for r in pts], color=colors[loss], alpha=0.4, lw=1)
        for i, r in enumerate(pts):
            short = "SFT" if loss == "SFT" else f"β{r['beta']}" + (f",α{r['alpha']}" if r["alpha"] != "" else "")
            ax.annotate(short, (r["kl"], r["reward"]), fontsize=6, color=colors[loss],
                        xytext=(4, -9 if i % 2 else 4), textcoords="offset points")
    ax.set_xlabel("sequence-level KL(pi || pi_sft), nats (Monte-Carlo)")
    ax.set_ylabel("mean ground-truth sentiment reward")
    ax.set_title("Controlled sentiment in miniature: reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def replot() -> None:
    """Redraw docs/frontier.png from docs/frontier.csv (``--plot-only``)."""
    with (ROOT / "docs" / "frontier.csv").open() as f:
        rows = [{k: (float(v) if k in METRICS else v) for k, v in r.items()}
                for r in csv.DictReader(f)]
    plot(rows, ROOT / "docs" / "frontier.png")


def main() -> None:
    if "--plot-only" in sys.argv:
        replot()
        return
    start = time.perf_counter()
    if OUT.exists():
        shutil.rmtree(OUT)
    sft = train_sft()
    pairs = sample_pairs(str(sft), str(ROOT / "data/sentiment/pair_prompts.jsonl"), str(OUT / "pairs.jsonl"),
                         samples_per_prompt=4, seed=0)
    prompts = str(ROOT / "data/sentiment/eval_prompts.jsonl")
    rows = []
    result = evaluate_policy(str(sft), str(sft), prompts, **EVAL)
    rows.append({"loss": "SFT", "label": "SFT", "beta": "", "alpha": "", **result})
    for loss, recipe, loss_args in SWEEP:
        label = f"{loss} " + " ".join(f"{k}={v}" for k, v in loss_args.items())
        name = label.replace(" ", "_").replace("=", "")
        policy = train_preference(recipe, copy.deepcopy(loss_args), name, sft, pairs)
        result = evaluate_policy(str(policy), str(sft), prompts, **EVAL)
        rows.append({"loss": loss, "label": label, "beta": loss_args.get("beta", ""), "alpha": loss_args.get("alpha", ""), **result})
    fields = ["loss", "label", "beta", "alpha", "reward", "reward_stderr", "kl", "kl_stderr", "samples"]
    for target in (OUT / "results.csv", ROOT / "docs" / "frontier.csv"):
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (f"{r[k]:.4f}" if k in METRICS else r[k]) for k in fields})
    plot(rows, ROOT / "docs" / "frontier.png")
    print(f"\nwrote {OUT / 'results.csv'}, docs/frontier.csv and docs/frontier.png in {time.perf_counter() - start:.0f} s")
    for r in rows:
        print(f"  {r['label']:<24} reward {r['reward']:.3f} ± {r['reward_stderr']:.3f}   KL {r['kl']:.2f} ± {r['kl_stderr']:.2f}")


if __name__ == "__main__":
    main()
