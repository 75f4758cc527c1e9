#!/usr/bin/env bash
# Validate and benchmark gpubp on a GPU machine, keeping every raw output.
#
#   bash bench/gpu_run.sh [OUT_DIR]        (from the repository root)
#
# Writes to OUT_DIR (default bench/results/<date>-<gpu name>/):
#   environment.txt    date, nvidia-smi, driver, Python and package versions, git commit
#   tests.txt          the whole test suite, run on the GPU (not the simulator)
#   kernels_check.txt  NVRTC compile report of the CUDA C kernels (registers, shared memory, spills)
#   bench/             `gpubp bench` quick suite: table, results.json, summary.md, plots
# Runs the project from the tree (PYTHONPATH=.), so no install is needed. The git commit comes
# from `git rev-parse HEAD`, or from GPUBP_COMMIT where the tree is not a git checkout.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr '[:upper:] ' '[:lower:]-')
out=${1:-bench/results/$(date -u +%Y-%m-%d)-${gpu:-no-gpu}}
mkdir -p "$out"
commit=${GPUBP_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git commit: $commit"
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" -m gpubp info
} > "$out/environment.txt" 2>&1

status=0
"$PY" -m pytest -q -rfEs -p no:cacheprovider > "$out/tests.txt" 2>&1 || status=1
"$PY" -m gpubp.kernels check --arch sm_80,sm_90 > "$out/kernels_check.txt" 2>&1 || status=1
"$PY" -m gpubp bench --out "$out/bench" > "$out/bench.txt" 2>&1 || status=1
tail -n 3 "$out/tests.txt"
echo "raw outputs in $out (exit $status)"
exit $status
