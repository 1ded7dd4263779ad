"""Image / vector data sets stored as Parquet, in the layout the engine's sample store writes.

Layout: column ``sample`` is a fixed_size_list of uint8, float16 or float32 with prod(shape) values
per row; optional ``label`` (int64); optional boolean ``diverged``; optional int64 ``step`` and
``chain_id`` (where a generated sample came from). Schema metadata ``mmgm.shape`` is the JSON event
shape (e.g. ``[1, 8, 8]``) and ``mmgm.sample_dtype`` the element dtype name. uint8 samples are
value/255 (images in [0, 1]); float samples are stored as they are.

Row order: the files' (sorted by path), except that a data set with both ``step`` and ``chain_id``
columns is returned in (step, chain_id) order -- the order ``mmgm generate`` defines, whose parts
Ray Data writes in no fixed order (:mod:`mmgm_ray.postprocess.generate`).
"""
from __future__ import annotations

import json
import math
import posixpath
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from .base import ImageDataset, url_to_fs

SHAPE_KEY = b"mmgm.shape"
DTYPE_KEY = b"mmgm.sample_dtype"
_PA_TYPES = {"uint8": pa.uint8(), "float16": pa.float16(), "float32": pa.float32()}


def _arrow_fs(fs):
    """pyarrow's native local filesystem when local (fast), else wrap the fsspec one."""
    protos = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protos or "local" in protos:
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _meta(schema: pa.Schema, where: str) -> tuple[tuple, Optional[str]]:
    md = schema.metadata or {}
    if SHAPE_KEY not in md:
        raise ValueError(f"{where}: schema metadata lacks 'mmgm.shape' (the event shape)")
    try:
        shape = tuple(int(s) for s in json.loads(md[SHAPE_KEY]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: bad 'mmgm.shape' metadata {md[SHAPE_KEY]!r}") from e
    dtype = md[DTYPE_KEY].decode() if DTYPE_KEY in md else None
    return shape, dtype


def load_parquet(path: str, name: str = "parquet") -> ImageDataset:
    """Read a Parquet data set from a file, folder (every ``*.parquet`` below it, sorted) or URL.

    Rows with ``diverged`` true or null, or a null ``sample``, are dropped. Labels are kept when a
    ``label`` column exists (nulls become -1).
    """
    fs, root = url_to_fs(path)
    if fs.isdir(root):
        # only *.parquet: the store may keep manifests or checkpoints next to the data files
        files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
        if not files:
            raise ValueError(f"{path}: folder holds no *.parquet files")
    elif fs.isfile(root):
        files = [root]
    else:
        raise ValueError(f"{path}: no such file or folder")
    try:
        dset = pads.dataset(files, filesystem=_arrow_fs(fs), format="parquet")
        fragments = list(dset.get_fragments())
        metas = [(_meta(fr.physical_schema, fr.path)) for fr in fragments]
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet data set ({e})") from e
    shape, dtype = metas[0]
    for fr, m in zip(fragments, metas):
        if m[0] != shape:
            raise ValueError(f"{fr.path}: event shape {list(m[0])} differs from {list(shape)} "
                             f"in {fragments[0].path}")
    schema = dset.schema
    if "sample" not in schema.names:
        raise ValueError(f"{path}: no 'sample' column (columns: {schema.names})")
    stype = schema.field("sample").type
    if not (pa.types.is_fixed_size_list(stype) or pa.types.is_list(stype) or pa.types.is_large_list(stype)):
        raise ValueError(f"{path}: column 'sample' must be a list type, got {stype}")
    vtype = stype.value_type
    if dtype is not None and dtype in _PA_TYPES and _PA_TYPES[dtype] != vtype:
        raise ValueError(f"{path}: metadata says sample dtype {dtype} but the column holds {vtype}")
    if vtype not in _PA_TYPES.values():
        raise ValueError(f"{path}: sample elements must be uint8, float16 or float32, got {vtype}")
    size = math.prod(shape)
    if pa.types.is_fixed_size_list(stype) and stype.list_size != size:
        raise ValueError(f"{path}: sample rows hold {stype.list_size} values, shape {list(shape)} needs {size}")

    keep = pc.field("sample").is_valid()
    if "diverged" in schema.names:
        if not pa.types.is_boolean(schema.field("diverged").type):
            raise ValueError(f"{path}: column 'diverged' must be boolean")
        keep = keep & (pc.field("diverged") == pa.scalar(False))  # null -> dropped
    order = ["step", "chain_id"] if {"step", "chain_id"} <= set(schema.names) else []
    cols = ["sample"] + (["label"] if "label" in schema.names else []) + order
    table = dset.to_table(columns=cols, filter=keep)
    if order and table.num_rows:
        table = table.sort_by([(c, "ascending") for c in order])

    samples = table.column("sample").combine_chunks() if table.num_rows else pa.array([], stype)
    if isinstance(samples, pa.ChunkedArray):
        samples = samples.combine_chunks()
    if not pa.types.is_fixed_size_list(stype):
        lens = pc.list_value_length(samples).to_numpy(zero_copy_only=False)
        if lens.size and (lens != size).any():
            raise ValueError(f"{path}: sample rows must hold {size} values each")
    flat = samples.flatten()  # respects slicing offsets, unlike .values
    if flat.null_count:
        raise ValueError(f"{path}: null values inside 'sample' rows")
    arr = flat.to_numpy(zero_copy_only=False).reshape((table.num_rows,) + shape)
    if vtype == pa.uint8():
        x = torch.from_numpy(arr.astype(np.float32)).div_(255.0)
    else:
        x = torch.from_numpy(arr.astype(np.float32))
    labels = None
    if "label" in cols:
        lab = table.column("label").combine_chunks().cast(pa.int64()).fill_null(-1)
        labels = torch.from_numpy(lab.to_numpy(zero_copy_only=False).astype(np.int64))
    return ImageDataset(name, x, labels, shape, str(path))


def encode_samples(x: np.ndarray, sample_dtype: str) -> pa.FixedSizeListArray:
    """The ``sample`` column of float32 rows ``(n, d)``: uint8 stores round(x * 255) (half to even;
    x must be in [0, 1]), float16 / float32 store the values."""
    if sample_dtype not in _PA_TYPES:
        raise ValueError(f"sample_dtype must be one of {sorted(_PA_TYPES)}, got {sample_dtype!r}")
    x = np.asarray(x, dtype=np.float32)
    values = np.round(x * np.float32(255.0)).astype(np.uint8) if sample_dtype == "uint8" else x.astype(sample_dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), _PA_TYPES[sample_dtype]), x.shape[1])


