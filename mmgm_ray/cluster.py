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

Ending: :func:`shutdown_ray` undoes what :func:`ensure_ray` did, with Ctrl-C ignored meanwhile: it
disconnects from a joined cluster (so that none of Ray's background threads prints after the
command's result), and takes down a local cluster it started, then ends, by process id, any process
of that cluster's session still running (a Ctrl-C in the middle of ``ray.shutdown`` used to leave
Ray's agents behind). A Ray that was initialized before (a test fixture, a notebook) is left alone.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import ray

# Read by Ray Train's controller: report() otherwise waits ~2 s for each health-check poll.
TRAIN_HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Ray Train V2 re-routes worker print() through logging, so every progress line reached the driver twice.
TRAIN_PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"


_started: dict = {}  # what ensure_ray did in this process: {"session_dir": local cluster's | None (joined)}


def ensure_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None,
               runtime_env: Optional[dict] = None, log_to_driver: bool = True) -> dict:
    """Connect to (or start) the Ray cluster this process works on; return its total resources.

    Idempotent: with Ray already initialized (a test fixture, a notebook) nothing changes.
    ``num_cpus`` only applies to a new local cluster. ``log_to_driver=False`` leaves the workers'
    output and Ray's per-task error reports in the session logs (the chain pool reports its actors'
    failures itself, in one line) instead of copying them to this process's stderr.
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
            ray.init(address=target, runtime_env=runtime_env, log_to_driver=log_to_driver)
            _started["session_dir"] = None
        else:
            ctx = ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", runtime_env=runtime_env,
                           log_to_driver=log_to_driver)
            _started["session_dir"] = ctx.address_info.get("session_dir")
    return ray.cluster_resources()


def shutdown_ray(grace_s: float = 5.0) -> None:
    """Undo :func:`ensure_ray` (a no-op when it found Ray initialized), ignoring Ctrl-C meanwhile:
    disconnect from a joined cluster; shut down a local one it started and end every process of that
    session still running (SIGTERM, SIGKILL after ``grace_s``), found by its session folder."""
    if "session_dir" not in _started:
        return
    session = _started.pop("session_dir")
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        ray.shutdown()
        if session is not None:
            _end_session_processes(session, grace_s)
    finally:
        if main:
            signal.signal(signal.SIGINT, old)


def session_processes(session_dir: str) -> list[int]:
    """Ids of the running processes whose command line names ``session_dir`` (this process excluded)."""
    me, out = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(pid) != me and session_dir.encode() in cmd:
            out.append(int(pid))
    return out


def _end_session_processes(session_dir: str, grace_s: float) -> None:
    if not session_dir or not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + grace_s
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = session_processes(session_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = session_processes(session_dir)
        if not pids:
            return


def require_ray(what: str) -> None:
    """Raise RuntimeError when Ray is not started (library functions never start it themselves)."""
    if not ray.is_initialized():
        raise RuntimeError(f"{what} needs Ray: call mmgm_ray.cluster.ensure_ray() first "
                           f"(it joins RAY_ADDRESS or starts a local cluster)")
