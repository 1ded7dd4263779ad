"""Which rows of a run's committed view FID and generation read: deterministic selections.

A selection is computed from small per-chain or per-step summaries of the store (never from the
samples), then applied as a Parquet filter pushed down to the scan plus an exact row test on each
record batch. Both depend only on the rows' (chain_id, jump_index / step) values, so every executor
(this process, or Ray Data with any number of workers and any block boundaries) selects the same rows.

**FID selections** (:func:`plan_fid`), over non-diverged jumps:

* ``last``: the last jump of each of the first ``n`` chains (by chain id): one sample per chain, the
  long-run chain protocol; needs ``n <= chains``.
* ``spread``: ``n`` jumps spread evenly over chains and time. With ``C`` chains and the jump range
  ``lo..hi``, ``k = ceil(n / C)`` jump indices ``t_i = lo + floor(i (hi - lo + 1) / k) - 1``
  (``i = 1..k``, the last is ``hi``) form a grid of ``G = k C`` (jump, chain) cells, numbered
  ``p = i C + (position of the chain)``; the selected cells are ``floor(m G / n)``, ``m = 0..n-1``
  (every ``G/n``-th cell). ``m`` is the row's *rank*. A chain that diverged before ``t_i`` has no
  row there, so fewer than ``n`` rows can come back (the result reports the count).
* ``auto`` (the default of ``mmgm fid``): ``last`` when ``n <= chains``, else ``spread`` over all jumps.

Windows of jump indices (``mmgm_ray.diagnostics.fid.jump_windows``: early/middle/late) get a
``spread`` selection each. A row may belong to several groups (the main selection and a window); it
goes through Inception once and carries a bit mask of its groups.

**Generation** (:func:`plan_generation`): walk steps ``1..burn_in`` are discarded, of the later jumps
every ``thin``-th per chain is kept (steps ``burn_in + i * thin * jump_every``, ``i >= 1``), and
the ``n`` samples are the first ``n`` kept jumps in (step, chain_id) order: round-robin over
chains, the earliest kept steps first. The cut is a filter: every kept step that fits entirely,
plus the chains with the smallest ids at the step where ``n`` runs out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import ray
from ray.data.expressions import Expr, col, lit

from mmgm_ray.diagnostics.fid import jump_windows
from mmgm_ray.postprocess.source import CommittedView

SELECTIONS = ("auto", "last", "spread")
NOT_DIVERGED = col("diverged") == lit(False)


# ---- chain index: per-chain summaries, reduced on the cluster or here ------------------------------

@dataclass(frozen=True, eq=False)
class ChainIndex:
    """Non-diverged jumps per chain: ``chain_ids`` (sorted), ``last_jump`` and ``jumps`` (row count)."""
    chain_ids: np.ndarray
    last_jump: np.ndarray
    jumps: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.jumps.sum())

    @property
    def max_jump(self) -> int:
        return int(self.last_jump.max()) if self.last_jump.size else -1


def index_partial(batch: pa.Table) -> pa.Table:
    """(chain_id, last_jump, jumps) of the chains in one batch of (chain_id, jump_index) rows."""
    ch = batch["chain_id"].to_numpy()
    jp = batch["jump_index"].to_numpy()
    ids, inv = np.unique(ch, return_inverse=True)
    last = np.full(ids.size, -1, dtype=np.int64)
    np.maximum.at(last, inv, jp)
    return pa.table({"chain_id": ids.astype(np.int64), "last_jump": last,
                     "jumps": np.bincount(inv, minlength=ids.size).astype(np.int64)})


def _reduce_index(table: pa.Table) -> ChainIndex:
    ids, inv = np.unique(table["chain_id"].to_numpy(), return_inverse=True)
    last = np.full(ids.size, -1, dtype=np.int64)
    np.maximum.at(last, inv, table["last_jump"].to_numpy())
    jumps = np.bincount(inv, weights=table["jumps"].to_numpy(), minlength=ids.size).astype(np.int64)
    return ChainIndex(ids.astype(np.int64), last, jumps)


def _partials(view: CommittedView, columns: list, where: Expr, partial, on_ray: bool) -> pa.Table:
    """``partial`` (a small summary table of a batch) over every batch of the filtered view,
    concatenated: Ray Data read tasks (one summary per block) or this process. A Ray Data group-by
    would shuffle through aggregator actors (tens of seconds to start); summaries per block are
    small enough to reduce here (about one row per chain or step and part file)."""
    if on_ray:
        ds = view.ray_dataset(columns, filter=where).map_batches(partial, batch_format="pyarrow", batch_size=None)
        parts = ray.get(ds.to_arrow_refs())
    else:
        parts = [partial(pa.Table.from_batches([b])) for b in view.batches(columns, filter=where.to_pyarrow(),
                                                                           batch_rows=1 << 17)]
    parts = [t for t in parts if t.num_rows]
    return pa.concat_tables(parts) if parts else partial(pa.table({c: pa.array([], pa.int64()) for c in columns}))


def chain_index(view: CommittedView, on_ray: bool) -> ChainIndex:
    """The chain index of a run, from its two integer columns (on the cluster or in this process)."""
    return _reduce_index(_partials(view, ["chain_id", "jump_index"], NOT_DIVERGED, index_partial, on_ray))


# ---- FID selections ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """One selection: ``last`` (first ``n`` chains' last jumps) or ``spread`` over jumps ``lo..hi``."""
    name: str
    mode: str
    n: int
    lo: int = 0
    hi: int = 0
    grid: tuple = ()        # spread: the k jump indices t_1..t_k

    @property
    def jumps(self) -> tuple:
        return (self.lo, self.hi)


def spread_group(name: str, n: int, chains: int, lo: int, hi: int) -> Group:
    """A ``spread`` group of ``n`` jumps over ``lo..hi`` (ValueError when the range cannot hold them)."""
    width = hi - lo + 1
    if n > chains * width:
        raise ValueError(f"{name}: n={n} is more than the {chains} chains x {width} jumps "
                         f"(jump_index {lo}..{hi}) it can be drawn from")
    k = math.ceil(n / chains)
    grid = tuple(lo + (i * width) // k - 1 for i in range(1, k + 1))
    return Group(name, "spread", int(n), lo, hi, grid)


@dataclass(frozen=True, eq=False)
class FidSelection:
    """The row groups of one FID computation and the exact row test (see the module docstring)."""
    chain_ids: np.ndarray
    last_jump: np.ndarray
    groups: tuple[Group, ...]
    kid_stride: int = 0       # rows of the main group with rank % kid_stride == 0 keep their features (0: none)

    def pushdown(self) -> Expr:
        """A filter the Parquet scan applies (a superset of the selected rows)."""
        parts = []
        for g in self.groups:
            if g.mode == "last":
                parts.append(self._last_pushdown(g.n))
            else:
                parts.append(col("jump_index").is_in([int(t) for t in g.grid]))
        return NOT_DIVERGED & reduce(lambda a, b: a | b, parts)

    def _last_pushdown(self, n: int) -> Expr:
        # most chains end at the top jump: one equality keeps the scan to those row groups; the
        # few that diverged earlier are listed (a bound on jump_index alone would read them all)
        last, ids = self.last_jump[:n], self.chain_ids[:n]
        top = int(last.max())
        expr = (col("jump_index") == lit(top)) & (col("chain_id") <= lit(int(ids[-1])))
        early = last < top
        if early.any():
            expr = expr | (col("chain_id").is_in([int(c) for c in ids[early]])
                           & col("jump_index").is_in(sorted({int(j) for j in last[early]})))
        return expr

    def _hits(self, g: Group, pos: np.ndarray, valid: np.ndarray, jp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.chain_ids.size
        if g.mode == "last":
            p = np.minimum(pos, c - 1)
            return valid & (pos < g.n) & (self.last_jump[p] == jp), pos
        grid = np.asarray(g.grid, dtype=np.int64)
        i = np.searchsorted(grid, jp)
        on_grid = (i < grid.size) & (grid[np.minimum(i, grid.size - 1)] == jp)
        cells = grid.size * c
        p = i * c + pos
        rank = (p * g.n + cells - 1) // cells
        return valid & on_grid & (rank * cells < (p + 1) * g.n), rank

    def select(self, batch: pa.Table) -> pa.Table:
        """The selected rows of a batch of (chain_id, jump_index, sample), with two more columns:
        ``groups`` (bit g set: the row is in group g) and ``rank`` (in the main group; -1 outside)."""
        ch = batch["chain_id"].to_numpy()
        jp = batch["jump_index"].to_numpy()
        c = self.chain_ids.size
        pos = np.searchsorted(self.chain_ids, ch)
        valid = (pos < c) & (self.chain_ids[np.minimum(pos, c - 1)] == ch)
        bits = np.zeros(len(ch), dtype=np.int64)
        rank = np.full(len(ch), -1, dtype=np.int64)
        for gi, g in enumerate(self.groups):
            hit, r = self._hits(g, pos, valid, jp)
            bits |= hit.astype(np.int64) << gi
            if gi == 0:
                rank = np.where(hit, r, -1)
        keep = np.flatnonzero(bits)
        return pa.table({"chain_id": ch[keep], "jump_index": jp[keep], "sample": batch["sample"].take(keep),
                         "groups": bits[keep], "rank": rank[keep]})


def _resolve_mode(select: str, n: int, chains: int) -> str:
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {list(SELECTIONS)}, got {select!r}")
    if select == "auto":
        return "last" if n <= chains else "spread"
    if select == "last" and n > chains:
        raise ValueError(f"select='last' takes one sample per chain: n={n} is more than the {chains} chains; "
                         f"use select='spread' (jumps across chains and time)")
    return select


def plan_fid(index: ChainIndex, n: int, *, select: str = "auto", min_jump: int = 0, windows: int = 0,
             window_n: Optional[int] = None, kid_max: int = 0, clip: bool = False,
             where: str = "run") -> FidSelection:
    """The FID selection of ``n`` samples (module docstring), plus ``windows`` spread groups of
    ``window_n`` (default ``n``) jumps each over early..late jump windows, and a KID subset of at
    most ``kid_max`` rows of the main group (0: none). ``clip``: ``n``, ``windows`` and ``window_n``
    are upper bounds, reduced to what the store holds (the main job) instead of an error.
    One-line ValueErrors name ``where``."""
    if index.rows == 0:
        raise ValueError(f"{where}: no committed samples (every committed row is a divergence)")
    chains = index.chain_ids.size
    if clip:
        n = min(n, chains if select == "last" else index.rows)
        windows = min(windows, index.max_jump + 1)
    if n < 2:
        raise ValueError(f"n must be >= 2 for a covariance, got {n}")
    if n > index.rows:
        raise ValueError(f"{where}: n={n} is more than the {index.rows} committed samples the store holds")
    mode = _resolve_mode(select, n, chains)
    if mode == "last":
        main = Group("all", "last", int(n), int(index.last_jump[:n].min()), int(index.last_jump[:n].max()))
    else:
        if not 0 <= min_jump <= index.max_jump:
            raise ValueError(f"min_jump must be in 0..{index.max_jump} (the last jump), got {min_jump}")
        main = spread_group("all", n, chains, int(min_jump), index.max_jump)
    groups = [main]
    if windows:
        if windows > 61:
            raise ValueError(f"at most 61 windows, got {windows}")
        spans = jump_windows(index.max_jump + 1, int(windows))
        wn = int(window_n or n)
        if clip:
            wn = min([wn] + [chains * (hi - lo + 1) for lo, hi in spans.values()])
        if wn < 2:
            raise ValueError(f"window_n must be >= 2, got {wn}")
        groups += [spread_group(f"window {name}", wn, chains, lo, hi) for name, (lo, hi) in spans.items()]
    stride = max(1, math.ceil(n / kid_max)) if kid_max else 0
    return FidSelection(index.chain_ids, index.last_jump, tuple(groups), stride)


# ---- generation ----------------------------------------------------------------------------------------

def kept_steps(burn_in: int, thin: int, jump_every: int, max_step: int) -> list[int]:
    """Walk steps whose jumps generation keeps: ``burn_in + i * thin * jump_every``, ``i >= 1``."""
    stride = thin * jump_every
    return list(range(burn_in + stride, max_step + 1, stride))


def _step_partial(batch: pa.Table) -> pa.Table:
    steps, counts = np.unique(batch["step"].to_numpy(), return_counts=True)
    return pa.table({"step": steps.astype(np.int64), "rows": counts.astype(np.int64)})


def step_counts(view: CommittedView, steps: Sequence[int], on_ray: bool) -> dict[int, int]:
    """Non-diverged rows at each of ``steps`` (on the cluster or in this process)."""
    where = NOT_DIVERGED & col("step").is_in([int(s) for s in steps])
    t = _partials(view, ["step"], where, _step_partial, on_ray)
    counts: dict[int, int] = {}
    for s, k in zip(t["step"].to_pylist(), t["rows"].to_pylist()):
        counts[s] = counts.get(s, 0) + k
    return counts


def _chains_at(view: CommittedView, step: int) -> np.ndarray:
    """Sorted chain ids with a non-diverged row at ``step`` (at most one per chain: small)."""
    where = (NOT_DIVERGED & (col("step") == lit(int(step)))).to_pyarrow()
    ids = [b["chain_id"].to_numpy() for b in view.batches(["chain_id"], filter=where)]
    return np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def plan_generation(view: CommittedView, n: int, burn_in: int, thin: int, jump_every: int,
                    on_ray: bool = True) -> tuple[Optional[Expr], int]:
    """The filter selecting the first ``n`` kept jumps in (step, chain_id) order, and how many
    rows it selects (fewer than ``n`` when the store holds fewer; ``(None, 0)`` when none)."""
    max_step = int(view.manifest.get("progress", {}).get("max_last_step") or 0)
    steps = kept_steps(burn_in, thin, jump_every, max_step)
    chains = ((view.manifest.get("config") or {}).get("pool") or {}).get("num_chains")
    # count the steps n needs when every chain is alive first; the rest only if chains diverged
    first = len(steps) if not chains else min(len(steps), math.ceil(n / int(chains)) + 1)
    counts = step_counts(view, steps[:first], on_ray) if steps else {}
    if first < len(steps) and sum(counts.values()) < n:
        counts.update(step_counts(view, steps[first:], on_ray))
    full, total, boundary = [], 0, None
    for s in steps:
        if total == n:
            break
        k = counts.get(s, 0)
        if total + k > n:
            boundary = s          # n runs out inside this step
            break
        full.append(s)
        total += k
    parts = [col("step").is_in(full)] if total else []
    if boundary is not None and total < n:
        cut = _chains_at(view, boundary)[n - total - 1]
        parts.append((col("step") == lit(int(boundary))) & (col("chain_id") <= lit(int(cut))))
        total = n
    if not parts:
        return None, 0
    return NOT_DIVERGED & reduce(lambda a, b: a | b, parts), total
