"""Where the engine's step time goes beyond the network call: engine / bare forward, with and without jumps.

    python bench/engine_profile.py [--device cuda|cpu] [--quick] [--no-profile]

Same network and options as ``bench/gpu_check.py`` (the CIFAR-10-size U-Net; ``--quick``: its small
one). For each forward setting (eager, and compiled on CUDA) it measures the bare fast-path forward
at the chosen micro-batch, then ``WalkJumpEngine.step_once`` on two micro-batches of chains with
jumps every 10 steps and with no jumps, so the ratio separates the walk's own kernels from the jump's
emission; then a ``torch.profiler`` table of ten engine steps. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check as g  # noqa: E402  (the speed table's network, sizes and timer; bench/ is not a package)

from mmgm_ray import fastpath  # noqa: E402
from mmgm_ray.config import SamplerConfig, from_dict, to_dict  # noqa: E402
from mmgm_ray.engine import WalkJumpEngine  # noqa: E402

NO_JUMPS = 10 ** 9   # jump_every beyond any measured step count


def ratios(model, cfg, n: dict, device: torch.device, compile_: str, min_t: float, show_profile: bool) -> dict:
    """Bare forward and engine rates for one forward setting (``sampler.compile`` = ``compile_``)."""
    sampler = from_dict(SamplerConfig, {**to_dict(cfg.sampler), "fast": "on", "compile": compile_})
    fast = fastpath.resolve_options(sampler, model, device, g.EVENT, n["max_micro_batch"], NO_JUMPS,
                                    max_micro_batch=n["max_micro_batch"])
    score = fastpath.FastScore(fastpath.score_function(model, "reduced"), fast, device, g.EVENT)
    mb = score.options.micro_batch
    y = torch.rand(mb, *g.EVENT, device=device)
    with torch.no_grad():
        bare = g.rate(lambda: score(y), mb, device, min_t)
    out = {"options": score.options.as_dict(), "bare_images_per_s": bare}
    for label, every in (("jumps_every_10", 10), ("no_jumps", NO_JUMPS)):
        scfg = from_dict(SamplerConfig, {**to_dict(sampler), "block_size": mb, "jump_every": every})
        engine = WalkJumpEngine(model, scfg, g.EVENT, 0, [0, 1], device, fast=score.options)
        engine.initialize()
        walk = g.rate(lambda: engine.step_once(), 2 * mb, device, min_t)
        out[label] = {"chain_steps_per_s": walk, "engine_over_bare": walk / bare}
        print(f"compile={compile_} {score.options}: {label}: bare {bare:,.0f} images/s, engine {walk:,.0f} "
              f"chain-steps/s, ratio {walk / bare:.3f}", flush=True)
    if show_profile:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(10):
                engine.step_once()
            g.sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the small network and sizes of gpu_check --quick")
    ap.add_argument("--min-time-s", type=float, default=1.0, help="time per measurement")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler tables")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    n = g.sizes(device, args.quick)
    cfg = g.run_config(n["net"])
    torch.manual_seed(0)
    model = g.build_score_model(cfg, g.EVENT).to(device).eval().requires_grad_(False)
    settings = ["off", "on"] if device.type == "cuda" else ["off"]   # Inductor on a small CPU: minutes
    res = {"device": str(device), "quick": args.quick}
    for c in settings:
        res[f"compile_{c}"] = ratios(model, cfg, n, device, c, args.min_time_s, not args.no_profile)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
