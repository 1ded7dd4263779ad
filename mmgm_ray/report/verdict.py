"""Per-functional mixing figures and the plain verdict line at the top of a report.

The figures are the project's own (:mod:`mmgm_ray.diagnostics.mcmc`: rank-normalized split R-hat,
bulk and tail ESS, Vehtari et al. 2021); this module only gathers them and turns them into advice.

How many more draws: for stationary chains of ``n`` draws with integrated autocorrelation time
``tau``, the between-chain variance of chain means is ``~ tau sigma^2 / n``, so
``R-hat^2 - 1 ~= (tau - 1) / n`` (Vats & Knudson 2021, "Revisiting the Gelman-Rubin diagnostic")
and bulk ESS grows linearly in ``n``. Reaching ``R-hat < r*`` and ``ESS >= E`` therefore takes
about ``max((R-hat^2 - 1) / (r*^2 - 1), E / ESS)`` times the draws. This holds once chains are
stationary; chains stuck in separate modes (no class switches) need a better-mixing sampler as
well (larger sigma, more walk steps per jump), which the advice says when the transitions show it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from mmgm_ray.diagnostics import mcmc
from mmgm_ray.report.inputs import ReportInputs

__all__ = ["FunctionalSummary", "Verdict", "functional_summaries", "draws_factor", "mixing_verdict"]

# a chain that switches class in fewer than this fraction of jumps is "stuck" for the advice
_STUCK_SWITCH_RATE = 0.01


@dataclass(frozen=True)
class FunctionalSummary:
    """One functional's mixing figures over ``chains`` chains of ``draws`` draws."""
    name: str
    rhat: float
    ess_bulk: float
    ess_tail: float
    chains: int
    draws: int
    source: str  # "report" (the run's diagnose output) or "computed" (from the functionals arrays)


@dataclass(frozen=True)
class Verdict:
    """``mixed`` is None when there is nothing to judge; ``headline`` is the line a person reads."""
    mixed: Optional[bool]
    headline: str
    criterion: str
    advice: tuple[str, ...]
    factor: Optional[float]  # how many times the draws the criterion needs (None when mixed/unknown)


def _flatten_stats(stats: dict, chains: int, draws: int) -> list[FunctionalSummary]:
    out = []
    for name, e in stats.items():
        vals = {k: e.get(k) for k in ("rhat", "ess_bulk", "ess_tail")}
        if isinstance(vals["rhat"], list):  # e.g. proj: one functional per projection
            for i in range(len(vals["rhat"])):
                out.append(FunctionalSummary(f"{name}_{i}", *(_num(vals[k][i]) for k in vals),
                                             chains, draws, "report"))
        else:
            out.append(FunctionalSummary(name, *(_num(vals[k]) for k in vals), chains, draws, "report"))
    return out


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def functional_summaries(inputs: ReportInputs) -> list[FunctionalSummary]:
    """R-hat and bulk/tail ESS of every functional.

    The run's own figures (``report["diagnostics"]["stats"]``) come first; functionals only in
    ``inputs.functionals`` are computed here with :func:`mmgm_ray.diagnostics.mcmc.summarize` over
    the chains without missing (NaN) draws, as ``diagnose`` does.
    """
    diag = inputs.report.get("diagnostics") or {}
    out = _flatten_stats(diag.get("stats") or {}, int(diag.get("chains_used") or 0), int(diag.get("draws") or 0))
    have = {s.name for s in out}
    for name, x in inputs.functionals.items():
        if name in have:
            continue
        x = x[np.isfinite(x).all(axis=1)]
        if x.shape[0] < 1 or x.shape[1] < 4:
            continue  # too short for split chains: the report says so in the verdict
        s = mcmc.summarize(x)
        out.append(FunctionalSummary(name, s["rhat"], s["ess_bulk"], s["ess_tail"], x.shape[0], x.shape[1],
                                     "computed"))
    return out


