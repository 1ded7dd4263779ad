"""Benchmark: mmgm_ray.diagnostics R-hat / ESS against arviz-stats on the same data, same process.

    .venv/bin/python bench/diagnostics.py [--chains 10000] [--draws 1000] [--small 8x1000]
                                          [--repeats 3] [--workers N]

Data: stationary AR(1) chains (rho = 0.9, tau = 19) of one scalar, shape (chains, draws), at the
large size and at a small one (Stan-like 8 x 1000). For each figure (bulk ESS, tail ESS, rank
R-hat) ours and arviz-stats' ``array_stats`` alternate within each repeat, so load from other
processes hits both alike. Ours runs with ``--workers`` threads (default: all CPUs this process may
use) "cold" (``clear_caches()`` first: the call pays for fresh buffers and normal scores, as a
first call does), "warm" (as every later call on draws of the same size: every scalar of a run
after the first) and cold on one thread. Reported per figure: the best time of each, the median
over repeats of the per-repeat ratio theirs / ours (>1: we are faster) and the largest relative
disagreement of the values; also the ratios of CPU time (user + system, all threads), which
depend less on how much of the machine other processes take. Our rank sorts (torch's radix sort)
run on one thread whatever ``--workers``; meanwhile a second thread does the work that needs no
order (a first call's normal-scores table and fresh buffers, the bulk figures during the folded
sort) and the threads share the rest, so wall times gain from a second core only when it is
free. ``summarize`` (every figure of one scalar from one sort of the draws and one of their
folded values) is timed against the sum of arviz-stats' separate calls for the same figures.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np


def ar1(chains: int, draws: int, rho: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty((chains, draws))
    x[:, 0] = rng.standard_normal(chains) / np.sqrt(1 - rho ** 2)
    for t in range(1, draws):
        x[:, t] = rho * x[:, t - 1] + rng.standard_normal(chains)
    return x


def _timed(fn, number: int, before=None) -> tuple[float, float, float]:
    """(wall seconds per call, CPU seconds per call (all threads, user + system), value) over
    ``number`` calls; ``before`` runs untimed before each."""
    wall, cpu, val = 0.0, 0.0, None
    for _ in range(number):
        if before is not None:
            before()
        t, c = time.perf_counter(), time.process_time()
        val = fn()
        wall += time.perf_counter() - t
        cpu += time.process_time() - c
    return wall / number, cpu / number, float(val)


def _figures(x, mcmc):
    from arviz_stats.base import array_stats as A
    kw = dict(chain_axis=0, draw_axis=1)
    ours = {
        "ess_bulk": lambda w: mcmc.ess(x, "bulk", workers=w),
        "ess_tail": lambda w: mcmc.ess(x, "tail", workers=w),
        "rhat_rank": lambda w: mcmc.rhat(x, "rank", workers=w),
        "summarize": lambda w: mcmc.summarize(x, workers=w)["rhat"],
    }
    theirs = {
        "ess_bulk": lambda: A.ess(x, method="bulk", **kw),
        "ess_tail": lambda: A.ess(x, method="tail", prob=(0.05, 0.95), **kw),
        "rhat_rank": lambda: A.rhat(x, method="rank", **kw),
        # summarize's other figures; arviz-stats' time for summarize adds the three above
        "summarize": lambda: [A.ess(x, method="mean", **kw), A.mcse(x, method="mean", **kw),
                              A.rhat(x, method="split", **kw), A.ess(x, method="identity", **kw)][0],
    }
    return ours, theirs


def bench_size(x, mcmc, repeats: int, workers: int) -> dict:
    """Per figure and repeat, in turn: ours cold (caches cleared: a first call), ours warm (the
    buffers and normal scores of the call before kept, as for every scalar after the first), ours
    cold on one thread, arviz-stats."""
    ours, theirs = _figures(x, mcmc)
    # calls per timing: about 0.1 s each at small sizes, one call at large ones
    number = max(1, min(200, int(0.1 / max(_timed(lambda: ours["summarize"](1), 1)[0], 1e-4))))
    cols = ("ours_cold", "ours_warm", "ours_cold_1thread", "arviz_stats")
    times = {name: {col: [] for col in cols} for name in ours}
    cpu = {name: {col: [] for col in cols} for name in ours}
    values = {name: {} for name in ours}
    for _ in range(repeats):
        for name in ours:
            t, v = times[name], values[name]
            runs = {"ours_cold": (lambda: ours[name](workers), mcmc.clear_caches),
                    "ours_warm": (lambda: ours[name](workers), None),
                    "ours_cold_1thread": (lambda: ours[name](1), mcmc.clear_caches),
                    "arviz_stats": (theirs[name], None)}
            for col, (fn, before) in runs.items():
                sec, cpu_sec, v[col] = _timed(fn, number, before)
                t[col].append(sec)
                cpu[name][col].append(cpu_sec)
            if name == "summarize":  # arviz-stats' separate calls for the same figures
                for d in (times, cpu):
                    d[name]["arviz_stats"][-1] += sum(d[k]["arviz_stats"][-1] for k in ("ess_bulk", "ess_tail", "rhat_rank"))
                v["arviz_stats"] = values["rhat_rank"]["arviz_stats"]
    out = {"calls_per_timing": number}
    for name, t in times.items():
        v = values[name]
        ratios = {col: [c / a for a, c in zip(t[col], t["arviz_stats"])] for col in cols[:3]}
        cpu_ratios = {col: [c / a for a, c in zip(cpu[name][col], cpu[name]["arviz_stats"])] for col in cols[:3]}
        rel = max(abs(v[col] - v["arviz_stats"]) for col in cols[:3]) / abs(v["arviz_stats"])
        out[name] = {**{f"{col}_s": round(min(t[col]), 5) for col in cols},
                     **{f"ratio_{col[5:]}_median": round(float(np.median(r)), 2) for col, r in ratios.items()},
                     **{f"cpu_ratio_{col[5:]}_median": round(float(np.median(r)), 2) for col, r in cpu_ratios.items()},
                     "ratios_cold": [round(r, 2) for r in ratios["ours_cold"]],
                     "max_rel_diff": rel, "value": v["ours_cold"]}
        med = {col: np.median(r) for col, r in ratios.items()}
        print(f"  {name:10s} ours cold {min(t['ours_cold']):8.4f} s  warm {min(t['ours_warm']):8.4f} s  "
              f"1 thread {min(t['ours_cold_1thread']):8.4f} s | arviz-stats {min(t['arviz_stats']):8.4f} s | "
              f"x{med['ours_cold']:.2f} cold, x{med['ours_warm']:.2f} warm, x{med['ours_cold_1thread']:.2f} 1 thread"
              f" | CPU-time x{np.median(cpu_ratios['ours_cold']):.2f} cold, x{np.median(cpu_ratios['ours_warm']):.2f} warm"
              f" | rel diff {rel:.1e}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", type=int, default=10_000)
    p.add_argument("--draws", type=int, default=1_000)
    p.add_argument("--small", default="8x1000", help="second size, CHAINSxDRAWS ('' to skip)")
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="our threads (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import arviz_stats
    from mmgm_ray.diagnostics import mcmc
    workers = a.workers or mcmc.default_workers()
    sizes = [(a.chains, a.draws)]
    if a.small:
        c, n = (int(v) for v in a.small.lower().split("x"))
        sizes.insert(0, (c, n))
    res = {"rho": a.rho, "repeats": a.repeats, "workers": workers, "cpus": os.cpu_count(),
           "load_avg": os.getloadavg(), "numpy": np.__version__, "python": platform.python_version(),
           "arviz_stats": arviz_stats.__version__, "sizes": {}}
    for c, n in sizes:
        print(f"{c} chains x {n} draws (load average {os.getloadavg()[0]:.1f})", flush=True)
        res["sizes"][f"{c}x{n}"] = bench_size(ar1(c, n, a.rho, a.seed), mcmc, a.repeats, workers)
    res["load_avg_end"] = os.getloadavg()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
