"""Throughput of the training loop: plain process vs Ray Train (1 and 2 workers), same model and batch.

    /work/venv/bin/python bench/train.py [--steps 300] [--config digits] [--set k=v ...]

Steady-state images/s is measured from metrics.jsonl timestamps after a warm-up (the first
``--warmup`` steps: allocator, DDP buckets, first report), so Ray's fixed start-up (~8 s per fit)
is excluded but its per-checkpoint ``report`` cost is included. Every mode uses one intra-op
thread per process (Ray gives each 1-CPU worker OMP_NUM_THREADS=1), so plain vs 1 worker compares
like with like; 2 workers is the total over both. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def steady_rate(records: list[dict], warmup: int, batch: int, world: int) -> float:
    """Images/s between the first record at step >= warmup and the last record."""
    recs = [r for r in records if r["step"] >= warmup]
    a, b = recs[0], recs[-1]
    return (b["step"] - a["step"]) * batch * world / (b["time"] - a["time"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="digits")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    import torch
    import ray

    from mmgm_ray.config import load_config
    from mmgm_ray.train.loop import read_metrics, train_local
    from mmgm_ray.train.ray_train import run_ray_training

    out = tempfile.mkdtemp(prefix="mmgm-bench-")
    base = [f"train.steps={args.steps}", "train.log_every=20", "train.checkpoint_every=100",
            "train.preview.chains=0", "train.ema_eval_batch=0", f"output={out}"] + args.overrides
    figures = {}

    torch.set_num_threads(1)
    cfg = load_config(args.config, base + ["name=plain"])
    t = time.perf_counter()
    train_local(cfg, resume=False, progress=False)
    figures["plain"] = steady_rate(read_metrics(f"{out}/plain"), args.warmup, cfg.train.batch_size, 1)
    print(f"plain process: {figures['plain']:.0f} images/s ({time.perf_counter() - t:.1f} s wall)", flush=True)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "OMP_NUM_THREADS": "1"}})
    for nw in (1, 2):
        cfg = load_config(args.config, base + [f"name=ray{nw}", f"train.resources.num_workers={nw}"])
        t = time.perf_counter()
        run_ray_training(cfg, progress=False)
        wall = time.perf_counter() - t
        figures[f"ray_{nw}_worker"] = steady_rate(read_metrics(f"{out}/ray{nw}"), args.warmup, cfg.train.batch_size, nw)
        figures[f"ray_{nw}_worker_wall_s"] = round(wall, 1)
        print(f"Ray Train, {nw} worker(s): {figures[f'ray_{nw}_worker']:.0f} images/s ({wall:.1f} s wall)", flush=True)
    ray.shutdown()
    overhead = figures["plain"] / figures["ray_1_worker"] - 1.0
    print(f"Ray Train overhead at steady state (1 worker vs plain): {100 * overhead:+.1f}%; "
          f"2-worker scaling: {figures['ray_2_worker'] / figures['ray_1_worker']:.2f}x "
          f"on {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f})", flush=True)
    result = {"config": args.config, "steps": args.steps, "warmup": args.warmup,
              "batch_per_worker": cfg.train.batch_size,
              "images_per_s": {k: round(v, 1) for k, v in figures.items() if not k.endswith("wall_s")},
              "ray_wall_s": {k: v for k, v in figures.items() if k.endswith("wall_s")},
              "overhead_ray1_vs_plain": round(overhead, 4), "cpu_count": os.cpu_count(),
              "load_average_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
