"""Generation without the driver: a run's kept jumps written as a Parquet data set by Ray Data.

The rows are chosen by :func:`mmgm_ray.postprocess.selection.plan_generation` (burn-in, thinning,
the first N kept jumps in (step, chain_id) order: round-robin over chains) as one filter pushed down
to the Parquet scan of the committed view. Read tasks decode and re-encode the samples
(:func:`encode_rows`) and ``write_parquet`` streams them into a staging folder beside the target,
renamed to the target once every part is written: the driver sees only per-step row counts and the
chain ids at the one step where N runs out, never a sample.

Output (``mmgm_ray.data.parquet`` layout, read by ``load_dataset(DataConfig(name='parquet',
path=...))``): ``sample`` (fixed-size list of ``sample_dtype``), ``step`` and ``chain_id`` (where
each sample came from), schema metadata ``mmgm.shape`` / ``mmgm.sample_dtype`` / ``mmgm.name``. The
set of rows is the same whatever the number of workers; the order of the parts is not fixed, so
the loader returns the rows in (step, chain_id) order.
"""
from __future__ import annotations

import posixpath
import uuid
from typing import Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider

from mmgm_ray.cluster import require_ray
from mmgm_ray.data.parquet import dataset_metadata, encode_samples
from mmgm_ray.postprocess.selection import plan_generation
from mmgm_ray.postprocess.source import CommittedView, decode_samples, open_committed
from mmgm_ray.store import fsutil

SAMPLE_DTYPES = ("uint8", "float16", "float32")


class _PartNames(FilenameProvider):
    """``part-{task:06d}-{i}.parquet``: the staging folder is fresh, so no write id is needed."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:06d}-{{i}}.parquet"


def output_schema(view: CommittedView, sample_dtype: str, name: str) -> pa.Schema:
    """Schema of the generated data set (sample, step, chain_id; data set metadata)."""
    d = int(np.prod(view.info["shape"]))
    pa_type = {"uint8": pa.uint8(), "float16": pa.float16(), "float32": pa.float32()}[sample_dtype]
    return pa.schema([("sample", pa.list_(pa_type, d)), ("step", pa.int64()), ("chain_id", pa.int64())],
                     metadata=dataset_metadata(view.info["shape"], sample_dtype, name))


def encode_rows(batch: pa.Table, info: dict, sample_dtype: str, schema: pa.Schema) -> pa.Table:
    """Store rows -> data set rows: samples decoded to float32 (uint8 / 255), clipped to [0, 1] for
    uint8 output (images), re-encoded (``mmgm_ray.data.parquet.encode_samples``)."""
    x = decode_samples(batch, info).reshape(batch.num_rows, -1)
    if sample_dtype == "uint8":
        x = np.clip(x, 0.0, 1.0)
    return pa.Table.from_arrays([encode_samples(x, sample_dtype), batch["step"], batch["chain_id"]], schema=schema)


def check_target(out: str) -> None:
    """ValueError if ``out`` exists and is not an empty folder (a generated set is never mixed
    with other files); called before any chain runs."""
    fs, path = fsspec.core.url_to_fs(out)
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        raise ValueError(f"--out {out}: already exists and is not an empty folder; remove it or choose another")


def first_rows(view: CommittedView, n: int, burn_in: int, thin: int, jump_every: int) -> np.ndarray:
    """The first ``n`` generated samples in (step, chain_id) order, float32 ``(n, *shape)``, read in
    this process (for PNGs and grids: ``n`` is small)."""
    where, count = plan_generation(view, n, burn_in, thin, jump_every, on_ray=False)
    if not count:
        return np.zeros((0, *view.info["shape"]), np.float32)
    table = pa.Table.from_batches(list(view.batches(["step", "chain_id", "sample"], filter=where.to_pyarrow())))
    table = table.sort_by([("step", "ascending"), ("chain_id", "ascending")])
    return decode_samples(table, view.info)


def write_generated(run_url: str, out: str, num_samples: int, burn_in: int, thin: int, jump_every: int, *,
                    sample_dtype: str = "float32", name: str = "generate",
                    storage_options: Optional[dict] = None) -> dict:
    """Write the first ``num_samples`` kept jumps of the run at ``run_url`` (module docstring) as a
    Parquet data set folder ``out``; returns ``{dataset, written, files}``. ValueError when no
    sample survives burn-in and thinning (nothing written)."""
    require_ray("mmgm generate's data set writer")
    if sample_dtype not in SAMPLE_DTYPES:
        raise ValueError(f"sample_dtype must be one of {list(SAMPLE_DTYPES)}, got {sample_dtype!r}")
    view = open_committed(run_url, storage_options)
    where, count = plan_generation(view, num_samples, burn_in, thin, jump_every, on_ray=True)
    if not count:
        raise ValueError(f"generate: no sample survived burn-in/thinning in {run_url} (all chains diverged?)")
    check_target(out)
    schema = output_schema(view, sample_dtype, name)
    ds = view.ray_dataset(["chain_id", "step", "sample"], filter=where).map_batches(
        encode_rows, fn_kwargs={"info": view.info, "sample_dtype": sample_dtype, "schema": schema},
        batch_format="pyarrow", batch_size=None)
    fs, target = fsspec.core.url_to_fs(out)
    staging = posixpath.join(posixpath.dirname(target.rstrip("/")) or ".",
                             f".{posixpath.basename(target.rstrip('/'))}.partial-{uuid.uuid4().hex[:8]}")
    afs = pafs.LocalFileSystem() if fsutil.is_local(fs) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    try:
        ds.write_parquet(staging, filesystem=afs, schema=schema, filename_provider=_PartNames(),
                         mode=SaveMode.OVERWRITE, compression="zstd")
        if fs.exists(target):  # an empty folder (check_target): replaced by the staged one
            fs.rmdir(target)
        fs.mv(staging, target, recursive=True)
    finally:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
    files = sorted(p for p in fs.find(target) if p.endswith(".parquet"))
    return {"dataset": out, "written": count, "files": len(files)}