def draws_factor(s: FunctionalSummary, rhat_threshold: float, min_ess: float) -> float:
    """Times the current draws per chain that ``s`` needs to pass (module docstring); inf if R-hat
    or ESS is undefined."""
    if not (math.isfinite(s.rhat) and math.isfinite(s.ess_bulk)) or s.ess_bulk <= 0:
        return math.inf
    by_rhat = (s.rhat ** 2 - 1.0) / (rhat_threshold ** 2 - 1.0)
    return max(by_rhat, min_ess / s.ess_bulk)


def _passes(s: FunctionalSummary, rhat_threshold: float, min_ess: float) -> bool:
    return math.isfinite(s.rhat) and s.rhat < rhat_threshold and s.ess_bulk >= min_ess


def _times(f: float) -> str:
    return f"~{f:.1f}x" if f < 2 else f"~{math.ceil(f)}x"


def _stuck_advice(inputs: ReportInputs) -> list[str]:
    tr = (inputs.report.get("diagnostics") or {}).get("transitions") or {}
    rate = tr.get("switch_rate")
    if rate is None or not math.isfinite(rate) or rate >= _STUCK_SWITCH_RATE:
        return []
    seen = "never switch class" if rate == 0 else f"switch class in only {rate:.2%} of jumps"
    return [f"chains {seen}: more draws alone may not mix them; try a larger sigma or more walk steps "
            "per jump"]


def mixing_verdict(inputs: ReportInputs, summaries: list[FunctionalSummary]) -> Verdict:
    """The verdict: mixed when every functional has R-hat < threshold and bulk ESS >= min_ess."""
    thr, min_ess = inputs.rhat_threshold, inputs.min_ess
    criterion = f"every functional has R-hat < {thr:g} and bulk ESS \u2265 {min_ess:g}"
    if not summaries:
        why = ("sampling is still in progress and too few jumps are in" if inputs.in_progress
               else "the run has no functionals with at least 4 draws (diagnostics off, or too few jumps)")
        return Verdict(None, f"No mixing verdict yet: {why}.", criterion, (), None)
    failing = [s for s in summaries if not _passes(s, thr, min_ess)]
    worst_r = max(summaries, key=lambda s: s.rhat if math.isfinite(s.rhat) else math.inf)
    worst_e = min(summaries, key=lambda s: s.ess_bulk if math.isfinite(s.ess_bulk) else -math.inf)
    size = f"{worst_r.chains} chains \u00d7 {worst_r.draws} draws"
    if not failing:
        lead = "Mixed so far (run in progress)" if inputs.in_progress else "Mixed"
        return Verdict(True, f"{lead}: {criterion} (max R-hat {worst_r.rhat:.3f} on {worst_r.name}, "
                             f"min bulk ESS {worst_e.ess_bulk:,.0f} on {worst_e.name}; {size}).",
                       criterion, (), None)
    factor = max(draws_factor(s, thr, min_ess) for s in failing)
    more = (f"needs {_times(factor)} as many draws (~{math.ceil(factor * worst_r.draws):,} per chain)"
            if math.isfinite(factor) else "")
    if not math.isfinite(worst_r.rhat):
        action = f"R-hat is undefined on {worst_r.name} (a constant functional or missing draws)"
    elif worst_r.rhat >= thr:
        action = f"run longer: max R-hat {worst_r.rhat:.2f} on {worst_r.name} with {worst_r.draws} draws per chain"
    else:
        action = (f"too few effective draws: min bulk ESS {worst_e.ess_bulk:,.0f} on {worst_e.name} "
                  f"< {min_ess:g}; run longer or add chains")
    lead = "Not mixed yet (run in progress)" if inputs.in_progress else "Not mixed"
    advice = [f"{len(failing)} of {len(summaries)} functionals fail the criterion ({size})"]
    if worst_r.rhat >= thr and math.isfinite(worst_e.ess_bulk) and worst_e.ess_bulk < min_ess:
        advice.append(f"min bulk ESS {worst_e.ess_bulk:,.0f} on {worst_e.name} < {min_ess:g} "
                      "(more draws per chain or more chains both raise it)")
    advice += _stuck_advice(inputs)
    return Verdict(False, f"{lead} \u2014 {action}" + (f"; {more}." if more else "."), criterion, tuple(advice),
                   factor)
