"""``mmgm report RUN``: the inputs of ``report.html`` read from a run on disk (or any fsspec URL).

A sampling run folder holds everything the page shows, each part optional:

* ``manifest.json``: config, seeds, model hash, code version, and progress (rows, divergences,
  ``status``: a run whose status is not ``done`` is shown as in progress);
* ``report.json`` (written by ``mmgm run`` after every stage): the training summary, the mixing
  diagnostics (:func:`mmgm_ray.postprocess.diagnose`) and FID with its windows;
* ``functionals/``: the diagnose functionals table (:func:`load_functionals`): traces, rank plots,
  autocorrelations, and each jump's class when a classifier labelled them (class transitions and
  frequencies come from there when the report has none: runs shorter than 4 draws per chain);
* the store's committed parts: the final (or, in progress, latest) jumps and the filmstrips
  (:func:`open_committed`, :func:`decode_samples`), read with a filter on a few chains only;
* the training run's ``metrics.jsonl`` (the folder of the recorded ``model_path``): the loss curve.

A missing part leaves its section of the page explaining why (no labels, no FID, diagnostics not
run, sampling in progress); only a folder with neither a manifest nor a ``report.json`` is an
error (one-line ValueError). Reading is done in this process without starting Ray; the driver
holds at most ``max_chains`` chains of functionals and ``n_final`` + a filmstrip of images.
"""
from __future__ import annotations

import json
import posixpath
from typing import Optional

import numpy as np
import pyarrow.compute as pc

from mmgm_ray.diagnostics import transitions
from mmgm_ray.postprocess.diagnose import load_functionals
from mmgm_ray.postprocess.reduce import Window
from mmgm_ray.postprocess.source import CommittedView, decode_samples, open_committed
from mmgm_ray.postprocess.table import open_table
from mmgm_ray.store import fsutil, load_manifest
from mmgm_ray.train.loop import read_metrics

__all__ = ["resolve_run", "run_report_dict", "run_inputs", "write_run_report"]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
# the report plots at most 512 chains (autocorrelation); more would only cost driver memory
MAX_CHAINS = 512


def resolve_run(run: str, storage_options: Optional[dict] = None) -> str:
    """The sampling run of ``run``: the folder itself when it holds a manifest or a report.json,
    else ``{run}-samples`` (``mmgm run`` names its sampling run after the training run), else a
    one-line ValueError."""
    run = str(run).rstrip("/")
    for url in (run, f"{run}-samples"):
        fs, path = fsutil.resolve(url, storage_options)
        if any(fsutil.exists(fs, posixpath.join(path, f)) for f in ("manifest.json", REPORT_JSON)):
            return url
    raise ValueError(f"no run at {run}: neither a manifest.json nor a {REPORT_JSON} there (nor in {run}-samples)")


def _read_json(url: str, storage_options: Optional[dict]) -> Optional[dict]:
    fs, path = fsutil.resolve(url, storage_options)
    if not fsutil.exists(fs, path):
        return None
    try:
        obj = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{url} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{url} is not a JSON object")
    return obj


def _sample_section(man: dict, recorded: dict) -> dict:
    """The sampling section: the report's, brought up to date from the manifest (the store's
    truth). A manifest without ``status`` (a store written without the pool) is done when every
    block it lists is done."""
    prog, status = man.get("progress") or {}, man.get("status")
    if status is None:
        status = "done" if prog.get("blocks") and prog.get("blocks_done") == prog.get("blocks") else "running"
    return {**recorded, "status": status, "rows": prog.get("rows", recorded.get("rows")),
            "samples": prog.get("samples", recorded.get("samples")),
            "divergences": (man.get("divergences") or {}).get("count", recorded.get("divergences"))}


def _train_section(report: dict, config: dict) -> dict:
    """The training section with its loss history from the training run's ``metrics.jsonl``."""
    train = dict(report.get("train") or {})
    model_path = train.get("artifact") or config.get("model_path")
    if model_path and not train.get("history"):
        try:
            train["history"] = read_metrics(posixpath.dirname(str(model_path)))
        except (OSError, ValueError):  # a training run moved or unreadable: the page says there is no history
            train["history"] = []
    return train


