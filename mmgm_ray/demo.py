"""``mmgm demo``: the embedded default job. Train the digits config in-process (no Ray), then run
walk-jump chains with the EMA model and write a PNG grid of the samples.

Outputs in ``--out``: ``samples.png`` (DEMO_CHAINS chains, 8 per row, 8x8 digits enlarged 4x),
``config.yaml`` (the resolved config), ``model.pt`` (the artifact, ``factory.load_artifact``),
``metrics.jsonl`` (training curve). About two minutes on 2 CPU cores.
"""
from __future__ import annotations

import time

import torch

from mmgm_ray.config import load_config

DEMO_STEPS = 500        # enough for clearly recognizable 8x8 digits with the shipped digits config
DEMO_CHAINS = 64        # one 8x8 grid
DEMO_WALK_STEPS = 200   # walk steps per chain before the jump that is shown


def _pick_threads() -> None:
    """One intra-op thread when the machine is already busy: small convs with OpenMP threads
    fighting other processes for 2 cores ran 5x slower than a single thread (measured)."""
    import os
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5
    except OSError:
        busy = False
    if busy:
        torch.set_num_threads(1)


def run_demo(out: str, config: str | None = None, overrides: list[str] | None = None,
             progress: bool = True) -> dict:
    """Train (in-process) and sample; returns {"samples" (PNG path), "x" (the samples, (N, C, H, W)),
    "artifact", "model_hash", "steps", "final_loss", "seconds", ...}."""
    from mmgm_ray.images import save_grid
    from mmgm_ray.train.loop import preview_samples, train_local

    t0 = time.perf_counter()
    _pick_threads()
    # demo defaults first, so the user's --set values win
    base = [f"train.steps={DEMO_STEPS}", "train.preview_chains=0", "name=demo", f"output={out}"]
    cfg = load_config(config or "digits", base + list(overrides or []))
    res = train_local(cfg, resume=False, progress=progress, run_dir=out)
    t_train = time.perf_counter() - t0
    if len(res.event_shape) != 3:
        raise ValueError(f"the demo draws image grids; data {cfg.data.name!r} has event shape {res.event_shape}")
    data = None
    if cfg.sampler.init == "data":
        from mmgm_ray.data import load_dataset
        data = load_dataset(cfg.data).x
    x = preview_samples(res.ema, cfg, res.event_shape, DEMO_CHAINS, DEMO_WALK_STEPS, torch.device("cpu"), data)
    path = f"{out.rstrip('/')}/samples.png"
    save_grid(x, path, nrow=8, scale=4)
    info = {"samples": path, "x": x, "artifact": res.artifact, "model_hash": res.model_hash, "steps": res.step,
            "final_loss": res.history[-1]["loss"] if res.history else None,
            "train_seconds": round(t_train, 1), "seconds": round(time.perf_counter() - t0, 1)}
    if progress:
        print(f"[mmgm demo] wrote {path} ({DEMO_CHAINS} walk-jump samples after {DEMO_WALK_STEPS} steps), "
              f"{res.artifact}; {info['seconds']} s", flush=True)
    return info


def cli(args) -> int:
    """Entry point of ``mmgm demo`` (args.config, args.overrides, args.out)."""
    run_demo(args.out, args.config, args.overrides)
    return 0
