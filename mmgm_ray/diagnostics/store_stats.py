"""Per-jump scalar summaries read from a run's Parquet store, and the ``diagnose`` report.

The store holds one row per (chain, jump) with the jumped sample (schema v1, see
``mmgm_ray/store/SCHEMA.md``). Mixing diagnostics need (chains, draws) arrays of scalars, so each
row is reduced to a few numbers as soon as its record batch is read (score norm, kinetic energy,
mean intensity, projections on fixed random unit directions, a class label) and only those are
kept: 10^4 chains x 10^3 jumps of 784-d samples never sit in memory at once (one batch of
``batch_rows`` samples does, plus float32 (chains, draws) arrays per scalar).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmgm_ray.config import DataConfig
from mmgm_ray.data import ImageDataset, load_dataset
from mmgm_ray.diagnostics import mcmc, transitions
from mmgm_ray.store import dequantize, open_dataset, schema_info

__all__ = ["chain_index", "chain_arrays", "iter_sample_batches", "nearest_mean_classifier", "diagnose",
           "format_report", "DEFAULT_STATS"]

DEFAULT_STATS = ("score_norm", "kinetic", "mean_intensity", "proj")
_SCALAR_COLUMNS = ("score_norm", "kinetic")
# pyarrow's scanner reads ahead 16 batches x 4 files by default (~1 GB of decoded 784-d samples);
# one of each keeps the footprint at a batch or two while the reduction is CPU-bound anyway
_LOW_MEMORY = {"batch_readahead": 1, "fragment_readahead": 1}


def _dataset(run_root: str, storage_options: dict | None):
    dataset = open_dataset(run_root, storage_options=storage_options)
    return dataset, schema_info(dataset.schema)


def _decode(batch: pa.RecordBatch, info: dict) -> np.ndarray:
    """(n, prod(shape)) float32 samples of a record batch (uint8 divided by 255)."""
    col = batch.column("sample")
    d = math.prod(info["shape"])
    flat = col.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slice offsets
    return dequantize(flat.reshape(len(col), d), info["sample_dtype"])


def chain_index(run_root: str, *, storage_options: dict | None = None, batch_rows: int = 1 << 17) -> dict:
    """Chains of a run and their jumps, from the two integer columns only (streamed).

    Returns ``chain_ids`` (sorted int64), ``jumps`` (jump count per chain), ``last_jump`` (max
    jump_index per chain), ``divergences`` (divergence rows)."""
    dataset, _ = _dataset(run_root, storage_options)
    ids, counts, lasts = [], [], []
    divergences = 0
    for b in dataset.to_batches(columns=["chain_id", "jump_index", "diverged"], batch_size=batch_rows, **_LOW_MEMORY):
        div = b.column("diverged").to_numpy(zero_copy_only=False)
        divergences += int(div.sum())
        ch = b.column("chain_id").to_numpy()[~div]
        jp = b.column("jump_index").to_numpy()[~div]
        if ch.size == 0:
            continue
        u, inv = np.unique(ch, return_inverse=True)
        ids.append(u)
        counts.append(np.bincount(inv, minlength=u.size))
        last = np.full(u.size, -1, dtype=np.int64)
        np.maximum.at(last, inv, jp)
        lasts.append(last)
    if not ids:
        return {"chain_ids": np.zeros(0, np.int64), "jumps": np.zeros(0, np.int64),
                "last_jump": np.zeros(0, np.int64), "divergences": divergences}
    ids_all, counts_all, lasts_all = np.concatenate(ids), np.concatenate(counts), np.concatenate(lasts)
    u, inv = np.unique(ids_all, return_inverse=True)
    jumps = np.bincount(inv, weights=counts_all, minlength=u.size).astype(np.int64)
    last = np.full(u.size, -1, dtype=np.int64)
    np.maximum.at(last, inv, lasts_all)
    return {"chain_ids": u, "jumps": jumps, "last_jump": last, "divergences": divergences}


def _directions(d: int, k: int, seed: int) -> np.ndarray:
    # fixed random unit directions: a projection is a generic linear statistic of the sample
    g = np.random.default_rng(seed).standard_normal((d, k)).astype(np.float32)
    return g / np.linalg.norm(g, axis=0, keepdims=True)


def chain_arrays(run_root: str, stats: Sequence[str] = DEFAULT_STATS, *, n_projections: int = 4,
                 classifier: Callable | None = None, burn_in: int = 0, max_draws: int | None = None,
                 max_chains: int | None = None, seed: int = 0, batch_rows: int = 8192,
                 storage_options: dict | None = None) -> dict:
    """(chains, draws) arrays of per-jump scalars from a run's store, streamed by record batches.

    Args:
        stats: any of ``score_norm``, ``kinetic`` (stored columns), ``mean_intensity`` (mean of
            the decoded sample), ``proj`` (``n_projections`` projections ``x . u_k`` on fixed
            random unit directions drawn with ``seed``).
        classifier: optional callable, float32 samples ``(n, *event_shape)`` -> int labels ``(n,)``;
            gives ``labels`` (chains, draws), -1 where a jump is missing.
        burn_in: jumps with ``jump_index < burn_in`` are skipped; ``max_draws`` caps the window.
        max_chains: use the first N chains (by chain id).

    Returns a dict: ``chain_ids`` (C,), ``jump_index`` (n,) window of jump indices, ``values``
    {name: float32 (C, n), NaN where missing; ``proj`` is (C, n, n_projections)}, ``labels``
    (or None), ``complete`` (C,) bool: chains with every jump of the window (the others stopped
    early, e.g. diverged), ``divergences``, ``event_shape``, ``run_id``.
    """
    unknown = set(stats) - {"score_norm", "kinetic", "mean_intensity", "proj"}
    if unknown:
        raise ValueError(f"unknown stats {sorted(unknown)}; known: score_norm, kinetic, mean_intensity, proj")
    dataset, info = _dataset(run_root, storage_options)
    idx = chain_index(run_root, storage_options=storage_options)
    chain_ids = idx["chain_ids"]
    if max_chains is not None:
        chain_ids = chain_ids[:int(max_chains)]
    c = chain_ids.size
    last = int(idx["last_jump"][:c].max()) if c else -1
    n = max(0, last + 1 - int(burn_in))
    if max_draws is not None:
        n = min(n, int(max_draws))
    d = math.prod(info["shape"])
    want_sample = classifier is not None or "mean_intensity" in stats or "proj" in stats
    values: dict[str, np.ndarray] = {}
    for s in stats:
        values[s] = np.full((c, n, n_projections) if s == "proj" else (c, n), np.nan, dtype=np.float32)
    labels = np.full((c, n), -1, dtype=np.int64) if classifier is not None else None
    seen = np.zeros((c, n), dtype=bool)
    dirs = _directions(d, n_projections, seed) if "proj" in stats else None

    if c and n:
        cols = ["chain_id", "jump_index"] + [s for s in _SCALAR_COLUMNS if s in stats]
        if want_sample:
            cols.append("sample")
        expr = ((pc.field("diverged") == False) & (pc.field("jump_index") >= int(burn_in))  # noqa: E712
                & (pc.field("jump_index") < int(burn_in) + n))
        if max_chains is not None:
            expr = expr & (pc.field("chain_id") <= int(chain_ids[-1]))
        for b in dataset.to_batches(columns=cols, filter=expr, batch_size=batch_rows, **_LOW_MEMORY):
            if b.num_rows == 0:
                continue
            ch = b.column("chain_id").to_numpy()
            ci = np.searchsorted(chain_ids, ch)
            ok = (ci < c) & (chain_ids[np.minimum(ci, c - 1)] == ch)
            ci = ci[ok]
            ji = b.column("jump_index").to_numpy()[ok] - int(burn_in)
            seen[ci, ji] = True
            for s in _SCALAR_COLUMNS:
                if s in stats:
                    values[s][ci, ji] = b.column(s).to_numpy(zero_copy_only=False)[ok]
            if want_sample:
                x = _decode(b, info)[ok]
                if "mean_intensity" in stats:
                    values["mean_intensity"][ci, ji] = x.mean(axis=1)
                if dirs is not None:
                    values["proj"][ci, ji] = x @ dirs
                if classifier is not None:
                    lab = np.asarray(classifier(x.reshape(-1, *info["shape"])))
                    labels[ci, ji] = lab.astype(np.int64).reshape(-1)
    return {"chain_ids": chain_ids, "jump_index": np.arange(int(burn_in), int(burn_in) + n),
            "values": values, "labels": labels, "complete": seen.all(axis=1) if n else np.zeros(c, bool),
            "divergences": idx["divergences"], "event_shape": info["shape"], "run_id": info["run_id"]}


def iter_sample_batches(run_root: str, *, select: str = "last", max_samples: int | None = None,
                        min_jump: int = 0, batch_rows: int = 256,
                        storage_options: dict | None = None,
                        max_jump: int | None = None) -> Iterator[np.ndarray]:
    """Yield float32 sample batches ``(n, *event_shape)`` of a run (divergence rows excluded).

    ``select="last"``: the last jump of every chain; ``"all"``: every jump with
    ``min_jump <= jump_index <= max_jump`` (no upper bound when ``max_jump`` is None).
    At most ``max_samples`` in total, in store order."""
    if select not in ("last", "all"):
        raise ValueError(f"select must be 'last' or 'all', got {select!r}")
    dataset, info = _dataset(run_root, storage_options)
    expr = (pc.field("diverged") == False) & (pc.field("jump_index") >= int(min_jump))  # noqa: E712
    if max_jump is not None:
        expr = expr & (pc.field("jump_index") <= int(max_jump))
    if select == "last":
        idx = chain_index(run_root, storage_options=storage_options)
        ids, last = idx["chain_ids"], idx["last_jump"]
        if ids.size == 0:
            return
        expr = expr & (pc.field("jump_index") >= int(last.min()))
    left = np.inf if max_samples is None else int(max_samples)
    for b in dataset.to_batches(columns=["chain_id", "jump_index", "sample"], filter=expr,
                                batch_size=batch_rows, **_LOW_MEMORY):
        if left <= 0:
            return
        if b.num_rows == 0:
            continue
        if select == "last":
            ch = b.column("chain_id").to_numpy()
            jp = b.column("jump_index").to_numpy()
            keep = np.flatnonzero(last[np.searchsorted(ids, ch)] == jp)
            if keep.size == 0:
                continue
            b = b.take(pa.array(keep))
        if b.num_rows > left:
            b = b.slice(0, int(left))
        left -= b.num_rows
        yield _decode(b, info).reshape(b.num_rows, *info["shape"])


def nearest_mean_classifier(dataset: ImageDataset | DataConfig) -> tuple[Callable, np.ndarray]:
    """A classifier by nearest class mean (Euclidean) from a labelled ``ImageDataset`` (or a
    ``DataConfig``, loaded with :func:`mmgm_ray.data.load_dataset`), and the data set's class
    frequencies (the reference occupancy). Crude, but free and enough to see mode hopping."""
    if isinstance(dataset, DataConfig):
        dataset = load_dataset(dataset)
    if dataset.labels is None:
        raise ValueError(f"data set {dataset.name!r} has no labels for a nearest-mean classifier")
    x = dataset.x.reshape(len(dataset), -1).double().numpy()
    y = dataset.labels.numpy()
    k = int(y.max()) + 1
    counts = np.bincount(y, minlength=k)
    means = np.zeros((k, x.shape[1]))
    np.add.at(means, y, x)
    means /= np.maximum(counts, 1)[:, None]
    sq = (means ** 2).sum(axis=1)

    def classify(samples) -> np.ndarray:
        s = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
        return np.argmin(sq[None, :] - 2.0 * s @ means.T, axis=1)

    return classify, counts / counts.sum()


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return [_jsonable(a) for a in v.tolist()] if v.ndim else _jsonable(v.item())
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, list):
        return [_jsonable(a) for a in v]
    if isinstance(v, dict):
        return {k: _jsonable(a) for k, a in v.items()}
    return v


def diagnose(run_root: str, *, stats: Sequence[str] = DEFAULT_STATS, n_projections: int = 4,
             classifier: Callable | None = None, num_classes: int | None = None, reference=None,
             burn_in: int = 0, max_draws: int | None = None, max_chains: int | None = None,
             rhat_threshold: float = 1.01, min_ess: float = 400.0, seed: int = 0,
             batch_rows: int = 8192, storage_options: dict | None = None) -> dict:
    """Mixing report of a run, read from its store (JSON-able dict).

    For each per-jump scalar (see :func:`chain_arrays`) over the complete chains of the window:
    rank-normalized R-hat (and its bulk/tail parts), bulk/tail ESS, integrated autocorrelation
    time and batch-means ESS (Vehtari et al. 2021; Geyer 1992; Vats, Flegal & Jones 2019). With a
    ``classifier``: class transitions, visits, dwell times and occupancy vs ``reference``.

    ``flags`` lists what failed: R-hat above ``rhat_threshold`` (1.01 after Vehtari et al.; with
    C chains stationary draws still give R-hat^2 ~= 1 + 2C/ESS_bulk over split chains, Vats &
    Knudson 2021, so with 10^4 short chains set the threshold from the ESS you need), bulk or
    tail ESS below ``min_ess``, incomplete chains, divergences. ``mixing_ok`` is True when no
    R-hat or ESS flag is raised.
    """
    arr = chain_arrays(run_root, stats, n_projections=n_projections, classifier=classifier,
                       burn_in=burn_in, max_draws=max_draws, max_chains=max_chains, seed=seed,
                       batch_rows=batch_rows, storage_options=storage_options)
    complete = arr["complete"]
    c_used = int(complete.sum())
    n = arr["jump_index"].size
    report = {"run_id": arr["run_id"], "run": str(run_root), "event_shape": arr["event_shape"],
              "chains": int(arr["chain_ids"].size), "chains_used": c_used,
              "incomplete_chains": int(arr["chain_ids"].size - c_used), "draws": n, "burn_in": int(burn_in),
              "divergences": int(arr["divergences"]), "rhat_threshold": rhat_threshold,
              "min_ess": min_ess, "stats": {}}
    flags: list[str] = []
    mixing_flags: list[str] = []
    if c_used < 1 or n < 4:
        flags.append(f"too little data for mixing diagnostics ({c_used} complete chains x {n} draws)")
        mixing_flags.append("no data")
    else:
        for name, v in arr["values"].items():
            x = v[complete].astype(np.float64)
            summ = mcmc.summarize(x)
            bm = mcmc.batch_means_ess(x)
            entry = {k: summ[k] for k in ("rhat", "rhat_bulk", "rhat_tail", "ess_bulk", "ess_tail",
                                          "ess_mean", "tau", "mean", "sd")}
            entry["ess_batch_means"] = bm
            report["stats"][name] = entry
            rh = np.atleast_1d(summ["rhat"])
            eb = np.minimum(np.atleast_1d(summ["ess_bulk"]), np.atleast_1d(summ["ess_tail"]))
            if np.nanmax(rh) > rhat_threshold or not np.isfinite(rh).all():
                mixing_flags.append(f"{name}: R-hat {np.nanmax(rh):.4g} > {rhat_threshold}")
            if np.nanmin(eb) < min_ess:
                mixing_flags.append(f"{name}: ESS {np.nanmin(eb):.4g} < {min_ess}")
        flags += mixing_flags
        rhats = [np.nanmax(np.atleast_1d(e["rhat"])) for e in report["stats"].values()]
        esss = [np.nanmin(np.atleast_1d(e["ess_bulk"])) for e in report["stats"].values()]
        report["max_rhat"] = float(max(rhats)) if rhats else None
        report["min_ess_bulk"] = float(min(esss)) if esss else None
    if report["incomplete_chains"]:
        flags.append(f"{report['incomplete_chains']} chains stop before the end of the window (left out)")
    if report["divergences"]:
        flags.append(f"{report['divergences']} divergences")
    if arr["labels"] is not None:
        lab = arr["labels"][complete] if c_used else arr["labels"]
        report["transitions"] = transitions.transition_report(lab, num_classes, reference)
    report["flags"] = flags
    report["mixing_ok"] = not mixing_flags
    return _jsonable(report)


def format_report(rep: dict) -> str:
    """The human-readable form of a :func:`diagnose` report (``mmgm diagnose RUN``)."""
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
        tv = f", TV to reference {t['tv']:.4g}" if "tv" in t else ""
        lines.append(f"  classes: switch rate {t['switch_rate']:.4g}, mean dwell {t['dwell_mean']:.4g} jumps, "
                     f"visits {['%.3f' % f for f in t['visit_fractions']]}{tv}")
    lines.append("mixing ok" if rep["mixing_ok"] else "NOT MIXING")
    lines += [f"  ! {f}" for f in rep["flags"]]
    return "\n".join(lines)
