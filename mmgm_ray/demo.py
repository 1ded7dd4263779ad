"""``mmgm demo``: the embedded default job. Train the digits config in-process (no Ray), then run
walk-jump chains with the EMA model and write a PNG grid of the samples.

Outputs in ``--out``: ``samples.png`` (DEMO_CHAINS chains, 8 per row, 8x8 digits enlarged 4x),
``config.yaml`` (the resolved config), ``model.pt`` (the artifact, ``factory.load_artifact``),
``metrics.jsonl`` (training curve). About two minutes on 2 CPU cores.
"""
from __future__ import annotations

import sys
import time

from mmgm_ray.config import load_config
from mmgm_ray.data import load_dataset
from mmgm_ray.images import save_grid
from mmgm_ray.train.loop import preview_samples, train_local

DEMO_STEPS = 500        # enough for clearly recognizable 8x8 digits with the shipped digits config
DEMO_CHAINS = 64        # one 8x8 grid
DEMO_WALK_STEPS = 200   # walk steps per chain before the jump that is shown


def run_demo(out: str, config: str | None = None, overrides: list[str] | None = None,
             progress: bool = True) -> dict:
    """Train (in-process) and sample; returns {"samples" (PNG path), "x" (the samples, (N, C, H, W),
    on the CPU), "artifact", "model_hash", "steps", "final_loss", "seconds", ...}."""
    t0 = time.perf_counter()
    # demo defaults first, so the user's --set values win
    base = [f"train.steps={DEMO_STEPS}", "train.preview.chains=0", "name=demo", f"output={out}"]
    cfg = load_config(config or "digits", base + list(overrides or []))
    res = train_local(cfg, resume=False, progress=progress, run_dir=out)
    t_train = time.perf_counter() - t0
    if len(res.event_shape) != 3:
        raise ValueError(f"the demo draws image grids; data {cfg.data.name!r} has event shape {res.event_shape}")
    data = load_dataset(cfg.data).x if cfg.sampler.init == "data" else None
    device = next(res.ema.parameters()).device   # the chains run where the model was trained
    x = preview_samples(res.ema, cfg, res.event_shape, DEMO_CHAINS, DEMO_WALK_STEPS, device, data)
    path = f"{out.rstrip('/')}/samples.png"
    save_grid(x, path, nrow=8, scale=4)
    info = {"samples": path, "x": x, "artifact": res.artifact, "model_hash": res.model_hash, "steps": res.step,
            "final_loss": res.history[-1]["loss"] if res.history else None,
            "train_seconds": round(t_train, 1), "seconds": round(time.perf_counter() - t0, 1)}
    if progress:
        print(f"[mmgm demo] wrote {path} ({DEMO_CHAINS} walk-jump samples after {DEMO_WALK_STEPS} steps), "
              f"{res.artifact}; {info['seconds']} s", file=sys.stderr, flush=True)
    return info
