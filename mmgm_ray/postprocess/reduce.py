"""Reductions of the functionals table: the chain layout, then one reduction per functional (and
one for the class transitions), as Ray tasks or in this process, with the same functions.

Each reduction reads only its columns (chain_id, jump_index and its functional) from the table,
scatters them into a ``(chains, draws)`` float64 array of the complete chains of the window and
returns :func:`mmgm_ray.diagnostics.mixing.functional_summary`: a task holds one functional at a
time (10^4 x 10^4 draws: 800 MB plus the working copies of the R-hat/ESS code) and the driver
only summaries. The layout is reduced the same way, file groups in parallel, into sorted chain
ids, the window and the complete chains (a few arrays of one entry per chain).

The array a reduction sees does not depend on where or in which order the table's rows are read
(a scatter), so both executors give the same figures to the last bit.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow.compute as pc
import ray

from mmgm_ray.cluster import require_ray
from mmgm_ray.diagnostics.mixing import functional_summary
from mmgm_ray.diagnostics.transitions import transition_report
from mmgm_ray.postprocess.table import FunctionalsTable
from mmgm_ray.preflight import ResourceRequest, Verdict, decide, discover_capacity
from mmgm_ray.progress import Stage

__all__ = ["Window", "Layout", "partial_layout", "merge_layout", "functional_array", "reduce_functional",
           "reduce_classes", "table_layout", "run_reductions"]

_WORKING_COPIES = 10     # a reduction holds ~10 arrays of (chains, draws) float64 at its peak


@dataclass(frozen=True)
class Window:
    """Which jumps are diagnosed: ``jump_index >= burn_in``, at most ``max_draws`` of them, over the
    first ``max_chains`` chains (by chain id)."""
    burn_in: int = 0
    max_draws: Optional[int] = None
    max_chains: Optional[int] = None

    def __post_init__(self):
        if int(self.burn_in) < 0:
            raise ValueError(f"burn_in must be >= 0, got {self.burn_in}")
        for name in ("max_draws", "max_chains"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")


@dataclass(frozen=True)
class Layout:
    """Chains and window of a diagnosis: ``chain_ids`` every chain considered (sorted), ``used``
    those with every jump of ``[start, start + draws)`` (the complete chains)."""
    chain_ids: np.ndarray
    used: np.ndarray
    start: int
    draws: int


def partial_layout(table: FunctionalsTable, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over ``table``'s files: (chain ids, rows in the window per chain, last jump per chain),
    folded batch by batch so the task holds a few entries per chain whatever the table's size."""
    acc = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    lo, hi = int(window.burn_in), None if window.max_draws is None else int(window.burn_in) + int(window.max_draws)
    for b in table.batches(["chain_id", "jump_index"]):
        ch, jp = b.column("chain_id").to_numpy(), b.column("jump_index").to_numpy()
        inside = (jp >= lo) & (jp < hi if hi is not None else True)
        acc = _combine(np.concatenate([acc[0], ch]), np.concatenate([acc[1], inside.astype(np.int64)]),
                       np.concatenate([acc[2], jp]))
    return acc


def _combine(ids: np.ndarray, counts: np.ndarray, lasts: np.ndarray) -> tuple:
    u, inv = np.unique(ids, return_inverse=True)
    last = np.full(u.size, -1, np.int64)
    np.maximum.at(last, inv, lasts)
    return u, np.bincount(inv, weights=counts, minlength=u.size).astype(np.int64), last


def merge_layout(partials: Sequence[tuple], window: Window) -> Layout:
    """The :class:`Layout` from the partial layouts of disjoint file groups."""
    parts = [p for p in partials if p[0].size]
    if not parts:
        return Layout(np.zeros(0, np.int64), np.zeros(0, np.int64), int(window.burn_in), 0)
    ids, counts, lasts = _combine(*(np.concatenate(x) for x in zip(*parts)))
    if window.max_chains is not None:
        ids, counts, lasts = ids[:window.max_chains], counts[:window.max_chains], lasts[:window.max_chains]
    n = max(0, int(lasts.max()) + 1 - int(window.burn_in))
    if window.max_draws is not None:
        n = min(n, int(window.max_draws))
    used = ids[counts == n] if n else np.zeros(0, np.int64)
    return Layout(ids, used, int(window.burn_in), n)


def _scatter(table: FunctionalsTable, column: str, ids: np.ndarray, start: int, out: np.ndarray,
             complete: bool) -> None:
    """Fill ``out`` (len(ids), draws) with ``column`` at (chain, jump_index - start); ``complete``:
    every cell must be filled exactly once (the complete chains of a layout)."""
    if not ids.size or not out.shape[1]:
        return
    expr = (pc.field("jump_index") >= start) & (pc.field("jump_index") < start + out.shape[1]) & \
        (pc.field("chain_id") >= int(ids[0])) & (pc.field("chain_id") <= int(ids[-1]))
    filled = 0
    for b in table.batches(["chain_id", "jump_index", column], filter=expr):
        ch = b.column("chain_id").to_numpy()
        pos = np.minimum(np.searchsorted(ids, ch), ids.size - 1)
        ok = ids[pos] == ch
        out[pos[ok], b.column("jump_index").to_numpy()[ok] - start] = b.column(column).to_numpy()[ok]
        filled += int(ok.sum())
    if complete and filled != out.size:
        raise RuntimeError(f"functionals table of {table.run_url}: {filled} values of {column!r} for "
                           f"{out.shape[0]} complete chains x {out.shape[1]} jumps (duplicate rows); rebuild it "
                           f"with `mmgm diagnose --rebuild`")


