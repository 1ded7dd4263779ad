"""``mmgm train``: parse -> load_config -> validate -> train (in-process or Ray Train)."""
from __future__ import annotations

import json
import os

from mmgm_ray.config import dump_config, load_config


def cli(args) -> int:
    """Handler of ``mmgm train`` (args.config, args.overrides, args.local, args.dry_run, args.address)."""
    from mmgm_ray.train.validate import validate_run

    cfg = load_config(args.config, args.overrides)
    world = 1 if args.local else cfg.train.num_workers
    plan = validate_run(cfg, world_size=world)
    if args.dry_run:
        print(dump_config(cfg), end="")
        print(json.dumps({"dry_run": "ok", "name": cfg.name, "data": cfg.data.name, "examples": len(plan.dataset),
                          "event_shape": list(plan.event_shape), "parameters": plan.n_params,
                          "run_dir": plan.run_dir, "mode": "local" if args.local else "ray"}))
        return 0
    if args.local:
        from mmgm_ray.train.loop import train_local
        res = train_local(cfg, dataset=plan.dataset)
        print(json.dumps({"artifact": res.artifact, "model_hash": res.model_hash, "step": res.step,
                          "loss": res.history[-1]["loss"] if res.history else None}))
        return 0
    import ray

    from mmgm_ray.train.ray_train import HEALTH_CHECK_ENV, run_ray_training
    if not ray.is_initialized():
        os.environ.setdefault(HEALTH_CHECK_ENV, "0.1")
        ray.init(address=args.address)  # None: RAY_ADDRESS / running cluster, else a new local one
    res = run_ray_training(cfg, plan)
    print(json.dumps({"artifact": res.artifact, "checkpoint": res.checkpoint_path, "metrics": res.metrics}))
    return 0
