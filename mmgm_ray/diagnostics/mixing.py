"""The mixing report of a run from per-functional summaries (pure; the reductions that produce
them run in this process or as Ray tasks, ``mmgm_ray.postprocess.reduce``).

:func:`functional_summary` turns one functional's ``(chains, draws)`` array into its figures;
:func:`mixing_report` assembles the figures of every functional into the report behind
``mmgm diagnose RUN`` (the keys ``pipeline.stage_diagnose`` and ``mmgm_ray.report`` read);
:func:`format_report` is its text form.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Optional

import numpy as np

from mmgm_ray.diagnostics import mcmc

__all__ = ["SUMMARY_KEYS", "functional_summary", "group_entries", "mixing_report", "format_report", "jsonable"]

#: figures of one functional: R-hat (rank = max(bulk, tail)), ESS, MCSE of the mean, tau, moments
SUMMARY_KEYS = ("rhat", "rhat_bulk", "rhat_tail", "ess_bulk", "ess_tail", "ess_mean", "tau", "mean", "sd",
                "mcse_mean", "ess_batch_means", "nested_rhat")
_VECTOR = re.compile(r"^(pc|proj)_(\d+)$")


def _nested(x: np.ndarray, superchain_size: int) -> float:
    """Nested R-hat over superchains of ``superchain_size`` consecutive chains (by chain id; the
    chains left over after the last full superchain are not used); NaN with fewer than two."""
    k = x.shape[0] // superchain_size if superchain_size > 0 else 0
    if k < 2:
        return float("nan")
    return float(mcmc.nested_rhat(x[:k * superchain_size], np.arange(k * superchain_size) // superchain_size))


def functional_summary(x: np.ndarray, superchain_size: int = 16) -> dict:
    """Figures of one functional over complete chains, ``x`` (chains, draws) float64: rank R-hat
    and its bulk/tail parts, bulk/tail/mean ESS, integrated autocorrelation time, mean, sd (Vehtari
    et al. 2021), MCSE of the mean (sd / sqrt(ESS_mean), as ArviZ), batch-means ESS (Vats, Flegal &
    Jones 2019) and nested R-hat (Margossian et al. 2024); see :mod:`mmgm_ray.diagnostics.mcmc`."""
    s = mcmc.summarize(x)
    out = {k: float(s[k]) for k in ("rhat", "rhat_bulk", "rhat_tail", "ess_bulk", "ess_tail", "ess_mean", "tau",
                                    "mean", "sd")}
    out["mcse_mean"] = out["sd"] / math.sqrt(out["ess_mean"]) if out["ess_mean"] > 0 else float("nan")
    out["ess_batch_means"] = float(mcmc.batch_means_ess(x))
    out["nested_rhat"] = _nested(x, superchain_size)
    return out


def group_entries(entries: Mapping[str, dict]) -> dict:
    """Per-column figures -> report entries: ``pc_i`` / ``proj_i`` become one entry ``pc`` / ``proj``
    whose values are lists in index order (the report's convention for vector functionals)."""
    out: dict = {}
    vectors: dict = {}
    for name, e in entries.items():
        m = _VECTOR.match(name)
        if m:
            vectors.setdefault(m.group(1), {})[int(m.group(2))] = e
        else:
            out[name] = dict(e)
    for base, by_index in vectors.items():
        idx = sorted(by_index)
        out[base] = {k: [by_index[i][k] for i in idx] for k in by_index[idx[0]]}
    return out


def jsonable(v):
    """numpy scalars/arrays -> Python numbers/lists, non-finite floats -> None (strict JSON)."""
    if isinstance(v, np.ndarray):
        return [jsonable(a) for a in v.tolist()] if v.ndim else jsonable(v.item())
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (list, tuple)):
        return [jsonable(a) for a in v]
    if isinstance(v, dict):
        return {k: jsonable(a) for k, a in v.items()}
    return v


def _extreme(values, fn) -> float:
    """max/min over the finite-or-inf values of a figure (a number or a list); NaN when none."""
    a = np.atleast_1d(np.asarray(values, dtype=np.float64))
    a = a[~np.isnan(a)]
    return float(fn(a)) if a.size else float("nan")


