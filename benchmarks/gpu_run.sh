#!/usr/bin/env bash
# The one script a session with a lent H200 runs (issue 22): from the repository root on the device
# machine, with the py3.12 wheels the machine lacks carried in .whl/ (see benchmarks/README.md,
# "On a GPU"). Under 8 minutes: wheels ~20 s, then gpu_throughput.py with a 400 s deadline for its
# runs (no run outlives it by more than its own start) and a hard stop at 450 s.
# Output: everything printed also goes to $OUT/bench.log; one JSON line per run in $OUT/gpu.jsonl;
# the runs' own output in $OUT/children.log. Extra arguments go to gpu_throughput.py (e.g. --runs).
set -o pipefail
OUT=${OUT:-/tmp/gpu-bench-out}
mkdir -p "$OUT"
{
  echo "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
  else
    echo "# no .whl/: TRL runs will fail unless trl, datasets and liger-kernel are installed"
    export PYTHONPATH=$PWD
  fi
  PYTHONUNBUFFERED=1 timeout -s KILL 450 python3 benchmarks/gpu_throughput.py --out "$OUT" --deadline 400 "$@"
} 2>&1 | tee "$OUT/bench.log"
