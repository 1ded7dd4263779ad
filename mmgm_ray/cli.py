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


_REGISTRARS = [_add_condition, _add_demo]


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


if __name__ == "__main__":
    sys.exit(main())
