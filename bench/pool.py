"""Benchmark: chain-steps/s of the Ray chain pool (2 actors, store on) against the bare engine.

    python bench/pool.py [--chains 10240] [--steps 6000] [--actors 2] [--min-interval-s 10]

Fair comparison on a machine with C cores: the pool gets ``--actors`` actors of 1 CPU each (one
torch thread each); the bare engine runs the SAME chains in one process with the SAME total number
of torch threads (``--actors``). Also reported: the bare engine on one actor's blocks with one
thread (per-core rate; x actors = perfect linear scaling), and the pool with the store off (Ray
overhead alone). Pool rates are steady-state wall rates (from the first returned chunk to the end,
i.e. without actor start-up); start-up is in the end-to-end wall time. Because wall rates on a
shared 2-core machine swing with other load, the CPU cost is also reported: CPU seconds per 1e6
chain-steps (``time.process_time``: the bare engine process vs. the actor processes, whose count
includes the writer thread and Ray's own threads), which other processes cannot inflate.
The actors commit as a run does by default (``pool.checkpoint_min_interval_s``: at most every 10 s of
walking); ``--min-interval-s 0`` commits at every ``--checkpoint-every`` boundary, the cost a cheap
score used to pay. Neither side warms up: both count their first steps.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_cfg(out: str, name: str, chains: int, steps: int, actors: int, dim: int = 2, checkpoint_every: int = 100,
             min_interval_s: float = 2.0):
    from mmgm_ray.config import RunConfig, from_dict
    return from_dict(RunConfig, {
        "name": name, "output": out, "seed": 0, "noise": {"sigma": 1.0, "M": 4},
        "oracle": {"kind": "gmm"}, "data": {"name": "gmm", "gmm_dim": dim},
        "sampler": {"block_size": 256, "jump_every": 10},
        "store": {"sample_dtype": "float32"},
        "pool": {"num_chains": chains, "num_steps": steps, "num_actors": actors, "cpus_per_actor": 1.0,
                 "checkpoint_every": checkpoint_every, "checkpoint_min_interval_s": min_interval_s}})


def bare_rate(cfg, blocks, threads: int, steps: int) -> tuple[float, float]:
    """(chain-steps/s, CPU seconds per million chain-steps) of one WalkJumpEngine (nothing written)."""
    import torch

    from mmgm_ray.engine import WalkJumpEngine
    from mmgm_ray.factory import load_sampling_model

    torch.set_num_threads(threads)
    model, shape, _ = load_sampling_model(cfg, "cpu")
    eng = WalkJumpEngine(model, cfg.sampler, shape, cfg.seed, blocks)
    eng.initialize()
    # no warm-up: the actors' CPU seconds count their first steps too
    t, c = time.perf_counter(), time.process_time()
    for jb in eng.run(steps):
        jb.xhat.cpu()
    n = eng.n_chains * steps
    return n / (time.perf_counter() - t), 1e6 * (time.process_time() - c) / n


def pool_run(out: str, label: str, args, skip_store: bool) -> dict:
    """One pool run (its own run folder): steady wall rate, CPU s per 1e6 chain-steps, and its summary."""
    from mmgm_ray import faults
    from mmgm_ray.pool import run_pool

    c = make_cfg(out, label, args.chains, args.steps, args.actors, args.dim, args.checkpoint_every,
                 args.min_interval_s)
    # the baseline's actors run their chains and discard the jumps (mmgm_ray.faults); the
    # measured run has no fault plan at all, as in production
    os.environ.pop(faults.ENV, None)
    if skip_store:
        os.environ[faults.ENV] = json.dumps({"actor_skip_store": True})
    t = time.perf_counter()
    s = run_pool(c, progress=False)
    wall = time.perf_counter() - t
    os.environ.pop(faults.ENV, None)
    print(f"{label}: steady {s['chain_steps_per_s']:,.0f} chain-steps/s, end-to-end {wall:.1f}s "
          f"(incl. actor start-up), writer back-pressure {s['queue_wait_s']:.2f}s")
    return {"wall_s": wall, "steady_rate": s["chain_steps_per_s"], "queue_wait_s": s["queue_wait_s"],
            "rows": s["rows"], "cpu_per_M": 1e6 * s["cpu_s"] / max(s["chain_steps_actors"], 1), "url": s["url"]}


def main() -> int:
    from mmgm_ray.config import PoolConfig  # here: ROOT is on sys.path only once the module runs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=10240)
    ap.add_argument("--steps", type=int, default=6000, help="~20 s per actor: a few commits at the default interval")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--dim", type=int, default=2, help="GMM dimension (bigger = costlier score per step)")
    ap.add_argument("--checkpoint-every", type=int, default=100,
                    help="walk steps between block checkpoints: the store's cost is ~fixed per (block, checkpoint)")
    ap.add_argument("--min-interval-s", type=float, default=PoolConfig().checkpoint_min_interval_s,
                    help="pool.checkpoint_min_interval_s (0: commit at every --checkpoint-every boundary)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds of (bare, pool without store, pool with store); figures are medians")
    args = ap.parse_args()

    import ray

    from mmgm_ray.engine import chain_blocks
    from mmgm_ray.pool.driver import run_bytes, split_layout
    from mmgm_ray.store import load_manifest

    out = tempfile.mkdtemp(prefix="mmgm-bench-pool-")
    cfg = make_cfg(out, "bench", args.chains, args.steps, args.actors, args.dim, args.checkpoint_every,
                   args.min_interval_s)
    blocks = chain_blocks(args.chains, cfg.sampler.block_size)
    layout = split_layout(len(blocks), args.actors)

    # a wall rate only (several threads): a short run is enough, and a long one crawls on a busy machine
    bare_all, _ = bare_rate(cfg, blocks, args.actors, min(args.steps, 1000))
    print(f"bare engine, 1 process, {args.actors} threads, {args.chains} chains: {bare_all:,.0f} chain-steps/s")
    ray.init(num_cpus=max(2, args.actors), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}})
    try:
        # interleaved rounds, each pool pair bracketed by bare runs: a load change shows as a spread
        bare = [bare_rate(cfg, layout[0], 1, args.steps)]
        rounds = []
        for r in range(args.repeats):
            rounds.append({"nostore": pool_run(out, f"nostore{r}", args, True),
                           "store": pool_run(out, f"store{r}", args, False)})
            bare.append(bare_rate(cfg, layout[0], 1, args.steps))
            print(f"bare engine, 1 thread, {len(layout[0]) * 256} chains (one actor's blocks): "
                  f"{bare[-1][0]:,.0f} chain-steps/s, {bare[-1][1]:.3f} CPU s per 1e6 chain-steps")
        last = rounds[-1]["store"]
        nbytes = run_bytes(last["url"])
        # a block's parts: one per commit, plus one per 65,536 rows (store.rows_per_file)
        parts = len(load_manifest(last["url"])["blocks"]["0"]["files"])
    finally:
        ray.shutdown()
    report(args, bare_all, bare, rounds, nbytes, parts)
    return 0


def report(args, bare_all: float, bare: list, rounds: list, nbytes: int, parts: int) -> None:
    med = statistics.median
    bare_cpu = [(a[1] + b[1]) / 2 for a, b in zip(bare[:-1], bare[1:])]   # the bracket of each round
    spread = [abs(a[1] - b[1]) / min(a[1], b[1]) for a, b in zip(bare[:-1], bare[1:])]
    cpu = {k: [r[k]["cpu_per_M"] for r in rounds] for k in ("nostore", "store")}
    rate = {k: med([r[k]["steady_rate"] for r in rounds]) for k in ("nostore", "store")}
    bare_one = med([b[0] for b in bare])
    ratio = [b / s for b, s in zip(bare_cpu, cpu["store"])]
    result = {
        "chains": args.chains, "steps": args.steps, "actors": args.actors, "dim": args.dim, "repeats": args.repeats,
        "checkpoint_every": args.checkpoint_every, "min_interval_s": args.min_interval_s, "parts_per_block": parts,
        "bare_same_threads": bare_all, "bare_1thread_x_actors": bare_one * args.actors,
        "pool_store": rate["store"], "pool_nostore": rate["nostore"],
        "ratio_pool_vs_bare_same_threads": rate["store"] / bare_all,
        "ratio_pool_vs_linear": rate["store"] / (bare_one * args.actors),
        "ratio_store_vs_nostore": rate["store"] / rate["nostore"],
        "cpu_s_per_M_chain_steps": {"bare_1thread": med(bare_cpu), "pool_nostore": med(cpu["nostore"]),
                                    "pool_store": med(cpu["store"])},
        "cpu_ratio_bare_vs_pool_store": med(ratio), "cpu_ratio_per_round": ratio,
        "cpu_ratio_bare_vs_pool_nostore": med([b / s for b, s in zip(bare_cpu, cpu["nostore"])]),
        "bare_cpu_spread": max(spread),
        "bytes_written": nbytes, "bytes_per_s": nbytes / (args.chains * args.steps / rate["store"]),
        "rows": rounds[-1]["store"]["rows"], "queue_wait_s": rounds[-1]["store"]["queue_wait_s"],
    }
    print(f"{parts} parts per block (checkpoint_every {args.checkpoint_every}, min interval {args.min_interval_s:g} s)")
    print(f"pool/bare(same threads) = {result['ratio_pool_vs_bare_same_threads']:.3f}; "
          f"pool/linear = {result['ratio_pool_vs_linear']:.3f}; store on/off = {result['ratio_store_vs_nostore']:.3f}; "
          f"{result['bytes_per_s'] / 1e6:.2f} MB/s written")
    c = result["cpu_s_per_M_chain_steps"]
    print(f"CPU s per 1e6 chain-steps (medians of {args.repeats}): bare {c['bare_1thread']:.3f}, pool no store "
          f"{c['pool_nostore']:.3f}, pool + store {c['pool_store']:.3f} -> bare/pool+store = "
          f"{result['cpu_ratio_bare_vs_pool_store']:.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratio)}; "
          f"bare before and after a round differ by up to {100 * max(spread):.1f}%)")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
