"""Training-step benchmark: the fast path (``train.fast``) against float32 eager, in one process.

A step is what the training loop runs (``mmgm_ray.train.fast.train_step``): the loss's forward and
backward, gradient clipping, AdamW and the EMA update, on the config's batch (digits U-Net, batch
64 by default). Each option set gets its own model (same seed), optimizer and data stream; the
sets are then timed interleaved, ``--steps`` steps each per round for ``--rounds`` rounds, and
each set's rate is compared with the reference (float32 eager, for-loop AdamW: ``train.fast=off``)
within the same round (median of the per-round ratios: the machine may be shared). Compile time
(the warm-up step that compiles forward and backward) is reported, not counted; Inductor caches
its kernels on disk, so a second run compiles in seconds (``--cold-cache``: a fresh cache).

    python bench/train_fast.py                          # one intra-op thread, like a Ray worker
    python bench/train_fast.py --threads 2 --no-compile
    python bench/train_fast.py --cold-cache              # compile time as on a fresh machine

Sets: off (reference), auto and on as resolved on this device, and the single options (bf16
eager, float32 compiled, each with the fused AdamW). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from mmgm_ray.config import load_config
from mmgm_ray.data import load_dataset
from mmgm_ray.factory import build_score_model
from mmgm_ray.train import fast
from mmgm_ray.train.loop import batch_stream


def build(cfg, ds, options, device):
    """A fresh model (seeded), its EMA, optimizer and data stream; compiled when ``options`` say so."""
    torch.manual_seed(cfg.seed)
    model = build_score_model(cfg, tuple(ds.event_shape)).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fast.make_optimizer(params, cfg.train, cfg.train.lr, options)
    batches = batch_stream(ds, cfg, 0, 1, 0, device)
    t0 = time.perf_counter()
    first = next(batches)
    options = fast.compile_net(model, options, first, device)
    compile_s = time.perf_counter() - t0
    gen = torch.Generator(device=device)
    state = {"i": 0}

    def run(n: int) -> float:
        """Seconds for ``n`` steps (synchronized at the end)."""
        t = time.perf_counter()
        for _ in range(n):
            gen.manual_seed(state["i"])
            loss, _ = fast.train_step(model, opt, params, list(ema.parameters()), next(batches), gen,
                                      cfg.train.grad_clip, 1e-3, options, device)
            state["i"] += 1
        float(loss)
        return time.perf_counter() - t

    return options, compile_s, run


def optimizer_ms(cfg, ds, repeats: int = 20) -> dict:
    """Milliseconds per AdamW step alone, for-loop vs fused, timed interleaved on the model's
    parameters with gradients set: the part of a step the fused AdamW changes, measured without
    the rest of the step's noise."""
    model = build_score_model(cfg, tuple(ds.event_shape))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opts = {name: fast.make_optimizer(params, cfg.train, 1e-9, fast.TrainFastOptions(fused_adamw=fused))
            for name, fused in (("for_loop", False), ("fused", True))}
    times = {name: [] for name in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            t = time.perf_counter()
            for _ in range(10):
                opt.step()
            times[name].append((time.perf_counter() - t) * 100)
    return {name: round(statistics.median(ts), 3) for name, ts in times.items()}


def interleaved(runs: dict, steps: int, rounds: int) -> tuple[dict, dict]:
    """({set: [steps/s per round]}, {set: [rate / off's rate in that round]}): every set takes
    ``steps`` steps in turn, ``rounds`` times, so a change of the machine's load hits all alike."""
    rates = {k: [] for k in runs}
    ratios = {k: [] for k in runs}
    for r in range(rounds):
        secs = {name: run(steps) for name, run in runs.items()}
        for name, s in secs.items():
            rates[name].append(steps / s)
            ratios[name].append(secs["off"] / s)
        print(f"round {r + 1}: " + ", ".join(f"{k} {steps / s:.1f}" for k, s in secs.items())
              + f" steps/s (load {os.getloadavg()[0]:.2f})", flush=True)
    return rates, ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="digits")
    p.add_argument("--steps", type=int, default=10, help="steps per set per round")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a Ray worker has 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled sets")
    p.add_argument("--cold-cache", action="store_true",
                   help="compile into a fresh Inductor cache (the compile time of a fresh machine)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    if args.cold_cache:   # Inductor reads it whenever it looks for a cached kernel
        cache = tempfile.mkdtemp(prefix="mmgm-inductor-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.config, args.overrides)
    ds = load_dataset(cfg.data)
    probe = build_score_model(cfg, tuple(ds.event_shape))
    sets = {"off": fast.REFERENCE}
    for mode in ("auto", "on"):
        tc = dataclasses.replace(cfg.train, fast=mode)
        sets[mode] = fast.resolve_train_options(tc, probe, device)
    singles = {"fused_adamw": fast.TrainFastOptions(fused_adamw=True),
               "bf16_eager": fast.TrainFastOptions("bfloat16", False, True),
               "fp32_compiled": fast.TrainFastOptions("float32", True, True),
               "bf16_compiled": fast.TrainFastOptions("bfloat16", True, True)}
    sets.update({k: v for k, v in singles.items() if v not in sets.values()})   # each set timed once
    if args.no_compile:
        sets = {k: v for k, v in sets.items() if not v.compile}
    load0 = os.getloadavg()
    print(f"{args.config}: batch {cfg.train.batch_size}, {args.threads} thread(s), device {device}, "
          f"load average {load0[0]:.2f}", flush=True)

    runs, compile_s, resolved = {}, {}, {}
    for name, opts in sets.items():
        resolved[name], compile_s[name], runs[name] = build(cfg, ds, opts, device)
        runs[name](3)   # allocator and first-call warm-up, not timed
        note = f", compile + warm-up step {compile_s[name]:.1f} s" if opts.compile else ""
        print(f"  {name:14s} {resolved[name].as_dict()}{note}", flush=True)

    adamw = optimizer_ms(cfg, ds)
    print(f"  AdamW step alone: for-loop {adamw['for_loop']:.2f} ms, fused {adamw['fused']:.2f} ms", flush=True)
    rates, ratios = interleaved(runs, args.steps, args.rounds)

    result = {"config": args.config, "batch": cfg.train.batch_size, "threads": args.threads,
              "device": str(device), "steps_per_round": args.steps, "rounds": args.rounds,
              "cold_cache": args.cold_cache, "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "load_average_start": round(load0[0], 2),
              "load_average_end": round(os.getloadavg()[0], 2), "sets": {}}
    print("median steps/s and ratio to off (float32 eager, for-loop AdamW) over rounds:")
    for name in sets:
        med, ratio = statistics.median(rates[name]), statistics.median(ratios[name])
        print(f"  {name:14s} {med:7.1f} steps/s  {ratio:.2f}x  (ratio range {min(ratios[name]):.2f}-"
              f"{max(ratios[name]):.2f})", flush=True)
        result["sets"][name] = {"options": resolved[name].as_dict(), "steps_per_s": round(med, 2),
                                "ratio_to_off": round(ratio, 3),
                                "ratio_range": [round(min(ratios[name]), 3), round(max(ratios[name]), 3)],
                                "compile_s": round(compile_s[name], 1) if sets[name].compile else None}
    result["adamw_step_ms"] = adamw
    for mode in ("on", "auto"):   # None where --no-compile left the set out
        result[f"fast_{mode}_over_fp32_eager"] = result["sets"].get(mode, {}).get("ratio_to_off")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
