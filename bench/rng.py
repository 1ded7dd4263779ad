"""Noise cost per walk step: the per-chain Philox generator vs torch.Generator, and vs the network.

Per step the engine draws one standard normal per state element of every chain. Measured in one
process, interleaved, median of ``--reps`` calls, CPU time of this process (the machine is shared,
so wall time is noisy; with ``--threads 1`` CPU time is the work done):

- ``chain_rng``: ``ChainRNG.normal`` for all chains in one call (the engine's path);
- ``torch_generator``: the previous scheme, a torch.Generator re-seeded per block of 256 chains
  and ``torch.randn`` per block (fast, but device- and block-layout-dependent);
- ``forward``: the digits U-Net's reduced score at the same chains (untrained: speed does not
  depend on the weights), i.e. the network cost of one reduced-walk step.

Shapes: the reduced walk (1x8x8 per chain) and the full walk (M x 1x8x8). The last line is JSON.

    python bench/rng.py                         # 512 chains, digits config
    python bench/rng.py --chains 4096 --reps 10
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from mmgm_ray import rng
from mmgm_ray.config import load_config
from mmgm_ray.factory import build_score_model


def block_generator_normal(gen: torch.Generator, n_chains: int, block_size: int, step: int,
                           shape: tuple[int, ...]) -> torch.Tensor:
    """The previous engine's draws: one re-seeded generator per block of chains."""
    parts = []
    for b in range(math.ceil(n_chains / block_size)):
        gen.manual_seed((b * 1_000_003 + step) * 4 + rng.STREAM_WALK)
        parts.append(torch.randn((block_size, *shape), generator=gen))
    return torch.cat(parts)


def median_cpu_ms(fns: dict, reps: int) -> dict:
    """Median CPU milliseconds per call of each function, calls interleaved across functions."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.process_time()
            f()
            times[k].append(time.process_time() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=512)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", default="digits")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = load_config(args.config)
    event_shape = (1, 8, 8)
    model = build_score_model(cfg, event_shape).eval()
    M = cfg.noise.M
    ids = torch.arange(args.chains)
    chain_rng = rng.ChainRNG(cfg.seed)
    gen = torch.Generator()
    ybar = torch.rand(args.chains, *event_shape)
    step = iter(range(1, 10 ** 9))

    def forward():
        with torch.no_grad():
            model.reduced_score(ybar)

    fns = {"forward": forward}
    for walk, shape in (("reduced", (1, *event_shape)), ("full", (1, M, *event_shape))):
        fns[f"chain_rng_{walk}"] = lambda shape=shape: chain_rng.normal(ids, next(step), rng.STREAM_WALK, shape)
        fns[f"torch_generator_{walk}"] = lambda shape=shape: block_generator_normal(gen, args.chains, 256,
                                                                                    next(step), shape)
    for f in fns.values():                                            # warm-up (allocator, thread pool)
        f()
    ms = median_cpu_ms(fns, args.reps)

    out = {"bench": "rng", "chains": args.chains, "M": M, "threads": args.threads,
           "forward_ms": round(ms["forward"], 3)}
    print(f"chains={args.chains} M={M} threads={args.threads}; digits U-Net reduced score: {ms['forward']:.2f} ms")
    for walk in ("reduced", "full"):
        new, old = ms[f"chain_rng_{walk}"], ms[f"torch_generator_{walk}"]
        draws = args.chains * math.prod((1, *event_shape)) * (M if walk == "full" else 1)
        print(f"{walk:7s} walk ({draws} normals/step): chain_rng {new:7.2f} ms ({1e6 * new / draws:.0f} ns/draw), "
              f"torch.Generator per block {old:6.2f} ms: x{new / old:.1f} slower; "
              f"{100 * new / ms['forward']:.1f}% of the forward")
        out.update({f"{walk}_draws": draws, f"{walk}_chain_rng_ms": round(new, 3),
                    f"{walk}_torch_generator_ms": round(old, 3),
                    f"{walk}_ratio_vs_torch_generator": round(new / old, 2),
                    f"{walk}_ratio_vs_forward": round(new / ms["forward"], 4)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
