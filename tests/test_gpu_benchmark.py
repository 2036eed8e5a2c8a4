"""benchmarks/gpu_throughput.py: its CPU smoke mode runs and prints its table; its MFU's FLOP count."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import GPU_BENCHMARK, load_gpu_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = GPU_BENCHMARK


def test_model_flops_per_token_by_hand() -> None:
    config = dict(hidden_size=4, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=8, vocab_size=10)
    # weights 2*16 + 2*4*2 + 3*4*8 = 144; per token 2*144 + 4*4*1*(8+1)/2 + 2*4*10*5/8 = 410; 4 passes
    assert load_gpu_benchmark().model_flops_per_token(config, prompt=3, response=5) == 4 * 410


def test_smoke_mode_runs_ours_on_cpu_and_prints_the_table(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPU_BENCH_WORK": str(tmp_path / "work")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--runs", "ours-bf16", "--out", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = re.search(r"^ours-bf16\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+-\s+-\s+-$", proc.stdout, re.M)
    assert row, proc.stdout[-3000:]
    assert float(row[1]) > 0 and int(row[2]) > 0 and float(row[3]) > 0
    records = {r["run"]: r for r in map(json.loads, (tmp_path / "out" / "gpu.jsonl").read_text().splitlines())}
    ours = records["ours-bf16"]
    assert "error" not in ours, ours
    assert ours["pairs_timed"] == 3 * 8 and len(ours["step_ms"]) == 3
    # the CPU choices: foreach AdamW, PyTorch's own attention choice, no liger head
    assert ours["optimizer"] == "AdamW fused=None" and ours["sdpa_backends"] == "None"
    assert ours["liger_reference_head"] is False
    assert records["env"]["mode"] == "smoke"
