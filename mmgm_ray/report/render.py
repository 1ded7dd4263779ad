"""``report.html``: one self-contained page per run (figures as data URIs, inline CSS, no script).

Sections, in order: verdict, samples, filmstrips, mixing, classes, fid, training, provenance.
Every section is always on the page (``<section id=...>``); one whose inputs are missing says
why in place (no labels, no FID, run still in progress) instead of disappearing.
"""
from __future__ import annotations

import base64
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Optional

import fsspec
import jinja2
import numpy as np

from mmgm_ray.report import figures
from mmgm_ray.report.inputs import ReportInputs
from mmgm_ray.report.verdict import FunctionalSummary, Verdict, functional_summaries, mixing_verdict
from mmgm_ray.store.fsutil import atomic_write_bytes

__all__ = ["render_report", "SECTION_IDS"]

SECTION_IDS = ("verdict", "samples", "filmstrips", "mixing", "classes", "fid", "training", "provenance")
_TRACE_FUNCTIONALS = 4   # the worst functionals by R-hat get trace and rank plots
_TRACE_CHAINS = 4
_AUTOCORR_FUNCTIONALS = 8
# bounds that keep figures legible (and rendering quick) whatever the caller passes
_GRID_MAX = 144
_FILM_CHAINS, _FILM_FRAMES = 8, 12
# config keys whose values never reach a report (credentials could sit in storage options)
_SECRET_KEY = re.compile(r"secret|token|password|passwd|credential|access_key|api_key|storage_options", re.I)
_env = jinja2.Environment(loader=jinja2.PackageLoader("mmgm_ray.report", "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


@dataclass
class Fig:
    src: str          # data URI
    alt: str
    caption: str = ""
    kind: str = "plot"  # "plot" or "pixels" (sample images: scaled without smoothing)


@dataclass
class Section:
    id: str
    title: str
    lead: str = ""
    missing: str = ""                  # why the section has nothing to show (shown in place)
    notes: list = field(default_factory=list)
    facts: list = field(default_factory=list)    # (label, value) pairs
    figures: list = field(default_factory=list)
    table: Optional[dict] = None       # {"header": [...], "rows": [{"cells": [...], "bad": bool}]}
    details: list = field(default_factory=list)  # (summary, preformatted text)


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "not recorded"
    if isinstance(v, float):
        return "undefined" if not math.isfinite(v) else f"{v:,.{digits}f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _progress_note(inputs: ReportInputs, what: str) -> str:
    status = (inputs.report.get("sample") or {}).get("status") or "not started"
    return f"Sampling is still in progress (status: {status}); {what} when the chains finish."


def _samples(inputs: ReportInputs) -> Section:
    s = Section("samples", "Samples", "The chains' last jumps.")
    if inputs.final_jumps is None:
        s.missing = (_progress_note(inputs, "the final jumps are shown") if inputs.in_progress else
                     "No final-jump images were given to this report (the data are not images).")
        return s
    n = min(len(inputs.final_jumps), _GRID_MAX)
    which = "latest" if inputs.in_progress else "final"
    s.figures.append(Fig(_uri(figures.grid_png(inputs.final_jumps[:n])), f"grid of {n} {which} jumps",
                         f"{n} {which} jumps, one per tile.", "pixels"))
    if inputs.in_progress:
        s.notes.append(_progress_note(inputs, "these are the latest jumps so far; the final ones are shown"))
    return s


def _filmstrips(inputs: ReportInputs) -> Section:
    s = Section("filmstrips", "Filmstrips",
                "Successive jumps of a few chains, one row per chain: a chain that mixes walks from one "
                "class to another (class changes in red).")
    if inputs.filmstrip is None:
        s.missing = (_progress_note(inputs, "filmstrips are shown") if inputs.in_progress else
                     "No filmstrip images were given to this report (the data are not images).")
        return s
    if inputs.filmstrip_labels is None:
        s.notes.append("No class labels for this run: frames are shown without their class.")
    c, t = inputs.filmstrip.shape[:2]
    rows = slice(0, _FILM_CHAINS)
    cols = np.unique(np.linspace(0, t - 1, min(t, _FILM_FRAMES)).round().astype(int))
    labels = None if inputs.filmstrip_labels is None else inputs.filmstrip_labels[rows][:, cols]
    png = figures.filmstrip_png(inputs.filmstrip[rows][:, cols], labels, inputs.filmstrip_jumps[cols],
                                inputs.filmstrip_chain_ids[rows], inputs.class_names)
    shown = min(c, _FILM_CHAINS)
    s.figures.append(Fig(_uri(png), f"filmstrip of {shown} chains over {cols.size} jumps",
                         f"{shown} of {c} chains, {cols.size} of {t} frames." if (shown, cols.size) != (c, t) else ""))
    return s


def _chain_rows(x: np.ndarray) -> list[int]:
    """A few chains spread over the range of chain means (lowest, highest and between), so
    disagreeing chains are on the plot when there are any."""
    ok = np.flatnonzero(np.isfinite(x).all(axis=1))
    order = ok[np.argsort(x[ok].mean(axis=1))]
    if order.size <= _TRACE_CHAINS:
        return order.tolist()
    picks = np.linspace(0, order.size - 1, _TRACE_CHAINS).round().astype(int)
    return sorted(order[picks].tolist())


def _summary_table(summaries: list[FunctionalSummary], thr: float, min_ess: float) -> dict:
    rows = []
    for s in sorted(summaries, key=lambda s: -s.rhat if math.isfinite(s.rhat) else -math.inf):
        bad = not (math.isfinite(s.rhat) and s.rhat < thr and s.ess_bulk >= min_ess)
        rows.append({"cells": [s.name, _fmt(s.rhat, 3), _fmt(s.ess_bulk, 0), _fmt(s.ess_tail, 0),
                               f"{s.chains:,} \u00d7 {s.draws:,}", s.source], "bad": bad})
    return {"header": ["functional", "R-hat", "bulk ESS", "tail ESS", "chains \u00d7 draws", "figures from"],
            "rows": rows}


def _mixing(inputs: ReportInputs, summaries: list[FunctionalSummary]) -> Section:
    s = Section("mixing", "Mixing diagnostics",
                f"Rank-normalized split R-hat and bulk/tail ESS (Vehtari et al. 2021) of every functional; "
                f"the criterion is R-hat < {inputs.rhat_threshold:g} and bulk ESS \u2265 {inputs.min_ess:g}.")
    if not summaries and not inputs.functionals:
        s.missing = (_progress_note(inputs, "mixing diagnostics are computed") if inputs.in_progress else
                     "No functionals and no diagnostics in this report (diagnostics were turned off, or "
                     "`mmgm diagnose RUN` has not been run on it).")
        return s
    if summaries:
        s.figures.append(Fig(_uri(figures.diagnostics_hist_png(
            [x.rhat for x in summaries], [x.ess_bulk for x in summaries], [x.ess_tail for x in summaries],
            inputs.rhat_threshold, inputs.min_ess)), "histograms of R-hat, bulk ESS and tail ESS",
            "Over all functionals; the dashed red line is the threshold."))
        s.table = _summary_table(summaries, inputs.rhat_threshold, inputs.min_ess)
    else:
        s.notes.append("Too few draws per chain for R-hat and ESS (split chains need at least 4).")
    _mixing_plots(inputs, summaries, s)
    return s


def _mixing_plots(inputs: ReportInputs, summaries: list[FunctionalSummary], s: Section) -> None:
    """Trace, rank and autocorrelation plots of the functionals (worst R-hat first) into ``s``."""
    if not inputs.functionals:
        s.notes.append("No per-jump functionals were given, so there are no trace, rank or autocorrelation plots.")
        return
    rank = {x.name: x.rhat if math.isfinite(x.rhat) else math.inf for x in summaries}
    names = sorted(inputs.functionals, key=lambda n: -rank.get(n, 0.0))
    worst = names[:_TRACE_FUNCTIONALS]
    rows = _chain_rows(inputs.functionals[worst[0]])
    if not rows or inputs.jump_index.size < 4:
        s.notes.append(f"Too few complete chains or draws for trace and autocorrelation plots "
                       f"({len(rows)} complete chains × {inputs.jump_index.size} draws).")
        return
    s.figures.append(Fig(_uri(figures.trace_rank_png({n: inputs.functionals[n] for n in worst}, inputs.jump_index,
                                                     rows, inputs.chain_ids)),
                         "trace and rank plots", f"Traces and rank histograms of {len(rows)} chains for the "
                         f"{len(worst)} functionals with the highest R-hat."))
    acf = {n: inputs.functionals[n] for n in names[:_AUTOCORR_FUNCTIONALS]}
    s.figures.append(Fig(_uri(figures.autocorr_png(acf, rows)), "autocorrelation curves",
                         "Autocorrelation against lag; thin lines: the chains above, thick: mean over the chains "
                         "(up to 512). Each chain is taken about its own mean, so chains stuck apart show in the "
                         "traces and rank histograms, not here."))


def _class_stats(inputs: ReportInputs):
    tr = (inputs.report.get("diagnostics") or {}).get("transitions") or {}
    matrix = inputs.transition_matrix
    if matrix is None and tr.get("transition_matrix") is not None:
        matrix = np.asarray(tr["transition_matrix"], dtype=np.float64)
    sampled = inputs.class_frequencies
    if sampled is None and tr.get("occupancy") is not None:
        sampled = np.asarray(tr["occupancy"], dtype=np.float64)
    data = inputs.data_class_frequencies
    if data is None and tr.get("reference") is not None:
        data = np.asarray(tr["reference"], dtype=np.float64)
    return tr, matrix, sampled, data


def _classes(inputs: ReportInputs) -> Section:
    s = Section("classes", "Classes", "How often chains move between classes, and how often each class is sampled "
                "compared with the data.")
    tr, matrix, sampled, data = _class_stats(inputs)
    if matrix is None and sampled is None:
        s.missing = ("This run has no class labels (unlabelled data, or no classifier was applied to the jumps), "
                     "so there are no class transitions or class frequencies to show.")
        return s
    for key, label in (("switch_rate", "jumps that change class"), ("tv", "total variation to the data"),
                       ("per_chain_tv", "mean per-chain total variation"), ("dwell_mean", "mean dwell (jumps)")):
        if tr.get(key) is not None:
            v = tr[key]
            s.facts.append((label, f"{v:.1%}" if key == "switch_rate" else _fmt(float(v), 3)))
    if matrix is not None:
        s.figures.append(Fig(_uri(figures.transition_png(matrix, inputs.class_names)), "class transition heatmap",
                             "Probability of each class at the next jump given the class now."))
    if sampled is not None:
        s.figures.append(Fig(_uri(figures.class_frequency_png(sampled, data, inputs.class_names)),
                             "class frequencies of the samples and the data",
                             "Fraction of all sampled jumps in each class" + (", next to the data set's." if data is not None
                                                                               else ".")))
        if data is None:
            s.notes.append("The data set's class frequencies were not recorded; samples only.")
    return s


def _fid(inputs: ReportInputs) -> Section:
    s = Section("fid", "Sample quality (FID)",
                "FID of the chains' last jumps against training images, next to the FID of as many held-out real "
                "images (the floor at this N: only the gap between the two is meaningful).")
    fid = inputs.report.get("fid")
    if fid and fid.get("error"):
        s.missing = f"FID failed on this run: {fid['error']} (the other sections are unaffected)."
        return s
    if not fid or fid.get("fid") is None:
        s.missing = (_progress_note(inputs, "FID is computed") if inputs.in_progress else
                     "FID was not computed for this run (the data are not images, evaluate.fid_samples is "
                     "below 2, or the run was sampled without `mmgm run`: `mmgm fid RUN` scores it).")
        return s
    s.facts += [("FID", _fmt(float(fid["fid"]), 2)), ("real-data floor", _fmt(fid.get("real_floor"), 2)),
                ("images (N)", _fmt(fid.get("n"))), ("reference", _fmt(fid.get("reference")))]
    windows = sorted(fid.get("windows") or [], key=lambda w: w["start"])
    s.figures.append(Fig(_uri(figures.fid_png(float(fid["fid"]), fid.get("real_floor"), windows)),
                         "FID per chain-length window" if windows else "FID and real-data floor"))
    if not windows:
        s.notes.append("No FID per chain-length window was computed for this run.")
    return s


def _training(inputs: ReportInputs) -> Section:
    s = Section("training", "Training", "The multidenoiser's loss during training.")
    train = inputs.report.get("train") or {}
    history = [h for h in train.get("history") or [] if h.get("loss") is not None]
    if not history:
        s.missing = ("No training history in this report (a sampling-only run: an oracle or a model trained "
                     "elsewhere).")
        return s
    s.facts += [("steps", _fmt(history[-1]["step"])), ("final loss", _fmt(float(history[-1]["loss"]), 5))]
    s.figures.append(Fig(_uri(figures.loss_png(history)), "training loss curve"))
    return s


def _redact(obj):
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) else _redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def _provenance(inputs: ReportInputs) -> Section:
    r = inputs.report
    s = Section("provenance", "Run", "What produced these figures.")
    code = r.get("code_version") or {}
    s.facts += [("run", _fmt(r.get("name"))), ("model hash", _fmt(r.get("model_hash"))),
                ("code version", _fmt(code.get("package")) if code else "not recorded"),
                ("git commit", _fmt(code.get("git_commit")) if code else "not recorded")]
    for k, v in (r.get("seeds") or {}).items():
        s.facts.append((f"seed ({k})", _fmt(v)))
    if r.get("config"):
        s.details.append(("Configuration", json.dumps(_redact(r["config"]), indent=2, default=str)))
    else:
        s.notes.append("The run's configuration was not recorded in this report.")
    return s


def _verdict_section(inputs: ReportInputs, verdict: Verdict) -> Section:
    s = Section("verdict", "Verdict", verdict.headline)
    sample = inputs.report.get("sample") or {}
    diag = inputs.report.get("diagnostics") or {}
    s.facts += [("sampling", _fmt(sample.get("status") or "not started")), ("rows", _fmt(sample.get("rows"))),
                ("divergences", _fmt(sample.get("divergences"))), ("criterion", verdict.criterion)]
    s.notes += [f for f in diag.get("flags") or [] if "R-hat" not in f and "ESS" not in f]
    return s


def _state(verdict: Verdict) -> str:
    return {True: "mixed", False: "not-mixed", None: "unknown"}[verdict.mixed]


def render_html(inputs: ReportInputs) -> str:
    """The page for ``inputs`` as a string (see :func:`render_report`)."""
    summaries = functional_summaries(inputs)
    verdict = mixing_verdict(inputs, summaries)
    sections = [_verdict_section(inputs, verdict), _samples(inputs), _filmstrips(inputs),
                _mixing(inputs, summaries), _classes(inputs), _fid(inputs), _training(inputs), _provenance(inputs)]
    name = inputs.report.get("name") or "mmgm run"
    return _env.get_template("report.html.j2").render(
        title=f"{name} \u2014 mmgm report", name=name, state=_state(verdict), in_progress=inputs.in_progress,
        verdict=verdict, sections=sections)


def render_report(inputs: ReportInputs, out_dir: str) -> str:
    """Write ``{out_dir}/report.html`` (a local folder or any fsspec URL; atomically: a reader sees
    the previous page or the new one) and return its path. Images are embedded as data URIs, the
    CSS is inline and there is no script, so the file opens anywhere without a server or network."""
    html = render_html(inputs)
    fs, root = fsspec.core.url_to_fs(str(out_dir))
    path = posixpath.join(root, "report.html")
    atomic_write_bytes(fs, path, html.encode("utf-8"))
    return path if "://" not in str(out_dir) else f"{str(out_dir).rstrip('/')}/report.html"
