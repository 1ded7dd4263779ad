#!/usr/bin/env bash
# Build .gpu/site.tar.xz (git-ignored): the Python packages a GPU machine with torch + CUDA but
# without the rest of the project's dependencies needs to run tests_gpu/ (docs/GPU.md).
#   bash scripts/gpu-bundle.sh                    Ray (jars and RLlib dropped) + jsonschema's deps
#   bash scripts/gpu-bundle.sh pyarrow fsspec     ... plus these packages (what tests_gpu reports missing)
# Targets CPython $PY_VERSION (default 3.12) on manylinux x86-64. On the GPU machine:
#   mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
RAY_VERSION=${RAY_VERSION:-2.60.0}
PY_VERSION=${PY_VERSION:-3.12}
cd "$(git rev-parse --show-toplevel)"
mkdir -p .gpu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${plat[@]}" -d "$work/whl" "ray==$RAY_VERSION" jsonschema jsonschema-specifications referencing rpds-py "$@"
mkdir -p "$work/site"
for w in "$work"/whl/*.whl; do (cd "$work/site" && python3 -m zipfile -e "$w" .); done
rm -rf "$work/site/ray/jars" "$work/site/ray/rllib"   # Java workers, RLlib: unused here
tar -C "$work/site" -cJf .gpu/site.tar.xz .
ls -la .gpu/site.tar.xz
