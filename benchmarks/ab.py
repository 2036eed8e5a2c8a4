"""A/B of dpo-lightning settings: the same run of throughput.py with other ``PreferenceModule``
options, each in its own one-thread subprocess, interleaved (the order reversed every other
repeat), median and range of wall and CPU time.

    python benchmarks/ab.py --setting small --pairs 128 --repeats 4 \\
        --variant 'chunked={"logprobs": "chunked"}' --variant 'full={"logprobs": "full"}'

The first variant is the baseline of the ratios. CPU time (the run's own, from model
construction to the end of training) is the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402


def worker(folder: Path, setting: str, options: dict, epochs: int, precompute: bool) -> None:
    import torch

    torch.set_num_threads(1)
    run = throughput.Run("ours", "default", precompute, epochs)
    wall, cpu = throughput.run_ours(folder, throughput.SETTINGS[setting], run, **options)
    print("RESULT " + json.dumps({"seconds": wall, "cpu_seconds": cpu}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="small", choices=list(throughput.SETTINGS))
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precompute", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], help='NAME=JSON options, e.g. full={"logprobs": "full"}')
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(Path(args.folder), args.setting, json.loads(args.worker), args.epochs, args.precompute)
        return
    variants = dict(v.split("=", 1) for v in args.variant) or {"default": "{}"}
    for name, options in variants.items():
        json.loads(options)  # fail early on a typo
    folder = Path(tempfile.mkdtemp(prefix="dpo-ab-"))
    throughput.make_inputs(folder, throughput.SETTINGS[args.setting], args.pairs)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="datasets-", dir=folder)}
            cmd = [sys.executable, __file__, "--worker", variants[name], "--setting", args.setting,
                   "--folder", str(folder), "--epochs", str(args.epochs)] + (["--precompute"] if args.precompute else [])
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            results[name].append(r)
            print(f"[{repeat + 1}/{args.repeats}] {name:<16} wall {r['seconds']:7.2f} s  CPU {r['cpu_seconds']:7.2f} s "
                  f"(process {time.perf_counter() - start:.1f} s)", flush=True)
    base = next(iter(variants))
    print(f"\n{args.setting}, {args.pairs} pairs, {args.epochs} epoch(s){', precomputed reference' if args.precompute else ''}; "
          f"median [min-max] over {args.repeats} interleaved repeats")
    print(f"{'variant':<16}{'wall s':>24}{'CPU s':>24}{'CPU x base':>12}{'wall x base':>12}")
    for name, rs in results.items():
        if not rs:
            continue
        cells = []
        for key in ("seconds", "cpu_seconds"):
            v = [r[key] for r in rs]
            cells.append(f"{statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]")
        ratio = {k: statistics.median(r[k] for r in results[base]) / statistics.median(r[k] for r in rs)
                 for k in ("seconds", "cpu_seconds")} if results[base] else {"seconds": 0, "cpu_seconds": 0}
        print(f"{name:<16}{cells[0]:>24}{cells[1]:>24}{ratio['cpu_seconds']:>12.3f}{ratio['seconds']:>12.3f}")
    print("(x base: the baseline's time over this variant's: above 1 is faster)")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