def dataset_metadata(event_shape, sample_dtype: str, name: str) -> dict:
    """Schema metadata of a Parquet data set: event shape, sample dtype, name."""
    return {SHAPE_KEY: json.dumps([int(s) for s in event_shape]).encode(), DTYPE_KEY: sample_dtype.encode(),
            b"mmgm.name": name.encode()}


def write_parquet_dataset(ds: ImageDataset, path: str, sample_dtype: str = "uint8",
                          compression: str = "zstd") -> str:
    """Write ``ds`` in the sample-store Parquet layout; returns the file written.

    ``path`` ending in ``.parquet`` is the file; anything else is a folder that gets
    ``part-00000.parquet``. uint8 stores round(x * 255) and needs x in [0, 1] (checked, never clipped
    silently); float16 / float32 store the values.
    """
    if sample_dtype not in _PA_TYPES:
        raise ValueError(f"sample_dtype must be one of {sorted(_PA_TYPES)}, got {sample_dtype!r}")
    x = ds.x.detach().cpu().reshape(len(ds), math.prod(ds.event_shape)).numpy()
    if sample_dtype == "uint8" and len(ds) and (x.min() < 0 or x.max() > 1 or not np.isfinite(x).all()):
        raise ValueError(f"{ds.name}: uint8 storage needs values in [0, 1]; use float16/float32")
    arrays, names = [encode_samples(x, sample_dtype)], ["sample"]
    if ds.labels is not None:
        arrays.append(pa.array(ds.labels.cpu().numpy().astype(np.int64), pa.int64()))
        names.append("label")
    table = pa.Table.from_arrays(arrays, names=names).replace_schema_metadata(
        dataset_metadata(ds.event_shape, sample_dtype, ds.name))
    fs, root = url_to_fs(path)
    target = root if root.endswith(".parquet") else posixpath.join(root, "part-00000.parquet")
    fs.makedirs(posixpath.dirname(target) or ".", exist_ok=True)
    with fs.open(target, "wb") as f:
        pq.write_table(table, f, compression=compression)
    return target
