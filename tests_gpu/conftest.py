"""The GPU test suite (docs/GPU.md): ``python -m pytest tests_gpu`` on a machine with CUDA.

Not collected by CI (pytest's testpaths is ``tests``). Without CUDA it stops at start with one
line instead of skipping anything. Every test pins its devices explicitly (``cuda`` or ``cpu``)
and runs with TF32 off and deterministic cuDNN (``mmgm_ray.hardware``), as sampling does.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
# what the project imports besides torch (the H200 image has torch only: docs/GPU.md brings the rest)
NEEDED = ("ray", "numpy", "pyarrow", "fsspec", "yaml", "PIL", "sklearn")


def pytest_configure(config):
    if not torch.cuda.is_available():
        raise pytest.UsageError("tests_gpu needs a CUDA device (torch.cuda.is_available() is False)")
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise pytest.UsageError(f"tests_gpu needs these modules, missing here: {', '.join(missing)} (docs/GPU.md)")


@pytest.fixture(autouse=True)
def ieee_float32():
    from mmgm_ray.hardware import Precision, apply_precision

    apply_precision(Precision())


@pytest.fixture(scope="session")
def ray_gpu():
    """A local Ray instance with the machine's GPU (actors reserve fractions of it)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             _temp_dir=f"/tmp/mmgm-ray-gpu-{os.getpid()}",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
    try:
        yield ray
    finally:
        ray.shutdown()
