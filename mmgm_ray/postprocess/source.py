"""One read path over a run's committed view, for every post-processing stage.

Post-processing (functionals, reductions, FID features, generation) reads exactly the Parquet parts
the run manifest has committed, never the parts a block wrote after its last checkpoint. The same
:class:`CommittedView` feeds two executors:

- :meth:`CommittedView.batches`: record batches in this process through ``pyarrow.dataset`` (small
  stores, tests, a driver-only run), with a small read-ahead so memory stays at a batch or two;
- :meth:`CommittedView.ray_dataset`: a Ray Data ``Dataset`` over the same file list
  (``ray.data.read_parquet`` on the manifest's files, the store's file system and storage options,
  no hive partitioning), columns pruned and the row filter pushed down to the scan.

Both yield the same rows; transforms written as callable classes over a batch run unchanged in
either (``map_batches`` on Ray, a loop here).
"""
from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray.data
from ray.data.expressions import Expr

from mmgm_ray.diagnostics.functionals import raw_samples
from mmgm_ray.store import dequantize, fsutil, load_manifest, sample_schema, schema_info

# pyarrow's scanner reads ahead 16 batches x 4 files by default (~1 GB of decoded 784-d samples)
_LOW_MEMORY = {"batch_readahead": 1, "fragment_readahead": 1}
_MANIFEST_KEYS = ("run_id", "event_shape", "sample_dtype", "blocks")


@dataclass(frozen=True)
class CommittedView:
    """The committed parts of one sampling run and how to read them."""
    run_url: str                    # {root}/{run_id}, local path or fsspec URL
    manifest: dict
    files: tuple[str, ...]          # file-system paths of the committed parts, in (block, seq) order
    filesystem: pafs.FileSystem
    schema: pa.Schema               # schema v1 of the store, with its mmgm.* metadata
    storage_options: Optional[dict] = None

    @property
    def info(self) -> dict:
        """{shape, sample_dtype, run_id, ...} of the samples (``mmgm_ray.store.schema_info``)."""
        return schema_info(self.schema)

    @property
    def num_rows(self) -> int:
        """Committed rows (jumps and divergence events), from the manifest."""
        return int(self.manifest.get("progress", {}).get("rows", 0))

    def batches(self, columns: Sequence[str], filter: Optional[pads.Expression] = None,
                batch_rows: int = 8192) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns`` (rows passing ``filter``) in this process."""
        dataset = pads.dataset(list(self.files), schema=self.schema, format="parquet", filesystem=self.filesystem)
        yield from dataset.to_batches(columns=list(columns), filter=filter, batch_size=batch_rows, **_LOW_MEMORY)

    def ray_dataset(self, columns: Sequence[str], filter: Optional[Expr] = None,
                    override_num_blocks: Optional[int] = None) -> ray.data.Dataset:
        """A Ray Data dataset of ``columns`` over the same files (``filter``: a Ray Data expression,
        e.g. ``col("diverged") == lit(False)``, pushed down to the Parquet scan)."""
        ds = ray.data.read_parquet(list(self.files), filesystem=self.filesystem, partitioning=None,
                                   schema=self.schema, override_num_blocks=override_num_blocks)
        if filter is not None:
            ds = ds.filter(expr=filter)
        return ds.select_columns(list(columns))


def open_committed(run_url: str, storage_options: Optional[dict] = None) -> CommittedView:
    """The committed view of the run at ``run_url``; one-line ValueError for a path without a run,
    a manifest that is not one, or a run with nothing committed yet."""
    run_url = str(run_url).rstrip("/")
    fs, path = fsutil.resolve(run_url, storage_options)
    man = load_manifest(run_url, storage_options)  # ValueError naming the file if it is not a manifest
    if man is None:
        raise ValueError(f"{run_url}: no run manifest (manifest.json) there; give a sampling run's folder or URL")
    missing = [k for k in _MANIFEST_KEYS if k not in man]
    if missing:
        raise ValueError(f"{run_url}/manifest.json lacks {missing}: not a sampling run manifest")
    files = tuple(posixpath.join(path, f) for key in sorted(man["blocks"], key=int)
                  for f in man["blocks"][key].get("files", []))
    if not files:
        raise ValueError(f"{run_url}: no committed rows yet (the run has not reached its first checkpoint)")
    afs = pafs.LocalFileSystem() if fsutil.is_local(fs) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    schema = sample_schema(man["run_id"], man["event_shape"], man["sample_dtype"])
    return CommittedView(run_url, man, files, afs, schema, storage_options)


def decode_samples(batch: pa.RecordBatch | pa.Table | dict, info: dict) -> np.ndarray:
    """float32 samples ``(n, *shape)`` of a batch's ``sample`` column (uint8 divided by 255).

    Accepts an Arrow batch/table or the numpy dict Ray Data's ``map_batches`` hands a transform
    (where ``sample`` arrives as an object or 2-d array of the fixed-size lists)."""
    raw = raw_samples(batch, math.prod(info["shape"]))
    return dequantize(raw, info["sample_dtype"]).reshape(-1, *info["shape"])
