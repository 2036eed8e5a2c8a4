"""benchmarks/online_throughput.py: both tools sample after the same prompt ids; its quick mode
runs dpo-lightning's online and iterative runs (TRL's skipped when trl is not installed) and
prints a row per run with the measured phases."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPT = BENCHMARKS / "online_throughput.py"


def load_benchmark():
    """benchmarks/online_throughput.py as a module (benchmarks/ is no package: its folder goes
    on ``sys.path`` for ``bench_common``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("online_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_word_score_by_hand() -> None:
    bench = load_benchmark()
    score = sys.modules["bench_common"].word_score
    # w1 -> 1/96, w97 -> 0, w193 -> 96/96; the non-words are ignored
    assert math.isclose(score("w1 w97 w193 <unk> hello"), (1 / 96 + 0 + 1) / 3, rel_tol=1e-12)
    assert score("") == 0.0 and score("no words") == 0.0
    assert bench.SETTINGS["small"].judge == "bench_common:word_score"


@pytest.mark.parametrize("setting", ["small", "sentiment"])
def test_trl_and_ours_sample_after_the_same_prompt_ids(tmp_path, setting) -> None:
    """TRL tokenizes prompts without special tokens, so the benchmark writes the BOS in front;
    the ids must then be dpo-lightning's own (``encode_prompt``), BOS included."""
    bench = load_benchmark()
    bench.make_inputs(tmp_path, setting)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    first = json.loads((tmp_path / "prompts.jsonl").read_text().splitlines()[0])["prompt"]
    ids = tokenizer(bench.trl_prompt(tokenizer, first), add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert bench.check_same_prompt_ids(tmp_path)


@pytest.mark.slow
def test_quick_mode_runs_ours_and_prints_a_row_per_run(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "runs.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--settings", "small", "--runs", "ours-online,ours-iter", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if importlib.util.find_spec("trl") is None:
        assert "trl not installed: TRL runs skipped" in proc.stdout
    assert "TRL and dpo-lightning prompt ids identical: True" in proc.stdout
    setting = load_benchmark().SETTINGS["small"]
    runs = {r["run"]: r for r in json.loads(out.read_text())}
    assert set(runs) == {"ours-online", "ours-iter"}

    online = runs["ours-online"]
    assert online["steps"] == setting.quick_steps and online["prompts"] == setting.quick_steps * setting.batch
    assert 0 < online["pairs"] <= online["prompts"]  # one pair per prompt at most (best vs worst of 2)
    phases = online["phases"]
    # every step sampled and judged: both phases timed, and inside the steps' time
    assert phases["generate"] > 0 and phases["score"] > 0
    assert phases["generate"] + phases["score"] < phases["step"] <= online["cpu_seconds"]

    iterative = runs["ours-iter"]
    assert iterative["prompts"] == setting.quick_iter_prompts
    assert iterative["steps"] == math.ceil(setting.quick_iter_prompts / setting.train_batch)  # steps_per_round
    assert 0 < iterative["pairs"] <= iterative["prompts"]
    parts = iterative["phases"]
    assert all(parts[k] > 0 for k in ("generate", "score", "train", "other"))
    assert math.isclose(sum(parts.values()), iterative["cpu_seconds"], rel_tol=1e-9)

    for name, r in runs.items():
        assert math.isfinite(r["prompts_s"]) and r["prompts_s"] > 0, name
        assert math.isclose(r["cpu_prompts_s"], r["prompts"] / r["cpu_seconds"]) and r["peak_rss_mb"] > 0
    # the table: one row per run, its prompts/s as measured, its shares adding up to 100% (rounded)
    for name in runs:
        row = re.search(rf"^small\s+{name}\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+((?:\d+%\s+){{3}})(\S+)", proc.stdout, re.M)
        assert row, proc.stdout[-3000:]
        assert math.isclose(float(row[1]), runs[name]["prompts_s"], abs_tol=0.006)
        percents = [int(p) for p in re.findall(r"(\d+)%", row[5] + row[6])]
        assert abs(sum(percents) - 100) <= 2, row[0]
