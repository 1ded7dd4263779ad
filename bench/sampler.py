"""Sampler benchmark: the engine's exact reduced walk vs a naive MMGM-style full walk.

Baseline (the style of the MMGM reference code): all M channels of every chain held in memory,
fp32, eager, chains advanced one small batch at a time, the universal score evaluated through the
full (B, M, *shape) path. Engine: ``WalkJumpEngine`` with the reduced walk, every chain in one batch.
Same network (the digits U-Net, untrained: speed does not depend on the weights), same chains,
same number of steps, measured in one run. Prints ratios; the last line is one JSON object.

    python bench/sampler.py                      # defaults: 1024 chains, M=8, 30 steps
    python bench/sampler.py --chains 4096 --steps 20 --baseline-batch 64
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from mmgm_ray.config import RunConfig, SamplerConfig
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--baseline-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = RunConfig()
    cfg.noise.M = args.M
    cfg.model.net.channels = 32
    cfg.model.net.channel_mult = [1, 2]
    event_shape = (1, 8, 8)
    model = build_score_model(cfg, event_shape).eval()
    sampler = SamplerConfig(block_size=min(256, args.chains), jump_every=10)
    delta = sampler.resolved_delta(cfg.noise.sigma)
    n_blocks = math.ceil(args.chains / sampler.block_size)
    chains = n_blocks * sampler.block_size

    # warm-up both paths (allocator, thread pools)
    naive_full_walk(model, torch.rand(args.baseline_batch, *event_shape), 2, args.baseline_batch, delta, 0.5, 10)
    eng = WalkJumpEngine(model, sampler, event_shape, 0, range(n_blocks))
    eng.initialize(); eng.run_collect(2)

    x0 = torch.rand(chains, *event_shape)
    t = time.perf_counter()
    naive_full_walk(model, x0, args.steps, args.baseline_batch, delta, 0.5, 10)
    t_base = time.perf_counter() - t

    eng = WalkJumpEngine(model, sampler, event_shape, 0, range(n_blocks))
    eng.initialize()
    t = time.perf_counter()
    eng.run_collect(args.steps)
    t_eng = time.perf_counter() - t

    base_rate = chains * args.steps / t_base
    eng_rate = chains * args.steps / t_eng
    base_bytes = 2 * 4 * args.M * math.prod(event_shape)
    eng_bytes = eng.state_bytes_per_chain()
    print(f"chains={chains} steps={args.steps} M={args.M} threads={args.threads}")
    print(f"baseline (full walk, batch {args.baseline_batch}): {base_rate:10.1f} chain-steps/s, {base_bytes} B state/chain")
    print(f"engine   (reduced walk, one batch):  {eng_rate:10.1f} chain-steps/s, {eng_bytes} B state/chain")
    print(f"speed-up x{eng_rate / base_rate:.2f}; state memory /{base_bytes / eng_bytes:.1f}")
    print(json.dumps({"bench": "sampler", "chains": chains, "steps": args.steps, "M": args.M,
                      "baseline_chain_steps_per_s": round(base_rate, 1),
                      "engine_chain_steps_per_s": round(eng_rate, 1),
                      "speedup": round(eng_rate / base_rate, 3),
                      "baseline_state_bytes_per_chain": base_bytes,
                      "engine_state_bytes_per_chain": eng_bytes,
                      "state_ratio": round(base_bytes / eng_bytes, 2)}))


if __name__ == "__main__":
    main()
