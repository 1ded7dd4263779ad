"""Local Ray heads for tests: a fake autoscaling cluster (Ray's ``fake_multinode`` provider) and the
process bookkeeping to stop exactly the processes a head started.

``FakeAutoscalingCluster`` writes its own provider config (``ray.cluster_utils.AutoscalingCluster``
reads an example YAML the wheel lacks and runs ``ray stop --force``, which ends every Ray on the
machine), starts ``ray start --head --block --autoscaling-config=FILE`` in its own session with
``RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1``, its own ``--temp-dir``, free ports and token
auth, and stops every process of that session (agents re-parented to pid 1 keep their session id)
plus any process whose command line names its temp dir.

Port: the fake provider starts worker nodes against ``provider.gcs_address`` and only falls back to
port 6379 when that is unset (then a head on another port leaves its nodes "launching" for minutes).
Setting it lets every cluster take a free port, so two test processes never collide on 6379 or with
a real Ray there, and no lock is needed.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Optional, Sequence

import yaml

VENV_BIN = Path(sys.executable).parent
HEAD_TYPE = "ray.head.default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_range(n: int) -> int:
    """Start of n consecutive free ports below the ephemeral range (Ray's worker ports)."""
    rng = secrets.SystemRandom()
    for _ in range(100):
        base = rng.randrange(20000, 30000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def fake_provider_config(head_resources: Mapping[str, float], worker_types: Mapping[str, dict],
                         max_workers: int, gcs_address: str, idle_timeout_minutes: float = 1.0) -> dict:
    """An autoscaler config for the fake_multinode provider: ``worker_types`` maps a name to
    {"resources": {...}, "min_workers": n, "max_workers": m}; worker nodes get a small object store."""
    types = {HEAD_TYPE: {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}}
    for name, t in worker_types.items():
        res = {"object_store_memory": 100 * 1024 ** 2, **t["resources"]}
        types[name] = {"resources": res, "node_config": {}, "min_workers": t.get("min_workers", 0),
                       "max_workers": t["max_workers"]}
    empty: dict = {}
    return {
        "cluster_name": "mmgm-fake", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_launch_config_check": True, "disable_node_updaters": True},
        "auth": {}, "docker": {}, "available_node_types": types, "head_node_type": HEAD_TYPE,
        "file_mounts": empty, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _session_of(pid: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[3])  # state, ppid, pgrp, session
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_of(session: int, marker: str) -> list[int]:
    """Live processes in ``session`` or whose command line contains ``marker`` (never this one)."""
    me = os.getpid()
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        if int(pid) != me and (_session_of(pid) == session or (marker and marker in _cmdline(pid))):
            out.append(int(pid))
    return out


def stop_processes(session: int, marker: str, grace_s: float = 15.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s``, every process of a head; returns any still alive."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for pid in processes_of(session, marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while processes_of(session, marker) and time.monotonic() < deadline:
            time.sleep(0.3)
        if not processes_of(session, marker):
            return []
    return processes_of(session, marker)


class LocalHead:
    """``ray start --head --block`` with its own temp dir, ports, token and session; ``stop`` ends
    exactly its processes. ``extra_args`` and ``extra_env`` go to ``ray start``; ``start_args``
    replaces the leading ``ray start --head`` arguments (e.g. a launcher config's own command)."""

    def __init__(self, extra_args: Sequence[str] = (), extra_env: Optional[Mapping[str, str]] = None,
                 start_args: Optional[Sequence[str]] = None, gcs_port: Optional[int] = None):
        self.dir = Path(f"/tmp/mmgm-head-{os.getpid()}-{secrets.token_hex(3)}")  # unix sockets: short paths
        self.dir.mkdir()
        self.token = secrets.token_hex(32)
        self.token_file = self.dir / "token"
        self.token_file.write_text(self.token)
        self.gcs_port = gcs_port or free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.extra_args, self.extra_env = list(extra_args), dict(extra_env or {})
        self.start_args = list(start_args) if start_args is not None else ["start", "--head"]
        self.proc: Optional[subprocess.Popen] = None

    @property
    def env(self) -> dict:
        """Environment for clients of this head (ray CLI, drivers, `mmgm`): address and token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                    "RAY_ADDRESS": self.address, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                    "OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"})
        return env

    def command(self) -> list[str]:
        wbase = free_range(100)
        ports = ["--port", str(self.gcs_port), "--dashboard-port", str(self.dashboard_port),
                 "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                 "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                 "--min-worker-port", str(wbase), "--max-worker-port", str(wbase + 99)]
        return [str(VENV_BIN / "ray"), *self.start_args, "--block", "--temp-dir", str(self.dir / "ray"),
                "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
                "--object-store-memory", str(100 * 1024 ** 2), *ports, *self.extra_args]

    def start(self, timeout_s: float = 180.0) -> "LocalHead":
        env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        env.update(self.extra_env)
        self.log = self.dir / "head.log"
        # its own session: stop() finds every process it starts, re-parented ones included
        self.proc = subprocess.Popen(self.command(), env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.dir)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                req = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                             headers={"Authorization": f"Bearer {self.token}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"head did not come up in {timeout_s} s: {self.log.read_text()[-3000:]}")
            time.sleep(1)

    def stop(self) -> None:
        if self.proc is None:
            return
        left = stop_processes(self.proc.pid, str(self.dir))
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"processes of the test head still alive: {left}")

    def __enter__(self) -> "LocalHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, entrypoint: Sequence[str], timeout_s: float = 300.0,
               working_dir: Optional[str] = None) -> subprocess.CompletedProcess:
        """``ray job submit`` to this head's dashboard with the token (waits for the job's end)."""
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard_url]
        if working_dir:
            cmd += ["--working-dir", working_dir]
        env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        return subprocess.run([*cmd, "--", *entrypoint], env=env, capture_output=True, text=True,
                              timeout=timeout_s, cwd=self.dir)

    def status(self) -> str:
        """``ray status`` of this cluster (nodes, pending demands)."""
        p = subprocess.run([str(VENV_BIN / "ray"), "status", "--address", self.address], env=self.env,
                           capture_output=True, text=True, timeout=60)
        return p.stdout + p.stderr


class FakeAutoscalingCluster(LocalHead):
    """A head with no CPUs by default and an autoscaler that adds fake worker nodes (processes on
    this machine) of ``worker_types`` on demand, up to ``max_workers`` in all."""

    def __init__(self, worker_types: Mapping[str, dict], max_workers: int,
                 head_resources: Optional[Mapping[str, float]] = None, idle_timeout_minutes: float = 1.0,
                 start_args: Optional[Sequence[str]] = None, extra_env: Optional[Mapping[str, str]] = None):
        head_resources = dict(head_resources if head_resources is not None else {"CPU": 0})
        super().__init__(start_args=start_args,
                         extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(extra_env or {})})
        self.config = fake_provider_config(head_resources, worker_types, max_workers, self.address,
                                           idle_timeout_minutes)
        self.config_file = self.dir / "autoscaling.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config))
        if not any(a.startswith("--autoscaling-config") for a in self.start_args):
            self.extra_args.append(f"--autoscaling-config={self.config_file}")
        # Flags, not RAY_OVERRIDE_RESOURCES (what the launcher exports on a real head): the monitor
        # inherits the head's environment and that variable would override the fake worker nodes too
        # (seen: a cpu2 node came up with 0 CPUs).
        custom = {k: v for k, v in head_resources.items() if k not in ("CPU", "GPU")}
        self.extra_args += [f"--num-cpus={head_resources.get('CPU', 0):g}", f"--num-gpus={head_resources.get('GPU', 0):g}"]
        if custom:
            self.extra_args.append(f"--resources={json.dumps(custom)}")
