"""Shared fixtures. One Ray instance per test session (starting Ray costs seconds)."""
from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def classifier_cache(tmp_path_factory):
    """Classifiers trained for diagnostics (mmgm_ray.diagnostics.classifier) are cached per test
    session, not in ~/.cache/mmgm-ray."""
    os.environ.setdefault("MMGM_CACHE", str(tmp_path_factory.mktemp("mmgm-cache")))
    yield os.environ["MMGM_CACHE"]


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray instance shared by the tests that need one (marked ``ray``).

    4 logical CPUs on the 2-core machine give Ray Train and the chain pool room;
    the Train health-check interval is shortened so ``report`` does not wait 2 s each time.
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    import ray

    if ray.is_initialized():
        yield ray
        return
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    # Ray session files go to a short private folder (unix socket paths have a length limit).
    temp = pathlib.Path("/tmp") / f"mmgm-ray-{os.getpid()}"
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(temp), log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath,
                                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
                                       "OMP_NUM_THREADS": "1"}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def one_thread():
    """Single-threaded torch for a test (OpenMP threads contending on a shared 2-core box are 5x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
