#!/usr/bin/env bash
# Everything a GPU machine should check, in one call bounded in time (docs/GPU.md):
#   1. unpack the bundle of scripts/gpu-bundle.sh (.gpu/site.tar.xz, carried along) onto PYTHONPATH;
#   2. the GPU test suite: python -m pytest tests_gpu (test_gpu_fid last: it needs the Inception
#      weights, which a size-limited transfer may not carry) -> $OUT/tests_gpu.log, tests_gpu.xml;
#   3. the speed table: bench/gpu_check.sh -> $OUT/gpu_check.log and $OUT/gpu_check.json.
# Every step runs under its own timeout and a failing test does not stop the rest (one device call
# should bring back every result), so the whole script ends within TOTAL_S seconds (default 500).
#   OUT=/some/dir bash scripts/gpu-check-all.sh            from the repository root
# Variables: OUT (default: a new temporary folder), TOTAL_S (500), GPU_CHECK_MIN_S (the speed
# table's share, 250), PYTHON (python3 or python, whichever imports torch), PYTEST_ARGS (extra
# pytest arguments, e.g. -x), GPU_CHECK_ARGS (extra bench/gpu_check.py arguments: "--device cpu
# --quick" for a dry run on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
TOTAL_S=${TOTAL_S:-500}
GPU_CHECK_MIN_S=${GPU_CHECK_MIN_S:-250}
if [ -z "${PYTHON:-}" ]; then   # the interpreter that has torch
  for PYTHON in python3 python; do "$PYTHON" -c 'import torch' 2>/dev/null && break; done
fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
left() { echo $((start + TOTAL_S - $(date +%s))); }
say() { echo "[gpu-check-all $(date +%H:%M:%S), $(left) s left] $*" | tee -a "$OUT/summary.txt"; }

site=/tmp/mmgm-gpu-site
if [ -f .gpu/site.tar.xz ]; then
  mkdir -p "$site" && tar -xJf .gpu/site.tar.xz -C "$site" && say "bundle unpacked: $(cat "$site/BUNDLED.txt" 2>/dev/null)"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  say "no .gpu/site.tar.xz: using the image's packages only"
fi
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
{
  nvidia-smi 2>&1 | head -20
  "$PYTHON" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
  "$PYTHON" -c 'import ray, pyarrow, pytest; print("ray", ray.__version__, "pyarrow", pyarrow.__version__, "pytest", pytest.__version__)'
  command -v gcc cc || echo "no C compiler (torch.compile falls back to eager)"
} > "$OUT/env.txt" 2>&1
say "environment in env.txt: $(grep -m1 '^torch' "$OUT/env.txt")"

tests_s=$(( $(left) - GPU_CHECK_MIN_S ))
say "tests_gpu: up to ${tests_s} s"
# shellcheck disable=SC2086 # PYTEST_ARGS is a list of words
timeout --signal=INT --kill-after=15 "$tests_s" "$PYTHON" -m pytest \
  tests_gpu/test_gpu_engine.py tests_gpu/test_gpu_pool.py tests_gpu/test_gpu_train.py tests_gpu/test_gpu_fid.py \
  -q -rA --timeout 150 -p no:cacheprovider --junitxml "$OUT/tests_gpu.xml" ${PYTEST_ARGS:-} \
  2>&1 | tee "$OUT/tests_gpu.log"
rc=${PIPESTATUS[0]}
say "tests_gpu: exit status $rc ($(grep -v "^\s*$" "$OUT/tests_gpu.log" | tail -n 1))"
ray_logs() {   # the Ray processes' error logs, small ones only (an actor that died says why there)
  find /tmp/mmgm-ray-gpu-* /tmp/ray -path '*/session_2*/logs/*' -name '*.err' -size +0 -size -512k 2>/dev/null \
    | head -100 | tar -czf "$OUT/ray_logs_$1.tar.gz" -T - 2>/dev/null
}
ray_logs tests_gpu

check_s=$(( $(left) - 10 ))
say "gpu_check: up to ${check_s} s"
# shellcheck disable=SC2086 # GPU_CHECK_ARGS is a list of words
GPU_CHECK_TIMEOUT_S=$check_s PYTHON=$PYTHON bash bench/gpu_check.sh --json "$OUT/gpu_check.json" ${GPU_CHECK_ARGS:-} 2>&1 \
  | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
say "gpu_check: exit status $rc"
ray_logs gpu_check
say "done in $(( $(date +%s) - start )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