def _flags(stats: dict, rhat_threshold: float, min_ess: float) -> list[str]:
    flags = []
    for name, e in stats.items():
        rh = np.atleast_1d(np.asarray(e["rhat"], dtype=np.float64))
        worst = _extreme(rh, np.max)
        if worst > rhat_threshold or not np.isfinite(rh).all():
            flags.append(f"{name}: R-hat {worst:.4g} > {rhat_threshold}")
        low = float(np.fmin(_extreme(e["ess_bulk"], np.min), _extreme(e["ess_tail"], np.min)))
        if low < min_ess:
            flags.append(f"{name}: ESS {low:.4g} < {min_ess}")
    return flags


def mixing_report(meta: dict, entries: Mapping[str, dict], transitions: Optional[dict] = None, *,
                  rhat_threshold: float = 1.01, min_ess: float = 400.0) -> dict:
    """The JSON-able report.

    ``meta`` holds run_id, run, event_shape, chains, chains_used, draws, burn_in, divergences (and
    anything else to pass through); ``entries`` the :func:`functional_summary` of each column.

    ``flags`` lists what failed: R-hat above ``rhat_threshold`` (1.01 after Vehtari et al.; with C
    chains stationary draws still give R-hat^2 ~= 1 + 2C/ESS_bulk over split chains, Vats &
    Knudson 2021, so with 10^4 short chains set the threshold from the ESS you need), bulk or tail
    ESS below ``min_ess``, incomplete chains, divergences. ``mixing_ok`` is True when no R-hat or
    ESS flag is raised.
    """
    report = {**meta, "incomplete_chains": int(meta["chains"] - meta["chains_used"]),
              "rhat_threshold": rhat_threshold, "min_ess": min_ess, "stats": group_entries(entries)}
    c_used, n = int(meta["chains_used"]), int(meta["draws"])
    if c_used < 1 or n < 4 or not entries:
        mixing_flags = [f"too little data for mixing diagnostics ({c_used} complete chains x {n} draws)"]
        report["stats"] = {}
    else:
        mixing_flags = _flags(report["stats"], rhat_threshold, min_ess)
        report["max_rhat"] = _extreme([_extreme(e["rhat"], np.max) for e in report["stats"].values()], np.max)
        report["min_ess_bulk"] = _extreme([_extreme(e["ess_bulk"], np.min) for e in report["stats"].values()], np.min)
    flags = list(mixing_flags)
    if report["incomplete_chains"]:
        flags.append(f"{report['incomplete_chains']} chains stop before the end of the window (left out)")
    if report["divergences"]:
        flags.append(f"{report['divergences']} divergences")
    if transitions is not None:
        report["transitions"] = transitions
    report["flags"] = flags
    report["mixing_ok"] = not mixing_flags
    return jsonable(report)


def format_report(rep: dict) -> str:
    """The human-readable form of a report (``mmgm diagnose RUN``)."""
    def fmt(v):
        if isinstance(v, list):
            return ", ".join(f"{a:.4g}" if a is not None else "nan" for a in v)
        return f"{v:.4g}" if v is not None else "nan"

    lines = [f"run {rep['run_id']}: {rep['chains_used']}/{rep['chains']} chains x {rep['draws']} jumps "
             f"(burn-in {rep['burn_in']}), {rep['divergences']} divergences"]
    for name, e in rep["stats"].items():
        lines.append(f"  {name:15s} rhat {fmt(e['rhat'])} | ess bulk {fmt(e['ess_bulk'])} tail "
                     f"{fmt(e['ess_tail'])} | tau {fmt(e['tau'])}")
    if "transitions" in rep:
        t = rep["transitions"]
        tv = f", TV to reference {t['tv']:.4g}" if t.get("tv") is not None else ""
        lines.append(f"  classes: switch rate {fmt(t['switch_rate'])}, mean dwell {fmt(t['dwell_mean'])} jumps, "
                     f"visits {['%.3f' % f for f in t['visit_fractions']]}{tv}")
    if rep.get("classifier"):
        c = rep["classifier"]
        lines.append(f"  classifier: held-out accuracy {c['accuracy']:.4f} on {c['holdout']} examples")
    lines.append("mixing ok" if rep["mixing_ok"] else "NOT MIXING")
    lines += [f"  ! {f}" for f in rep["flags"]]
    return "\n".join(lines)
