"""``mmgm sample`` / ``mmgm generate`` (also ``jobs/sample.py`` / ``jobs/generate.py``): parse,
resolve the config, connect to Ray, call the library, print one JSON summary line on stdout.

Exit status: 0 done, 130 interrupted (Ctrl-C; resume with ``--resume RUN``), 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by sample and generate."""
    p.add_argument("--config", default=None, help="YAML config file or shipped config name (e.g. gmm_sample)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pool.num_chains=2000 (repeatable)")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="resume run RUN: a run name under config.output, or ROOT/RUN_ID; "
                        "without --config the run's recorded config is used")
    p.add_argument("--storage-options", default=None, metavar="JSON",
                   help="fsspec storage options for the store, e.g. '{\"client_kwargs\": {\"endpoint_url\": ...}}'")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS / the job's cluster, else a local one)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--out", default=None, help="data set file or folder (default {output}/{name}/dataset)")
    p.add_argument("--num-samples", type=int, default=None, help="samples to write (default pool.num_samples)")
    p.add_argument("--burn-in", type=int, default=None, help="walk steps to discard (default pool.burn_in)")
    p.add_argument("--thin", type=int, default=None, help="keep every k-th jump per chain (default pool.thin)")
    p.add_argument("--sample-dtype", default="float32", choices=["uint8", "float16", "float32"])
    p.add_argument("--png-dir", default=None, help="also write one PNG per sample here (images only)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of 64 samples here (images only)")


def resolve_config(args: argparse.Namespace):
    """(RunConfig, resume flag, storage options) from --config / --set / --resume / --storage-options."""
    from mmgm_ray.config import RunConfig, apply_overrides, from_dict, load_config
    from mmgm_ray.store import load_manifest

    opts = json.loads(args.storage_options) if args.storage_options else None
    if opts is not None and not isinstance(opts, dict):
        raise ValueError("--storage-options must be a JSON object")
    if not args.resume:
        return load_config(args.config, args.overrides), False, opts
    run = args.resume.rstrip("/")
    if "/" in run:
        root, name = run.rsplit("/", 1)
    else:
        base = load_config(args.config, args.overrides) if args.config else RunConfig()
        root, name = base.output.rstrip("/"), run
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        man = load_manifest(f"{root}/{name}", opts)
        if man is None or not man.get("config"):
            raise ValueError(f"cannot resume {root}/{name}: no run manifest with a recorded config there")
        cfg = from_dict(RunConfig, apply_overrides(dict(man["config"]), args.overrides))
    cfg.output, cfg.name = root, name
    cfg.validate()
    return cfg, True, opts


def _ensure_ray(address: Optional[str]) -> None:
    import ray
    if not ray.is_initialized():
        # no address: RAY_ADDRESS (set for submitted jobs) or a running cluster, else a local one
        ray.init(address=address)


def _finish(summary: dict) -> int:
    summary = {k: v for k, v in summary.items() if k != "divergence_events"}
    print(json.dumps(summary, default=str))
    if summary.get("status") == "interrupted":
        print(f"interrupted; resume with: --resume {summary['url']}", file=sys.stderr)
        return 130
    return 0


def _guard(fn):
    from mmgm_ray.store import StoreError

    try:
        return fn()
    except StoreError as e:  # unwritable store, full disk: one clear line
        raise ValueError(str(e)) from e


def cmd_sample(args: argparse.Namespace) -> int:
    """``mmgm sample``: run or resume a sampling run on the chain pool."""
    from mmgm_ray.pool.controller import run_pool

    cfg, resume, opts = resolve_config(args)
    _ensure_ray(args.address)
    return _finish(_guard(lambda: run_pool(cfg, resume=resume, storage_options=opts,
                                           progress=not args.no_progress)))


def cmd_generate(args: argparse.Namespace) -> int:
    """``mmgm generate``: N samples with burn-in and thinning as a Parquet image data set."""
    from mmgm_ray.pool.generate import generate_dataset

    cfg, resume, opts = resolve_config(args)
    _ensure_ray(args.address)
    return _finish(_guard(lambda: generate_dataset(
        cfg, args.out, num_samples=args.num_samples, burn_in=args.burn_in, thin=args.thin,
        sample_dtype=args.sample_dtype, png_dir=args.png_dir, grid=args.grid, resume=resume,
        storage_options=opts, progress=not args.no_progress)))


def job_main(kind: str, argv: Optional[list[str]] = None) -> int:
    """Entry of ``jobs/sample.py`` / ``jobs/generate.py`` (same flags as the CLI subcommands)."""
    p = argparse.ArgumentParser(prog=f"jobs/{kind}.py")
    (add_sample_args if kind == "sample" else add_generate_args)(p)
    args = p.parse_args(argv)
    try:
        return (cmd_sample if kind == "sample" else cmd_generate)(args)
    except ValueError as e:
        print(f"{kind}: error: {e}", file=sys.stderr)
        return 2
