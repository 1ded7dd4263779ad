"""Streaming reads of a run's Parquet store for single-process consumers (FID features).

The store holds one row per (chain, jump) with the jumped sample (schema v1, see
``mmgm_ray/store/SCHEMA.md``). :func:`chain_index` reduces the two integer columns to the chains
and their jumps; :func:`iter_sample_batches` yields decoded samples batch by batch. Mixing
diagnostics read the store through the functionals table instead (``mmgm_ray.postprocess``).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmgm_ray.store import dequantize, open_dataset, schema_info

__all__ = ["chain_index", "iter_sample_batches"]

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
