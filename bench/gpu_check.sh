#!/usr/bin/env bash
# The sampler's speed on one device in one table (bench/gpu_check.py), within 6 minutes.
#
# On a GPU image with torch but without Ray, from the repository root, with the bundle of
# scripts/gpu-bundle.sh carried in .gpu/ (docs/GPU.md, "The speed table"):
#   mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PYTHONPATH
#   bash bench/gpu_check.sh
# Without Ray the pool row says "skipped" and the other rows are measured.
# CPU smoke run of the whole table (tests/test_bench.py runs it):
#   bash bench/gpu_check.sh --device cpu --quick
# GPU_CHECK_TIMEOUT_S (default 360) bounds the run; PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-360}" "$PYTHON" bench/gpu_check.py "$@"
