"""The one way into Ray: every entry point (``mmgm`` subcommands, ``jobs/*.py``) calls
:func:`ensure_ray`; library functions that drive Ray (``run_ray_training``, ``run_pool``, the
pipeline's stages) call :func:`require_ray` and never start a cluster themselves.

Which cluster:

- ``address=None``: ``RAY_ADDRESS`` when set (``ray job submit`` sets it for the job's driver),
  else a NEW local cluster. A cluster started earlier with ``ray start`` is joined only when asked
  (``--address auto``), so two runs on one machine never share a cluster by accident.
- ``address="auto"``: the cluster ``ray start`` left on this machine; ``"host:port"`` or
  ``"ray://host:10001"``: that cluster.

A local cluster binds its dashboard (which hosts the job and State APIs Ray Train relies on) to
127.0.0.1; Ray 2.59+ turns token authentication on for it. Its logical CPU count defaults to the
machine's (``num_cpus`` overrides it); stages check their requests against the cluster first
(``mmgm_ray.preflight``) rather than waiting for resources that never come.
"""
from __future__ import annotations

import os
from typing import Optional

import ray

# Read by Ray Train's controller: report() otherwise waits ~2 s for each health-check poll.
TRAIN_HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Ray Train V2 re-routes worker print() through logging, so every progress line reached the driver twice.
TRAIN_PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"


def ensure_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None,
               runtime_env: Optional[dict] = None) -> dict:
    """Connect to (or start) the Ray cluster this process works on; return its total resources.

    Idempotent: with Ray already initialized (a test fixture, a notebook) nothing changes.
    ``num_cpus`` only applies to a new local cluster.
    """
    # driver-side switches Ray Train propagates to its controller and workers; set before init
    os.environ.setdefault(TRAIN_HEALTH_CHECK_ENV, "0.1")
    os.environ.setdefault(TRAIN_PRINT_PATCH_ENV, "0")
    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS") or None
        if target is not None:
            if num_cpus is not None:
                raise ValueError("--num-cpus sizes a new local cluster; it cannot apply to the cluster at "
                                 f"{target}")
            ray.init(address=target, runtime_env=runtime_env)
        else:
            ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", runtime_env=runtime_env)
    return ray.cluster_resources()


def require_ray(what: str) -> None:
    """Raise RuntimeError when Ray is not started (library functions never start it themselves)."""
    if not ray.is_initialized():
        raise RuntimeError(f"{what} needs Ray: call mmgm_ray.cluster.ensure_ray() first "
                           f"(it joins RAY_ADDRESS or starts a local cluster)")