def functional_array(table: FunctionalsTable, column: str, layout: Layout, complete: bool = True) -> np.ndarray:
    """(chains, draws) float64 array of one functional over the window: the complete chains
    (``layout.used``), or with ``complete=False`` every chain (``layout.chain_ids``), NaN where a
    jump is missing."""
    ids = layout.used if complete else layout.chain_ids
    x = np.full((ids.size, layout.draws), np.nan)
    _scatter(table, column, ids, layout.start, x, complete)
    return x


def reduce_functional(table: FunctionalsTable, column: str, layout: Layout, superchain_size: int) -> dict:
    """The figures of one functional (:func:`mmgm_ray.diagnostics.mixing.functional_summary`)."""
    return functional_summary(functional_array(table, column, layout), superchain_size)


def reduce_classes(table: FunctionalsTable, layout: Layout, num_classes: int, reference) -> dict:
    """Class transitions, visits, dwell times and occupancy of the complete chains
    (:func:`mmgm_ray.diagnostics.transitions.transition_report`)."""
    labels = np.full((layout.used.size, layout.draws), -1, np.int64)
    _scatter(table, "class_label", layout.used, layout.start, labels, True)
    return transition_report(labels, num_classes, reference)


# ---- executors -----------------------------------------------------------------------------------

def _check_feasible(bundle: dict, what: str) -> None:
    """One-line ValueError when no node of the cluster can ever run one task of ``bundle``. The
    functionals pass waited for the cluster already (``preflight.ensure_resources``); tasks that fit
    but find the CPUs busy queue in Ray until the previous stage's workers let go of them."""
    d = decide(ResourceRequest.uniform(1, bundle, what=what), discover_capacity())
    if d.verdict is Verdict.NEVER:
        raise ValueError(d.message)


def _run(calls: list, executor: str, name: str, progress: bool, memory: float = 0.0) -> list:
    """``[fn(*args) for fn, args in calls]`` here, or as Ray tasks (one CPU each, ``memory`` bytes
    reserved) with the driver receiving only their results."""
    with Stage(name, total=len(calls), unit="tasks", enabled=progress) as stage:
        if executor == "local":
            out = []
            for fn, args in calls:
                out.append(fn(*args))
                stage.update(1)
            return out
        require_ray(f"the {name} on Ray")
        _check_feasible({"CPU": 1.0, **({"memory": float(memory)} if memory else {})}, f"diagnose {name} (one task)")
        refs, remotes, stored = [], {}, {}
        for fn, args in calls:
            for a in args:  # the table and layout go to the object store once, not once per task
                if isinstance(a, (FunctionalsTable, Layout)) and id(a) not in stored:
                    stored[id(a)] = ray.put(a)
            if fn not in remotes:
                remotes[fn] = ray.remote(fn).options(num_cpus=1, memory=memory or None, max_retries=1)
            refs.append(remotes[fn].remote(*(stored.get(id(a), a) for a in args)))
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            stage.update(len(done))
        return ray.get(refs)


def table_layout(table: FunctionalsTable, window: Window, *, executor: str = "ray", groups: int = 0,
                 progress: bool = True) -> Layout:
    """The layout of the table's rows, ``groups`` file groups reduced in parallel (0: one group per
    cluster CPU on Ray, one in this process)."""
    if executor == "ray" and not groups:
        require_ray("the chain layout on Ray")
        groups = max(1, int(ray.cluster_resources().get("CPU", 1)))
    groups = max(1, min(groups or 1, len(table.files)))
    subsets = [dataclasses.replace(table, files=table.files[g::groups]) for g in range(groups)]
    partials = _run([(partial_layout, (t, window)) for t in subsets], executor, "chain layout", progress)
    return merge_layout(partials, window)


def run_reductions(table: FunctionalsTable, layout: Layout, columns: Sequence[str], *, executor: str = "ray",
                   superchain_size: int = 16, classes: Optional[tuple] = None,
                   progress: bool = True) -> tuple[dict, Optional[dict]]:
    """(column -> figures, transitions or None): one reduction per column, plus the transitions
    when ``classes = (num_classes, reference)``."""
    calls: list[tuple[Callable, tuple]] = [(reduce_functional, (table, c, layout, superchain_size)) for c in columns]
    if classes is not None:
        calls.append((reduce_classes, (table, layout, *classes)))
    memory = _WORKING_COPIES * 8.0 * layout.used.size * layout.draws + (64 << 20)
    out = _run(calls, executor, "reductions", progress, memory if executor == "ray" else 0.0)
    return dict(zip(columns, out[:len(columns)])), (out[-1] if classes is not None else None)
