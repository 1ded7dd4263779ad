"""``mmgm diagnose RUN``: mixing diagnostics of a run at cluster scale.

Three stages, each a progress line, each in this process (``executor="local"``) or on the Ray
cluster this process joined (``executor="ray"``) with the same functions:

1. the functionals table (``mmgm_ray.postprocess.table``): brought up to the run's committed
   view, reading only the parts committed since the last pass (Ray Data on the cluster);
2. the chain layout (``mmgm_ray.postprocess.reduce``): which chains have every jump of the window;
3. the reductions: one task per functional (R-hat, ESS, MCSE, tau, batch-means ESS, nested
   R-hat) and one for the class transitions; the driver receives their summaries only.

The driver's memory does not grow with the store: it holds the manifest, the table index, one
entry per chain of the layout and the summaries.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mmgm_ray.diagnostics.functionals import SCALARS, FunctionalsRequest
from mmgm_ray.diagnostics.mixing import mixing_report
from mmgm_ray.postprocess.reduce import Layout, Window, functional_array, run_reductions, table_layout
from mmgm_ray.postprocess.source import CommittedView, open_committed
from mmgm_ray.postprocess.table import FunctionalsTable, open_table, update_table

__all__ = ["DEFAULT_STATS", "run_request", "diagnose", "load_functionals", "export_functionals"]

DEFAULT_STATS = ("score_norm", "kinetic", "mean_intensity", "pc", "proj")
SAMPLER_STATS = ("score_norm", "kinetic")   # sampler quantities, not functionals of the sample


def run_request(view: CommittedView, stats: Sequence[str] = DEFAULT_STATS, *, n_random: int = 4, n_pcs: int = 4,
                seed: int = 0, data: Optional[dict] = None, classes: bool = False,
                classifier: Optional[dict] = None) -> FunctionalsRequest:
    """The functionals to compute for a run: ``stats`` among score_norm, kinetic, mean_intensity,
    pc (``n_pcs`` principal components), proj (``n_random`` random projections); ``data`` (a
    DataConfig dict; default: the data the run's recorded config names) for the principal
    components and, with ``classes``, the classifier. Without a data config there are no
    principal components."""
    unknown = set(stats) - set(DEFAULT_STATS)
    if unknown:
        raise ValueError(f"unknown stats {sorted(unknown)}; known: {', '.join(DEFAULT_STATS)}")
    if data is None:
        data = ((view.manifest.get("config") or {}).get("data")) or None
    n_pcs = n_pcs if "pc" in stats and data is not None else 0
    if classes and data is None:
        raise ValueError(f"{view.run_url}: classes need a labelled data set and the run records none; name one "
                         "(--classes DATASET)")
    return FunctionalsRequest(scalars=tuple(s for s in SCALARS if s in stats), n_random=n_random if "proj" in stats
                              else 0, seed=seed, n_pcs=n_pcs, data=data if (n_pcs or classes) else None,
                              classes=classes, classifier=dict(classifier or {}))


def _meta(view: CommittedView, layout: Layout, update, window: Window) -> dict:
    spec = update.table.spec
    meta = {"run_id": view.manifest["run_id"], "run": view.run_url, "event_shape": list(view.info["shape"]),
            "chains": int(layout.chain_ids.size), "chains_used": int(layout.used.size), "draws": int(layout.draws),
            "burn_in": int(window.burn_in), "divergences": int(view.manifest.get("divergences", {}).get("count", 0)),
            "functionals": {"columns": update.table.columns, "rows": update.table.num_rows,
                            "parts": sum(len(s["sources"]) for s in update.table.index["segments"]),
                            "parts_processed": update.parts_processed, "rows_processed": update.rows_processed,
                            "rebuilt": update.rebuilt, "digest": update.table.index["digest"]}}
    if spec.classifier:
        meta["classifier"] = {k: spec.classifier[k] for k in ("accuracy", "holdout", "num_classes", "sha256")}
    if spec.pca:
        meta["pca"] = {"k": spec.pca["k"], "variances": spec.pca["variances"], "sha256": spec.pca["sha256"]}
    return meta


def diagnose(run_url: str, request: Optional[FunctionalsRequest] = None, *, window: Window = Window(),
             executor: str = "ray", rhat_threshold: float = 1.01, min_ess: float = 400.0, superchain_size: int = 16,
             rebuild: bool = False, num_gpus: float = 0.0, concurrency: Optional[int] = None,
             actors: Optional[bool] = None, cache_dir: Optional[str] = None, storage_options: Optional[dict] = None,
             progress: bool = True) -> dict:
    """The mixing report of a run (JSON-able dict; :func:`mmgm_ray.diagnostics.mixing.mixing_report`
    documents its keys and flags), with ``functionals`` (what the table pass did), ``classifier``
    (held-out accuracy) and ``pca`` sections.

    ``request``: the functionals (default :func:`run_request` of the run: scalars, 4 principal
    components of the recorded data set, 4 random projections); ``window``: burn-in and caps;
    ``executor``: ``"ray"`` (the cluster this process joined) or ``"local"``; ``num_gpus``,
    ``concurrency``, ``actors``: the functionals pass on Ray (:func:`update_table`);
    ``superchain_size``: chains per superchain of nested R-hat (0: off). One-line ValueError for a
    path without a run or a run with nothing committed, before anything is written."""
    view = open_committed(run_url, storage_options)
    request = request if request is not None else run_request(view)
    update = update_table(view, request, executor=executor, rebuild=rebuild, num_gpus=num_gpus,
                          concurrency=concurrency, actors=actors, cache_dir=cache_dir, progress=progress)
    table = update.table
    layout = table_layout(table, window, executor=executor, progress=progress)
    entries, transitions = {}, None
    if layout.used.size >= 1 and layout.draws >= 4:
        cls = table.spec.classifier
        classes = (cls["num_classes"], cls["class_frequencies"]) if cls else None
        columns = [c for c in table.columns if c != "class_label"]
        entries, transitions = run_reductions(table, layout, columns, executor=executor,
                                              superchain_size=superchain_size, classes=classes, progress=progress)
    return mixing_report(_meta(view, layout, update, window), entries, transitions,
                         rhat_threshold=rhat_threshold, min_ess=min_ess)


def load_functionals(run_url: str, names: Optional[Sequence[str]] = None, *, window: Window = Window(),
                     complete_only: bool = False, storage_options: Optional[dict] = None
                     ) -> tuple[dict, np.ndarray, np.ndarray]:
    """(name -> (chains, draws) float64 array, NaN where a jump is missing; chain_ids; jump_index)
    from the run's committed functionals table (in this process: for the report and ArviZ, which
    want the arrays). ``names``: functional columns (default all); ``complete_only``: only the
    chains with every jump of the window (those the diagnostics use). One-line ValueError when the
    run has no usable table (``mmgm diagnose RUN`` builds it)."""
    table = open_table(run_url, storage_options)
    names = list(names) if names is not None else table.columns
    missing = [n for n in names if n not in table.columns]
    if missing:
        raise ValueError(f"{run_url}: functionals {missing} are not in the table (it has {table.columns})")
    layout = table_layout(table, window, executor="local", progress=False)
    out = {n: functional_array(table, n, layout, complete=complete_only).astype(np.float64) for n in names}
    ids = layout.used if complete_only else layout.chain_ids
    return out, ids, np.arange(layout.start, layout.start + layout.draws)


def export_functionals(run_url: str, path: str, *, window: Window = Window(),
                       storage_options: Optional[dict] = None) -> str:
    """Write the complete chains' functionals of the window as ArviZ ``InferenceData`` (netCDF):
    the functionals of the sample in ``posterior``, the score norm and kinetic energy in
    ``sample_stats`` (``mmgm_ray.report.export_arviz``). The driver holds them while writing."""
    # imported here: the report extra (arviz, h5netcdf) is optional and only this export needs it
    from mmgm_ray.report import export_arviz
    arrays, ids, jumps = load_functionals(run_url, window=window, complete_only=True, storage_options=storage_options)
    post = {k: v for k, v in arrays.items() if k not in SAMPLER_STATS}
    stats = {k: v for k, v in arrays.items() if k in SAMPLER_STATS}
    if not post:
        post, stats = stats, {}
    table: FunctionalsTable = open_table(run_url, storage_options)
    return export_arviz(path, post, stats or None, chain_ids=ids, jump_index=jumps,
                        attrs={"run": str(run_url), "functionals_digest": table.index["digest"]})

