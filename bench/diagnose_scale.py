"""Benchmark: ``mmgm diagnose`` in one process against the Ray path, at two store sizes.

    .venv/bin/python bench/diagnose_scale.py [--chains 10000] [--jumps 10] [--cpus 2] [--dir DIR]

Synthetic stores of ``--chains`` chains x J and 4J jumps of 784-d uint8 samples (28x28, written
through the store's own BlockWriter, 10,000 rows per part): each chain is an AR(1) process
(rho 0.9) in 8 latent directions plus pixel noise, so the diagnostics have something to measure.

For each size, a fresh subprocess runs a full diagnosis from an empty functionals table:

* ``local``: everything in the process (the pass, the layout, the reductions);
* ``ray``: a new local Ray cluster of ``--cpus`` CPUs (its start-up timed apart), the same
  diagnosis on it.

Measured: wall time of the diagnosis and its CPU seconds (this process, plus every process of the
Ray cluster it started: what other load on a shared machine cannot inflate), the driver's peak
RSS (``ru_maxrss``; also its RSS after the imports, so the part that could grow with the store is
visible) and, on Ray, the peak RSS of the busiest Ray worker process (sampled every 0.1 s with
psutil). The Ray path runs twice on its cluster: cold (fresh worker processes import torch and
the package) and warm (a rebuild on the same cluster). Targets: driver peak RSS at 4J within
1.2x of that at J; Ray wall time within 1.3x of the in-process one. ``--dir`` keeps the stores
for the next run.

Scaling: the 4J store diagnosed on a ``ray.cluster_utils.Cluster`` of 1 node and of 3 nodes (one
CPU each). On a 2-core machine three nodes cannot run three times faster: the figure shows that
the work spreads over the nodes, not what a real cluster gains. Wall times on a shared machine
swing with other load (the load average is printed); the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE = (1, 28, 28)
BLOCK = 1000
LATENT = 8


def existing_store(root: str, name: str, rows: int):
    """The URL of a finished store of ``rows`` rows left by an earlier run with the same --dir."""
    from mmgm_ray.store import load_manifest
    url = os.path.join(root, name)
    man = load_manifest(url) if os.path.exists(os.path.join(url, "manifest.json")) else None
    return url if man is not None and man["progress"].get("rows") == rows else None


def write_store(root: str, name: str, chains: int, jumps: int, seed: int = 0) -> str:
    """A finished run of ``chains`` x ``jumps`` uint8 28x28 samples, written block by block."""
    import numpy as np
    import torch

    from mmgm_ray.config import StoreConfig
    from mmgm_ray.jumps import JumpBatch
    from mmgm_ray.store import create_run, update_manifest

    store = create_run(root, name, event_shape=SHAPE, store_config=StoreConfig(sample_dtype="uint8",
                                                                              rows_per_file=10_000))
    rng = np.random.default_rng(seed)
    d = int(np.prod(SHAPE))
    basis = rng.standard_normal((LATENT, d)).astype(np.float32) / np.sqrt(LATENT)
    for b in range(0, (chains + BLOCK - 1) // BLOCK):
        ids = np.arange(b * BLOCK, min(chains, (b + 1) * BLOCK))
        w = store.writer(b)
        z = rng.standard_normal((ids.size, LATENT)).astype(np.float32)
        for j in range(jumps):
            z = 0.9 * z + np.sqrt(1 - 0.81) * rng.standard_normal(z.shape).astype(np.float32)
            x = np.clip(0.5 + 0.15 * z @ basis + 0.05 * rng.standard_normal((ids.size, d)).astype(np.float32), 0, 1)
            n = ids.size
            w.add(JumpBatch(torch.as_tensor(ids), torch.full((n,), b), torch.full((n,), 10 * (j + 1)),
                            torch.full((n,), j), torch.from_numpy(x).reshape(n, *SHAPE),
                            torch.from_numpy(np.abs(z[:, 0])), torch.from_numpy(z[:, 1] ** 2)))
        w.flush()
        update_manifest(store, blocks={b: w.manifest_entry("done")})
    return store.url


class ProcMonitor:
    """This process's descendants (the Ray cluster it started), sampled every ``every`` s in a
    thread: the peak RSS of a Ray worker process (``ray::...``) and the CPU seconds of every
    descendant (last sample per process; a process that exits loses at most one interval)."""

    def __init__(self, every: float = 0.1):
        import psutil  # Ray's own copy (ray/thirdparty_files, on sys.path once ray is imported)
        self.psutil, self.every, self.peak = psutil, every, 0
        self.cpu: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, me) -> None:
        for p in me.children(recursive=True):
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                    if p.name().startswith("ray::"):
                        self.peak = max(self.peak, p.memory_info().rss)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass

    def _run(self):
        me = self.psutil.Process()
        while not self._stop.is_set():
            self._sample(me)
            self._stop.wait(self.every)
        self._sample(me)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return float(sum(self.cpu.values()))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def role(args) -> dict:
    """One measurement in this (fresh) process."""
    import ray

    from mmgm_ray.cluster import ensure_ray
    from mmgm_ray.postprocess import diagnose, open_committed, run_request

    shutil.rmtree(os.path.join(args.run, "functionals"), ignore_errors=True)
    request = run_request(open_committed(args.run))
    out = {"role": args.role, "rss_after_imports": _rss_now()}
    cluster = None
    t = time.perf_counter()
    if args.role == "ray":
        ensure_ray(num_cpus=args.cpus)
    elif args.role == "cluster":
        from ray.cluster_utils import Cluster
        node = {"num_cpus": 1, "object_store_memory": 300 << 20}
        cluster = Cluster(initialize_head=True, head_node_args=node)
        for _ in range(args.nodes - 1):
            cluster.add_node(**node)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
    out["start_s"] = time.perf_counter() - t
    executor = "local" if args.role == "local" else "ray"
    with ProcMonitor() as mon:
        cpu0, cpu_ray0 = time.process_time(), mon.cpu_s
        t = time.perf_counter()
        rep = diagnose(args.run, request, executor=executor, progress=False)
        out["wall_s"] = time.perf_counter() - t
        out["cpu_s"] = time.process_time() - cpu0 + mon.cpu_s - cpu_ray0   # this process + the cluster's
        if executor == "ray":  # again on the same cluster: its workers have imported everything
            cpu0, cpu_ray0 = time.process_time(), mon.cpu_s
            t = time.perf_counter()
            diagnose(args.run, request, executor=executor, rebuild=True, progress=False)
            out["warm_s"] = time.perf_counter() - t
            time.sleep(0.3)  # one more sample of the workers' CPU
            out["warm_cpu_s"] = time.process_time() - cpu0 + mon.cpu_s - cpu_ray0
    out.update(worker_peak_rss=mon.peak if executor == "ray" else None,
               driver_peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               rows=rep["functionals"]["rows"], max_rhat=rep["max_rhat"], nodes=args.nodes)
    if executor == "ray":
        ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    return out


def run_role(run: str, name: str, cpus: int, nodes: int = 1) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--role", name, "--run", run, "--cpus", str(cpus),
           "--nodes", str(nodes)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{name} on {run} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _mb(v):
    return None if v is None else round(v / 2 ** 20, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=10_000)
    ap.add_argument("--jumps", type=int, default=10, help="J (the second store has 4J)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a temporary folder)")
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        print(json.dumps(role(args)))
        return 0
    root = args.dir or tempfile.mkdtemp(prefix="mmgm-bench-post-")
    load0 = os.getloadavg()
    res = {"chains": args.chains, "jumps": [args.jumps, 4 * args.jumps], "cpus": args.cpus,
           "cores": os.cpu_count(), "runs": {}}
    runs = {}
    for j in (args.jumps, 4 * args.jumps):
        t = time.perf_counter()
        name = f"store-{j}"
        runs[j] = existing_store(root, name, args.chains * j) or write_store(root, name, args.chains, j)
        print(f"store {args.chains} x {j}: ready in {time.perf_counter() - t:.1f} s", flush=True)
        for name in ("local", "ray"):
            m = run_role(runs[j], name, args.cpus)
            res["runs"][f"{name}-{j}"] = m
            warm = f", warm cluster {m['warm_s']:.1f} s ({m['warm_cpu_s']:.1f} CPU s)" if "warm_s" in m else ""
            print(f"{name:5s} J={j:4d}: {m['wall_s']:.1f} s ({m['cpu_s']:.1f} CPU s){warm} (start {m['start_s']:.1f} s), "
                  f"driver peak "
                  f"{_mb(m['driver_peak_rss'])} MB (after imports {_mb(m['rss_after_imports'])} MB), worker peak "
                  f"{_mb(m['worker_peak_rss'])} MB", flush=True)
    big = runs[4 * args.jumps]
    for nodes in (1, 3):
        m = run_role(big, "cluster", args.cpus, nodes)
        res["runs"][f"cluster-{nodes}"] = m
        print(f"cluster of {nodes} node(s) x 1 CPU, J={4 * args.jumps}: {m['wall_s']:.1f} s, warm "
              f"{m['warm_s']:.1f} s", flush=True)
    r = res["runs"]
    j1, j4 = args.jumps, 4 * args.jumps
    res["driver_rss_ratio_4J_over_J"] = {k: r[f"{k}-{j4}"]["driver_peak_rss"] / r[f"{k}-{j1}"]["driver_peak_rss"]
                                         for k in ("local", "ray")}
    res["ray_over_local_wall"] = {str(j): r[f"ray-{j}"]["wall_s"] / r[f"local-{j}"]["wall_s"] for j in (j1, j4)}
    res["ray_warm_over_local_wall"] = {str(j): r[f"ray-{j}"]["warm_s"] / r[f"local-{j}"]["wall_s"] for j in (j1, j4)}
    res["ray_cpu_over_local_cpu"] = {str(j): r[f"ray-{j}"]["warm_cpu_s"] / r[f"local-{j}"]["cpu_s"] for j in (j1, j4)}
    res["speedup_3_nodes"] = r["cluster-1"]["wall_s"] / r["cluster-3"]["wall_s"]
    res["speedup_3_nodes_warm"] = r["cluster-1"]["warm_s"] / r["cluster-3"]["warm_s"]
    res["load_avg"] = [load0, os.getloadavg()]
    res["targets"] = {"driver_rss_within_1.2x": all(v <= 1.2 for v in res["driver_rss_ratio_4J_over_J"].values()),
                      "ray_within_1.3x_of_local": all(v <= 1.3 for v in res["ray_over_local_wall"].values())}
    res["caveat"] = "3 nodes on a 2-core machine cannot truly scale; the speedup only shows the work spreads"
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
