"""Sampler benchmark: the engine at the network's speed, and the fast path against a naive loop.

Three measurements of the same network (the digits U-Net, untrained weights drawn at random: speed
does not depend on them) on the same chains, in one process, interleaved ``--repeats`` times
(medians reported; the machine may be shared):

- naive: the style of the MMGM reference code: all M channels of every chain in memory, float32,
  eager, chains advanced ``--baseline-batch`` at a time, the universal score through the full
  (B, M, *shape) path;
- bare forward: the network alone, evaluated on all the chains the way the engine evaluates it
  (``mmgm_ray.fastpath.FastScore``: same options, same micro-batch), no walk;
- engine: ``WalkJumpEngine`` (exact reduced walk, every chain in one engine, noise, integrator,
  divergence checks, jumps) with those options.

Ratios: engine / bare forward (the walk's overhead; target >= 0.95) and engine / naive (the fast
path's gain; target >= 2 on 2 cores). Also the engine with the fast path off (float32, eager, one
forward) against naive. Compile time is reported, not counted. The last line is one JSON object.

    python bench/sampler.py                       # 1024 chains, M=8, fast path on
    python bench/sampler.py --compile off --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from mmgm_ray import fastpath
from mmgm_ray.config import RunConfig, SamplerConfig, from_dict, to_dict
from mmgm_ray.engine import WalkJumpEngine
from mmgm_ray.factory import build_score_model


def naive_full_walk(model, x0: torch.Tensor, steps: int, batch: int, delta: float, gamma: float, jump_every: int):
    """MMGM-reference-style A-B-O-B-A on all M channels, one small batch of chains at a time."""
    M, sigma = model.M, model.sigma
    z1, z2 = math.exp(-gamma * delta), math.exp(-2 * gamma * delta)
    jumps = 0
    for start in range(0, x0.shape[0], batch):
        x = x0[start:start + batch]
        y = x.unsqueeze(1) + sigma * torch.randn(x.shape[0], M, *x.shape[1:])
        v = torch.zeros_like(y)
        for t in range(1, steps + 1):
            y = y + delta / 2 * v
            with torch.no_grad():
                out = model.score(y)
            v = v + delta / 2 * out.psi
            v = z1 * v + delta / 2 * out.psi + math.sqrt(1 - z2) * torch.randn_like(v)
            y = y + delta / 2 * v
            if t % jump_every == 0:
                jumps += out.xhat.shape[0]
    return jumps


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def digits_unet(M: int) -> torch.nn.Module:
    """The digits U-Net of the issue's measurements (width 32, mult 1-2, mid attention), random weights."""
    cfg = RunConfig()
    cfg.noise.M = M
    cfg.model.net.channels = 32
    cfg.model.net.channel_mult = [1, 2]
    cfg.model.net.zero_init_out = False        # an all-zero output layer would make the work trivial
    torch.manual_seed(0)
    return build_score_model(cfg, (1, 8, 8)).eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--baseline-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fast", default="on", choices=["on", "auto", "off"])
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--autocast", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--micro-batch", type=int, default=0, help="0 = measured at start-up")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    event_shape = (1, 8, 8)
    model = digits_unet(args.M)
    sampler = from_dict(SamplerConfig, {"block_size": min(256, args.chains), "jump_every": 10, "fast": args.fast,
                                        "compile": args.compile, "autocast": args.autocast})
    n_blocks = math.ceil(args.chains / sampler.block_size)
    chains = n_blocks * sampler.block_size
    delta = sampler.resolved_delta(model.sigma)

    t = time.perf_counter()
    fast = fastpath.resolve_options(sampler, model, "cpu", event_shape, chains, chains * args.steps * args.repeats,
                                    micro_batch=args.micro_batch)
    t_resolve = time.perf_counter() - t
    t = time.perf_counter()
    engine = WalkJumpEngine(model, sampler, event_shape, 0, range(n_blocks), fast=fast)   # compiles here
    t_compile = time.perf_counter() - t
    fast = engine.fast
    plain = WalkJumpEngine(model, from_dict(SamplerConfig, {**to_dict(sampler), "fast": "off"}), event_shape, 0,
                           range(n_blocks))
    bare = fastpath.FastScore(fastpath.score_function(model, sampler.walk), fast, "cpu", event_shape)  # compiled: cached
    y = torch.rand(chains, *event_shape, generator=torch.Generator().manual_seed(1))
    x0 = torch.rand(chains, *event_shape, generator=torch.Generator().manual_seed(2))

    def forward_only():
        with torch.no_grad():
            for _ in range(args.steps):
                bare(y)

    def walk(eng):
        eng.initialize()
        eng.run_collect(args.steps)

    naive_full_walk(model, x0[:args.baseline_batch], 2, args.baseline_batch, delta, 0.5, 10)   # warm-ups
    forward_only()
    for eng in (engine, plain):
        eng.initialize()
        eng.run_collect(2)
    times = {"naive": [], "bare_forward": [], "engine": [], "engine_fast_off": []}
    for _ in range(args.repeats):
        times["naive"].append(timed(lambda: naive_full_walk(model, x0, args.steps, args.baseline_batch, delta, 0.5, 10)))
        times["bare_forward"].append(timed(forward_only))
        times["engine"].append(timed(lambda: walk(engine)))
        times["engine_fast_off"].append(timed(lambda: walk(plain)))
    rate = {k: chains * args.steps / statistics.median(v) for k, v in times.items()}
    result = {
        "bench": "sampler", "chains": chains, "steps": args.steps, "M": args.M, "threads": args.threads,
        "repeats": args.repeats, "fast_options": fast.as_dict(), "resolve_s": round(t_resolve, 2),
        "compile_s": round(t_compile, 2), "chain_steps_per_s": {k: round(v, 1) for k, v in rate.items()},
        "engine_over_bare_forward": round(rate["engine"] / rate["bare_forward"], 3),
        "fast_over_naive": round(rate["engine"] / rate["naive"], 3),
        "fast_off_over_naive": round(rate["engine_fast_off"] / rate["naive"], 3),
        "state_bytes_per_chain": {"naive": 2 * 4 * args.M * math.prod(event_shape),
                                  "engine": engine.state_bytes_per_chain()},
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(f"chains={chains} steps={args.steps} M={args.M} threads={args.threads} repeats={args.repeats} "
          f"(load average {result['load_average_1min']})")
    print(f"fast path options: {fast.as_dict()} (resolved in {t_resolve:.1f} s, compiled in {t_compile:.1f} s)")
    for k, v in rate.items():
        print(f"  {k:16s} {v:10.1f} chain-steps/s   (runs: {', '.join(f'{s:.2f}s' for s in times[k])})")
    print(f"engine / bare forward at the same micro-batch: {result['engine_over_bare_forward']:.3f} (target >= 0.95)")
    print(f"fast path / naive float32 loop (batch {args.baseline_batch}): {result['fast_over_naive']:.2f}x "
          f"(target >= 2); fast path off / naive: {result['fast_off_over_naive']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
