#!/usr/bin/env bash
# Build .gpu/site.tar.xz (git-ignored): the Python packages a GPU machine with torch + CUDA but
# without the rest of the project's dependencies needs to run tests_gpu/ and bench/gpu_check.sh
# (docs/GPU.md; scripts/gpu-check-all.sh unpacks it there).
#   bash scripts/gpu-bundle.sh                 Ray with its Train extra, tqdm, pytest + pytest-timeout
#   bash scripts/gpu-bundle.sh arviz           ... plus these packages
# Dependencies are resolved by pip for the target (CPython $PY_VERSION, default 3.12, manylinux
# x86-64), then the packages the GPU image already has (IMAGE_HAS: torch and its dependencies,
# numpy, pyarrow, fsspec, scipy, scikit-learn, pillow, pyyaml, matplotlib, jinja2) are dropped, so
# the image's own builds stay in use. Ray's jars, RLlib and dashboard client are dropped (unused).
# On the GPU machine:
#   mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
RAY_VERSION=${RAY_VERSION:-2.60.0}
PY_VERSION=${PY_VERSION:-3.12}
IMAGE_HAS=${IMAGE_HAS:-"torch triton nvidia-* cuda-* filelock typing-extensions sympy mpmath networkx jinja2 markupsafe
  setuptools numpy pyarrow fsspec scipy scikit-learn joblib threadpoolctl pillow pyyaml matplotlib contourpy cycler
  fonttools kiwisolver pyparsing python-dateutil six"}
cd "$(git rev-parse --show-toplevel)"
mkdir -p .gpu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${plat[@]}" -d "$work/whl" "ray[train]==$RAY_VERSION" tqdm pytest pytest-timeout "$@"
for name in $IMAGE_HAS; do
  # wheel names spell a project with underscores, in any case
  find "$work/whl" -maxdepth 1 -iname "${name//-/_}-*.whl" -delete
done
mkdir -p "$work/site"
# unpacked keeping each file's mode: Ray's gcs_server and raylet must stay executable
# (python -m zipfile -e drops the bits, and Ray then fails to start with "Permission denied")
python3 - "$work/site" "$work"/whl/*.whl <<'PY'
import os, sys, zipfile
site = sys.argv[1]
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = z.extract(info, site)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(path, mode)
PY
test -x "$work/site/ray/core/src/ray/gcs/gcs_server" || { echo "gcs_server lost its mode" >&2; exit 1; }
rm -rf "$work/site/ray/jars" "$work/site/ray/rllib" "$work/site/ray/dashboard/client"
ls "$work/whl" | sed 's/-[0-9].*//' | tr '\n' ' ' > "$work/site/BUNDLED.txt"
tar -C "$work/site" -cJf .gpu/site.tar.xz .
echo "bundled: $(cat "$work/site/BUNDLED.txt")"
ls -la .gpu/site.tar.xz
