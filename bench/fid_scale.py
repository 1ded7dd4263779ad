"""Benchmark: FID features and generation at scale (mmgm_ray.postprocess) against the in-process paths.

    .venv/bin/python bench/fid_scale.py [--fid-n 32] [--gen-n 2000,8000,32000] [--chains 1000] [--cpus 2]

1. Inception throughput (images/s) on a store of 28x28 images: the in-process path (``--local``:
   one process, torch's intra-op threads on every core) against the Ray Data path (one CPU actor
   of ``--cpus`` CPUs, same batch size; first call includes Ray Data's start-up, second is warm).
2. Driver peak RSS of ``mmgm generate``'s read-back with N: the previous in-process selection
   (``read_samples`` of every kept row, then ``write_parquet_dataset``) against the Ray Data writer,
   each in a fresh child process (``ru_maxrss`` of the driver; Ray's workers are other processes),
   minus a child that imports the same modules (and starts Ray, for the new path) and does no work.

Prints one line per measurement and, last, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = (1, 28, 28)
JUMP_EVERY = 2


def make_store(root: str, chains: int, jumps: int, block_size: int = 250) -> str:
    """A finished run of ``chains`` x ``jumps`` uint8 28x28 images (no divergences)."""
    from mmgm_ray.jumps import JumpBatch
    from mmgm_ray.store import create_run, update_manifest

    rng = np.random.default_rng(0)
    config = {"sampler": {"jump_every": JUMP_EVERY}, "pool": {"num_chains": chains}}
    store = create_run(root, "bench", event_shape=SHAPE, sample_dtype="uint8", config=config)
    entries = {}
    for b, lo in enumerate(range(0, chains, block_size)):
        ids = torch.arange(lo, min(chains, lo + block_size))
        w = store.writer(b)
        for j in range(jumps):
            x = torch.from_numpy(rng.uniform(0, 1, (len(ids), *SHAPE)).astype(np.float32))
            w.add(JumpBatch(chain_id=ids, block_id=torch.full_like(ids, b), step=torch.full_like(ids, JUMP_EVERY * (j + 1)),
                            jump_index=torch.full_like(ids, j), xhat=x, score_norm=torch.ones(len(ids)),
                            kinetic=torch.ones(len(ids))))
        w.flush()
        entries[b] = w.manifest_entry("done")
    update_manifest(store, blocks=entries)
    return store.url


def inception_rates(url: str, n: int, cpus: int) -> dict:
    import ray

    from mmgm_ray.postprocess.fid import FeatureSettings, run_feature_stats, select_run

    out = {}
    local = FeatureSettings(local=True, batch_size=16, progress=False)
    t = time.perf_counter()
    _, _, images = run_feature_stats(select_run(url, n, select="spread", local=True), local)
    out["local_img_s"] = images / (time.perf_counter() - t)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    on_ray = FeatureSettings(batch_size=16, actors=1, cpus_per_actor=cpus, progress=False)
    for key in ("ray_cold_img_s", "ray_warm_img_s"):
        t = time.perf_counter()
        _, _, images = run_feature_stats(select_run(url, n, select="spread"), on_ray)
        out[key] = images / (time.perf_counter() - t)
    ray.shutdown()
    out["ratio_warm_ray_over_local"] = out["ray_warm_img_s"] / out["local_img_s"]
    for k, v in out.items():
        print(f"inception {k}: {v:.2f}", flush=True)
    return out


def child(mode: str, url: str, n: int, out: str, cpus: int) -> None:
    """One generate read-back in this (fresh) process; prints {seconds, maxrss_mb}."""
    import ray

    from mmgm_ray.data import ImageDataset, write_parquet_dataset
    from mmgm_ray.postprocess.generate import write_generated
    from mmgm_ray.store import read_samples

    t = time.perf_counter()
    if mode == "old":
        x, meta = read_samples(url, min_step=1)
        idx = np.lexsort((meta.column("chain_id").to_numpy(), meta.column("step").to_numpy()))[:n]
        write_parquet_dataset(ImageDataset("g", torch.from_numpy(np.clip(x[idx], 0, 1)), None, SHAPE, url), out, "uint8")
    elif mode == "new":
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        write_generated(url, out, n, 0, 1, JUMP_EVERY, sample_dtype="uint8")
    elif mode == "rest-new":  # baselines: the same imports (and Ray started), no work
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def run_child(mode: str, url: str, n: int, out: str, cpus: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", mode, "--store", url, "--n", str(n), "--out", out,
                        "--cpus", str(cpus)], capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fid-n", type=int, default=32)
    p.add_argument("--gen-n", default="2000,8000,32000")
    p.add_argument("--chains", type=int, default=1000)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.store, a.n, a.out, a.cpus)
        return 0
    ns = [int(s) for s in a.gen_n.split(",")]
    root = tempfile.mkdtemp(prefix="mmgm-bench-post-")
    url = make_store(root, a.chains, max(2, -(-max(ns) // a.chains)))
    res = {"bench": "postprocess", "cpus": os.cpu_count(), "store": {"chains": a.chains, "shape": list(SHAPE)},
           "inception": inception_rates(url, a.fid_n, a.cpus), "generate": []}
    rest = {mode: run_child(f"rest-{mode}", url, 0, "", a.cpus)["maxrss_mb"] for mode in ("old", "new")}
    for n in ns:
        row = {"n": n}
        for mode in ("old", "new"):
            r = run_child(mode, url, n, os.path.join(root, f"out-{mode}-{n}"), a.cpus)
            row[f"{mode}_seconds"], row[f"{mode}_driver_mb"] = r["seconds"], r["maxrss_mb"] - rest[mode]
        print(f"generate n={n}: driver peak RSS above rest: old {row['old_driver_mb']:.0f} MB, "
              f"new (Ray Data) {row['new_driver_mb']:.0f} MB", flush=True)
        res["generate"].append(row)
    res["driver_at_rest_mb"] = rest
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
