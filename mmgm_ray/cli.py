"""The ``mmgm`` command line. Each subcommand parses, builds a config and calls the library.

Subcommands import their modules lazily so ``mmgm condition`` never pays for Ray.
"""
from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file or shipped config name (e.g. digits)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")


# ---- condition (THEORY section 7) ----------------------------------------------------------

def _cmd_condition(args: argparse.Namespace) -> int:
    from mmgm_ray import conditioning
    return conditioning.cli(args)


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


# ---- demo: the embedded default job --------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    from mmgm_ray import demo
    return demo.cli(args)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a small universal denoiser on the 8x8 digits and write "
                                    "a PNG grid of walk-jump samples (in-process, no cluster)")
    _add_config_args(p)
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.set_defaults(func=_cmd_demo)


# ---- sample / generate: the Ray chain pool (mmgm_ray.pool) ---------------------------------

def _add_sample(sub) -> None:
    from mmgm_ray.pool.cli import add_sample_args, cmd_sample
    p = sub.add_parser("sample", help="run (or --resume) thousands of walk-jump chains on a Ray actor pool, "
                                      "every jump written exactly once to the Parquet sample store")
    add_sample_args(p)
    p.set_defaults(func=cmd_sample)


def _add_generate(sub) -> None:
    from mmgm_ray.pool.cli import add_generate_args, cmd_generate
    p = sub.add_parser("generate", help="N samples from many chains (burn-in, thinning) as a Parquet image "
                                        "data set, optionally PNGs / a grid")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)



# ---- train: in-process or Ray Train (mmgm_ray.train) ------------------------------------------

def _cmd_train(args: argparse.Namespace) -> int:
    from mmgm_ray.train.cli import cli
    return cli(args)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a score model (Ray Train with DDP by default; --local: in-process)")
    _add_config_args(p)
    p.add_argument("--local", action="store_true", help="train in this process without Ray")
    p.add_argument("--dry-run", action="store_true",
                   help="validate config, data and network; print the resolved config and parameter count")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS or a running local cluster, else start one)")
    p.set_defaults(func=_cmd_train)


# ---- diagnose: mixing diagnostics over a run's sample store ------------------------------------

def _cmd_diagnose(args: argparse.Namespace) -> int:
    from mmgm_ray.diagnostics import store_stats
    return store_stats.cli(args)


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


# ---- run: the main job ---------------------------------------------------------------------

def _cmd_run(args: argparse.Namespace) -> int:
    from mmgm_ray import pipeline
    return pipeline.cli(args)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="the main job on Ray: train (Ray Train), sample (chain pool -> Parquet), "
                                   "diagnose mixing, FID, PNG grid; rerun to resume")
    _add_config_args(p)
    p.set_defaults(func=_cmd_run)


_REGISTRARS = [_add_run, _add_condition, _add_demo, _add_train, _add_sample, _add_generate, _add_diagnose]


def register(fn):
    """Add a subcommand registrar (used by modules that contribute subcommands)."""
    _REGISTRARS.append(fn)
    return fn


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmgm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for reg in _REGISTRARS:
        reg(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # config and input errors: one clear line, no traceback
        print(f"mmgm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