def run_report_dict(run_url: str, storage_options: Optional[dict] = None) -> dict:
    """The run's report (``mmgm_ray.report.ReportInputs`` contract): its ``report.json`` when
    there is one, with config, seeds, model hash, code version and sampling progress from the
    manifest, and the training loss history."""
    report = _read_json(f"{run_url}/{REPORT_JSON}", storage_options) or {}
    man = load_manifest(run_url, storage_options) or {}
    if not report and not man:
        raise ValueError(f"no run at {run_url}: neither a manifest.json nor a {REPORT_JSON} there")
    config = man.get("config") or report.get("config") or {}
    report.setdefault("name", config.get("name") or man.get("run_id") or posixpath.basename(run_url))
    for key in ("seeds", "model_hash", "code_version"):
        if report.get(key) is None and man.get(key) is not None:
            report[key] = man[key]
    if report.get("seeds") is None and config.get("seed") is not None:
        report["seeds"] = {"run": config["seed"]}
    report["config"] = config
    if man:
        report["sample"] = _sample_section(man, report.get("sample") or {})
    report["train"] = _train_section(report, config)
    return report


def _functionals(run_url: str, report: dict, storage_options: Optional[dict]):
    """(functionals, class labels or None, chain ids, jump index) over the diagnostics' window, or
    Nones when the run has no functionals table yet."""
    diag = report.get("diagnostics") or {}
    window = Window(burn_in=int(diag.get("burn_in") or 0), max_chains=MAX_CHAINS)
    try:
        arrays, ids, jumps = load_functionals(run_url, window=window, storage_options=storage_options)
    except ValueError:  # no table: `mmgm diagnose` has not run; the mixing section says so
        return {}, None, None, None
    labels = arrays.pop("class_label", None)
    arrays.pop("class_conf", None)   # the classifier's confidence is not a mixing functional
    if labels is not None:
        labels = np.where(np.isfinite(labels), labels, -1).astype(np.int64)
    return arrays, labels, ids, jumps


def _class_stats(run_url: str, report: dict, labels: Optional[np.ndarray], storage_options) -> dict:
    """Class transitions and frequencies from the table's class labels (complete chains of the
    window) when the report has none: diagnostics skip them below 4 draws per chain, or were not
    recorded in a report.json, yet the classifier labelled every jump."""
    if labels is None or (report.get("diagnostics") or {}).get("transitions"):
        return {}
    labels = labels[(labels >= 0).all(axis=1)]
    cls = open_table(run_url, storage_options).spec.classifier or {}
    if not labels.size or not cls.get("num_classes"):
        return {}
    k, ref = int(cls["num_classes"]), cls.get("class_frequencies")
    occ = transitions.class_occupancy(labels, ref, k)
    out = {"class_frequencies": occ["occupancy"], "data_class_frequencies": ref}
    if labels.shape[1] >= 2:
        out["transition_matrix"] = transitions.transition_matrix(labels, k)
    return out


