"""Readers for a run's samples: a pyarrow dataset (the committed view) and decoded numpy arrays.

Other tools read the same files directly:

* Ray Data: ``ray.data.read_parquet(f"{run_url}/samples")`` (its default hive partitioning adds a
  ``block`` column from the folder names; ``sample`` stays a fixed-size list).
* pandas: ``pandas.read_parquet(part_or_folder)``; DuckDB:
  ``read_parquet('{run}/samples/*/*.parquet', hive_partitioning = false)`` (``sample`` is an ARRAY).

Those see every visible part, including uncommitted ones of a running or crashed block; use
:func:`open_dataset` / :func:`read_samples` (manifest-driven) when exactly-once matters.
"""
from __future__ import annotations

import posixpath
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mmgm_ray.store import fsutil
from mmgm_ray.store.manifest import load_manifest
from mmgm_ray.store.schema import METADATA_COLUMNS, sample_schema, samples_from_table, schema_info
from mmgm_ray.store.store import SampleStore


def _arrow_fs(fs):
    # native local file system is faster than going through the fsspec handler
    if fsutil.is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def open_dataset(run: SampleStore | str, *, storage_options: dict | None = None,
                 use_manifest: bool = True) -> ds.Dataset:
    """A ``pyarrow.dataset.Dataset`` over a run's parts (``run``: a SampleStore or ``{root}/{run_id}``).

    If the run has a manifest (and ``use_manifest``), exactly the files it lists are read: the
    committed view, with no duplicate or uncommitted rows. Otherwise every visible
    ``part-*.parquet`` under ``samples/`` is read (hidden temp files are never picked up).
    The dataset schema carries the ``mmgm.*`` metadata (see :func:`schema_info`).
    """
    if isinstance(run, SampleStore):
        fs, path = run.fs, run.path
    else:
        fs, path = fsutil.resolve(str(run).rstrip("/"), storage_options)
    afs = _arrow_fs(fs)
    man = load_manifest(run, storage_options) if use_manifest else None
    if man is not None:
        schema = sample_schema(man["run_id"], man["event_shape"], man["sample_dtype"])
        files = [posixpath.join(path, f)
                 for key in sorted(man["blocks"], key=int) for f in man["blocks"][key]["files"]]
        return ds.dataset(files, schema=schema, format="parquet", filesystem=afs)
    samples = posixpath.join(path, "samples")
    files = []
    for block in fsutil.list_names(fs, samples):
        if block.startswith("block="):
            folder = posixpath.join(samples, block)
            files += [posixpath.join(folder, n) for n in fsutil.list_names(fs, folder)
                      if n.startswith("part-") and n.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"no sample parts under {samples} and no manifest")
    with fs.open(files[0], "rb") as f:
        schema = pq.read_schema(f)
    schema_info(schema)  # raises if these are not sample-store files
    return ds.dataset(files, schema=schema, format="parquet", filesystem=afs)


def read_samples(run: SampleStore | str, *, blocks: Sequence[int] | None = None,
                 chains: Sequence[int] | None = None, min_step: int | None = None,
                 max_step: int | None = None, storage_options: dict | None = None,
                 use_manifest: bool = True, sort: bool = True) -> tuple[np.ndarray, pa.Table]:
    """Decoded samples of a run: ``(x, meta)``.

    ``x`` is float32 ``(N, *event_shape)`` (uint8 samples divided by 255); ``meta`` is a table of
    the other columns (run_id, chain_id, block_id, step, jump_index, score_norm, kinetic, diverged)
    row-aligned with ``x``. Divergence rows are filtered out (see :func:`read_divergences`).
    Optional filters on block, chain and step range; ``sort`` orders rows by (block, chain, step).
    """
    dataset = open_dataset(run, storage_options=storage_options, use_manifest=use_manifest)
    info = schema_info(dataset.schema)
    expr = pc.field("diverged") == False  # noqa: E712 (arrow expression, not a Python comparison)
    if blocks is not None:
        expr = expr & pc.field("block_id").isin([int(b) for b in blocks])
    if chains is not None:
        expr = expr & pc.field("chain_id").isin([int(c) for c in chains])
    if min_step is not None:
        expr = expr & (pc.field("step") >= int(min_step))
    if max_step is not None:
        expr = expr & (pc.field("step") <= int(max_step))
    table = dataset.to_table(filter=expr)
    if sort and table.num_rows:
        table = table.sort_by([("block_id", "ascending"), ("chain_id", "ascending"), ("step", "ascending")])
    x = samples_from_table(table, info["shape"], info["sample_dtype"])
    return x, table.select(METADATA_COLUMNS)


def read_divergences(run: SampleStore | str, *, storage_options: dict | None = None,
                     use_manifest: bool = True) -> pa.Table:
    """The divergence rows of a run (metadata columns only), sorted by (block, chain, step)."""
    dataset = open_dataset(run, storage_options=storage_options, use_manifest=use_manifest)
    table = dataset.to_table(columns=METADATA_COLUMNS, filter=pc.field("diverged") == True)  # noqa: E712
    return table.sort_by([("block_id", "ascending"), ("chain_id", "ascending"), ("step", "ascending")])
