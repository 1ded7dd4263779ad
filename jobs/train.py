"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/train.py --config digits --set train.steps=200``.

Thin on purpose: parse, load the config, connect to the cluster the job runs on, call the library.
Bad configs exit with status 2 and one error line before any worker starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="digits", help="YAML file or shipped config name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    from mmgm_ray.config import load_config
    from mmgm_ray.train.ray_train import HEALTH_CHECK_ENV, run_ray_training
    from mmgm_ray.train.validate import validate_run

    try:
        cfg = load_config(args.config, args.overrides)
        plan = validate_run(cfg)  # before connecting: a bad config never reaches the cluster
    except ValueError as e:
        print(f"jobs/train.py: error: {e}", file=sys.stderr)
        return 2
    import ray

    os.environ.setdefault(HEALTH_CHECK_ENV, "0.1")
    ray.init()  # inside a job: connects to the cluster that runs it
    res = run_ray_training(cfg, plan)
    print(json.dumps({"artifact": res.artifact, "checkpoint": res.checkpoint_path, "metrics": res.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
