"""Start-up time of the ``dpo-lightning`` command: what runs before the first line of work.

    .venv/bin/python benchmarks/startup.py                      # this checkout, 5 repeats
    .venv/bin/python benchmarks/startup.py --source /tmp/old    # another checkout (a git worktree)
    .venv/bin/python benchmarks/startup.py --repeats 1 --no-cold  # a smoke run

Three commands, each run in a fresh process from the repository root, as ``python -m dpo_lightning``
(the console script's entry):

- ``fit --help``, twice: the first call of an installation (an empty help cache: the CLI builds
  the text and saves it) and every later one (printed from the cache; see
  :mod:`dpo_lightning.help_cache`);
- ``fit --config recipes/quickstart.yaml --print_config``;
- a 1-step ``fit`` of the quickstart recipe (the shipped tiny Llama; no validation, no export
  check beyond the recipe's own), to a temporary folder.

Each is timed ``--repeats`` times warm (files in the page cache, bytecode compiled) and, where
the machine lets this user drop the page cache (``/proc/sys/vm/drop_caches``, root), as many
times cold (the cache dropped before each run). Printed: the median wall time and the median
CPU time (user + system of the child: steadier than wall time on a shared machine) per command.
``--source DIR`` runs the package found in ``DIR`` (``PYTHONPATH=DIR``, and ``DIR`` as the
working directory, which ``python -m`` puts first on ``sys.path``) with this interpreter, so two
checkouts compare with the same installed libraries.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


#: commands whose every run starts with an empty help cache
FIRST_CALLS = ("fit --help, first call",)


def commands(out_dir: str, source: Path) -> dict[str, list[str]]:
    entry = "dpo_lightning" if (source / "dpo_lightning" / "__main__.py").exists() else "dpo_lightning.cli"
    cli = [sys.executable, "-m", entry]
    recipe = ["--config", "recipes/quickstart.yaml"]
    return {
        "fit --help, first call": cli + ["fit", "--help"],
        "fit --help, cached": cli + ["fit", "--help"],
        "fit --print_config": cli + ["fit", *recipe, "--print_config"],
        "fit, 1 step": cli + ["fit", *recipe, "--trainer.max_steps", "1", "--trainer.num_sanity_val_steps", "0",
                              "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", out_dir,
                              "--model.init_args.export_dir", f"{out_dir}/policy"],
    }


def can_drop_caches() -> bool:
    return DROP_CACHES.exists() and os.access(DROP_CACHES, os.W_OK)


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def timed(cmd: list[str], env: dict[str, str], cold: bool, cwd: Path) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one run of ``cmd``; fails loudly if it fails."""
    if cold:
        drop_caches()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--source", type=Path, default=None, help="checkout whose dpo_lightning to run")
    parser.add_argument("--no-cold", action="store_true", help="warm runs only")
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DPO_LIGHTNING_VERBOSE", None)
    if args.source:
        env["PYTHONPATH"] = str(args.source.resolve())
    cold = not args.no_cold and can_drop_caches()
    source = (args.source or ROOT).resolve()  # the working directory too: `python -m` puts it first on sys.path
    print(f"start-up of dpo-lightning from {source}; median of {args.repeats}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if not args.no_cold and not cold:
        print("(cold runs skipped: this user cannot drop the page cache)")
    print(f"| command | warm wall s | warm CPU s |{' cold wall s | cold CPU s |' if cold else ''}")
    print(f"|---|---:|---:|{'---:|---:|' if cold else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        env["DPO_LIGHTNING_CACHE_DIR"] = f"{tmp}/cache"

        def timed_run(name: str, cmd: list[str], cold: bool) -> tuple[float, float]:
            if name in FIRST_CALLS:
                shutil.rmtree(f"{tmp}/cache", ignore_errors=True)
            return timed(cmd, env, cold=cold, cwd=source)

        for name, cmd in commands(tmp, source).items():
            timed_run(name, cmd, cold=False)  # compiles bytecode and fills the page cache
            warm = [timed_run(name, cmd, cold=False) for _ in range(args.repeats)]
            row = f"| {name} | {statistics.median(w for w, _ in warm):.2f} | {statistics.median(c for _, c in warm):.2f} |"
            if cold:
                runs = [timed_run(name, cmd, cold=True) for _ in range(args.repeats)]
                row += f" {statistics.median(w for w, _ in runs):.2f} | {statistics.median(c for _, c in runs):.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