def _jump_keys(view: CommittedView, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(chain_id, jump_index) of every non-diverged jump of the chains with id below ``limit``."""
    where = (pc.field("chain_id") < limit) & ~pc.field("diverged")
    ch, jp = [], []
    for b in view.batches(["chain_id", "jump_index"], filter=where):
        ch.append(b.column("chain_id").to_numpy())
        jp.append(b.column("jump_index").to_numpy())
    return (np.concatenate(ch), np.concatenate(jp)) if ch else (np.zeros(0, np.int64), np.zeros(0, np.int64))


def _read_images(view: CommittedView, wanted: dict) -> dict:
    """{(chain_id, jump_index): image} of the ``wanted`` keys (a filter on their chains and jumps
    pushed to the scan, the exact pairs picked here)."""
    chains = sorted({c for c, _ in wanted})
    jumps = sorted({j for _, j in wanted})
    where = pc.field("chain_id").isin(chains) & pc.field("jump_index").isin(jumps) & ~pc.field("diverged")
    out = {}
    for b in view.batches(["chain_id", "jump_index", "sample"], filter=where, batch_rows=1024):
        x = decode_samples(b, view.info)
        for i, key in enumerate(zip(b.column("chain_id").to_pylist(), b.column("jump_index").to_pylist())):
            if key in wanted:
                out[key] = np.clip(x[i], 0.0, 1.0)
    return out


def _strip_chains(ids: np.ndarray, last: np.ndarray, labels: Optional[np.ndarray], label_ids, k: int) -> np.ndarray:
    """Up to ``k`` chains for the filmstrips: with class labels, those that change class most (a
    person sees chains walk between classes), else the longest; ties by chain id."""
    score = last.astype(np.float64)
    if labels is not None and label_ids is not None:
        switches = dict(zip(label_ids.tolist(), ((labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] >= 0)).sum(1)))
        score = np.array([switches.get(int(c), -1) for c in ids], dtype=np.float64)
    order = np.lexsort((ids, -score))
    return np.sort(ids[order[:k]])


def _images(view: CommittedView, labels, label_ids, n_final: int, strip: int, frames: int) -> dict:
    """Final (latest) jumps of the first ``n_final`` chains and a filmstrip of ``strip`` chains."""
    shape = tuple(view.info["shape"])
    if len(shape) != 3 or shape[0] not in (1, 3):
        return {}
    ch, jp = _jump_keys(view, max(n_final, MAX_CHAINS))
    if not ch.size:
        return {}
    ids, inv = np.unique(ch, return_inverse=True)
    last = np.full(ids.size, -1, np.int64)
    np.maximum.at(last, inv, jp)
    final = {(int(c), int(j)) for c, j in zip(ids[:n_final], last[:n_final])}
    rows = _strip_chains(ids, last, labels, label_ids, strip)
    end = int(last[np.isin(ids, rows)].min())
    cols = np.unique(np.linspace(0, end, min(frames, end + 1)).round().astype(np.int64))
    film = {(int(c), int(j)) for c in rows for j in cols}
    got = _read_images(view, final | film)
    out = {"final_jumps": np.stack([got[k] for k in sorted(final) if k in got])}
    if all(k in got for k in film):
        out.update(filmstrip=np.stack([np.stack([got[(int(c), int(j))] for j in cols]) for c in rows]),
                   filmstrip_chain_ids=rows, filmstrip_jumps=cols)
    return out


def _film_labels(run_url: str, chains: np.ndarray, jumps: np.ndarray, storage_options) -> Optional[np.ndarray]:
    """The classifier's class of every filmstrip frame (-1 where the table has none)."""
    table = open_table(run_url, storage_options)
    if "class_label" not in table.columns:
        return None
    lab = np.full((chains.size, jumps.size), -1, np.int64)
    where = pc.field("chain_id").isin(chains.tolist()) & pc.field("jump_index").isin(jumps.tolist())
    for b in table.batches(["chain_id", "jump_index", "class_label"], filter=where):
        r = np.searchsorted(chains, b.column("chain_id").to_numpy())
        c = np.searchsorted(jumps, b.column("jump_index").to_numpy())
        lab[r, c] = b.column("class_label").to_numpy()
    return lab


def run_inputs(run: str, *, storage_options: Optional[dict] = None, n_final: int = 64, strip_chains: int = 5,
               frames: int = 10):
    """:class:`mmgm_ray.report.ReportInputs` of the run at ``run`` (a sampling run folder or URL,
    or the training run whose ``-samples`` run to show): see the module docstring."""
    # imported here: the report extra (jinja2, matplotlib, arviz) is optional and only reports need it
    from mmgm_ray.report import ReportInputs

    run_url = resolve_run(run, storage_options)
    report = run_report_dict(run_url, storage_options)
    functionals, labels, ids, jumps = _functionals(run_url, report, storage_options)
    try:
        view = open_committed(run_url, storage_options)
    except ValueError:  # no manifest or nothing committed yet: the page has no images
        view = None
    images = _images(view, labels, ids, n_final, strip_chains, frames) if view is not None else {}
    if "filmstrip" in images and labels is not None:
        images["filmstrip_labels"] = _film_labels(run_url, images["filmstrip_chain_ids"], images["filmstrip_jumps"],
                                                  storage_options)
    images.update(_class_stats(run_url, report, labels, storage_options))
    diag = report.get("diagnostics") or {}
    thresholds = {k: float(diag[k]) for k in ("rhat_threshold", "min_ess") if diag.get(k) is not None}
    if thresholds.get("rhat_threshold", 2.0) <= 1.0:
        thresholds.pop("rhat_threshold")
    return ReportInputs(report=report, functionals=functionals, chain_ids=ids, jump_index=jumps, **images,
                        **thresholds)


def write_run_report(run: str, out: Optional[str] = None, *, storage_options: Optional[dict] = None,
                     **kwargs) -> str:
    """Render the run's ``report.html`` to ``out`` (a file path or URL; default
    ``{run}/report.html``) atomically, and return where it went."""
    # imported here: the report extra (jinja2, matplotlib, arviz) is optional and only reports need it
    from mmgm_ray.report import render_html

    run_url = resolve_run(run, storage_options)
    html = render_html(run_inputs(run_url, storage_options=storage_options, **kwargs))
    out = out or f"{run_url}/{REPORT_HTML}"
    fs, path = fsutil.resolve(out, storage_options if "://" in out else None)
    fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    fsutil.atomic_write_bytes(fs, path, html.encode("utf-8"))
    return out
