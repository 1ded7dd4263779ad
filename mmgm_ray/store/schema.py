"""Sample-store schema v1: the Arrow schema, its metadata, and the conversions to and from it.

Columns (one row per jump, or per divergence event)::

    run_id      string   not null
    chain_id    int64    not null   global chain id (block_id * block_size + index in block)
    block_id    int64    not null
    step        int64    not null   walk step (1-based) of the jump / of the divergence detection
    jump_index  int64    not null   jumps counted from 0 per chain; -1 on divergence rows
    sample      fixed_size_list<uint8|float16|float32>[prod(event_shape)]   NULL on divergence rows
    score_norm  float32  not null   |psi| at the jump; NaN on divergence rows
    kinetic     float32  not null   |v|^2 / (2u) at the jump; NaN on divergence rows
    diverged    bool     not null   true only on divergence rows

Schema (file) metadata, all values UTF-8 strings::

    mmgm.schema_version  "1"
    mmgm.shape           JSON list, the event shape, e.g. "[1, 28, 28]"
    mmgm.sample_dtype    "uint8" | "float16" | "float32"
    mmgm.run_id          the run id
    mmgm.quantization    "none" or, for uint8, "round(clip(x,0,1)*255)" (readers divide by 255)

The sample is flattened in C order; readers reshape to ``(N, *shape)``. See ``SCHEMA.md``.
"""
from __future__ import annotations

import json
import math
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1"

SAMPLE_DTYPES: dict[str, pa.DataType] = {
    "uint8": pa.uint8(),
    "float16": pa.float16(),
    "float32": pa.float32(),
}

QUANTIZATION = {
    "uint8": "round(clip(x,0,1)*255)",
    "float16": "none",
    "float32": "none",
}

#: every column except ``sample``, in schema order
METADATA_COLUMNS = ["run_id", "chain_id", "block_id", "step", "jump_index", "score_norm", "kinetic", "diverged"]

META_KEYS = ("mmgm.schema_version", "mmgm.shape", "mmgm.sample_dtype", "mmgm.run_id", "mmgm.quantization")


def normalize_shape(event_shape: Iterable[int]) -> list[int]:
    """Event shape as a list of positive ints (raises ValueError otherwise)."""
    try:
        shape = [int(s) for s in event_shape]
    except TypeError as e:
        raise ValueError(f"event_shape must be a sequence of ints, got {event_shape!r}") from e
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"event_shape must be a non-empty list of positive ints, got {event_shape!r}")
    return shape


def check_dtype(sample_dtype: str) -> str:
    """Return ``sample_dtype`` if supported, else raise ValueError."""
    if sample_dtype not in SAMPLE_DTYPES:
        raise ValueError(f"sample_dtype must be one of {sorted(SAMPLE_DTYPES)}, got {sample_dtype!r}")
    return sample_dtype


def sample_schema(run_id: str, event_shape: Sequence[int], sample_dtype: str) -> pa.Schema:
    """The v1 Arrow schema (with metadata) for one run."""
    shape = normalize_shape(event_shape)
    check_dtype(sample_dtype)
    size = math.prod(shape)
    fields = [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("chain_id", pa.int64(), nullable=False),
        pa.field("block_id", pa.int64(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("jump_index", pa.int64(), nullable=False),
        pa.field("sample", pa.list_(SAMPLE_DTYPES[sample_dtype], size), nullable=True),
        pa.field("score_norm", pa.float32(), nullable=False),
        pa.field("kinetic", pa.float32(), nullable=False),
        pa.field("diverged", pa.bool_(), nullable=False),
    ]
    meta = {
        "mmgm.schema_version": SCHEMA_VERSION,
        "mmgm.shape": json.dumps(shape),
        "mmgm.sample_dtype": sample_dtype,
        "mmgm.run_id": run_id,
        "mmgm.quantization": QUANTIZATION[sample_dtype],
    }
    return pa.schema(fields, metadata=meta)


def schema_info(schema: pa.Schema) -> dict:
    """Decode the ``mmgm.*`` metadata of a schema: schema_version, shape, sample_dtype, run_id, quantization.

    Raises ValueError if the schema does not carry mmgm metadata (not a sample-store file).
    """
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"not an mmgm sample-store schema: metadata keys {missing} missing")
    return {
        "schema_version": meta["mmgm.schema_version"],
        "shape": json.loads(meta["mmgm.shape"]),
        "sample_dtype": meta["mmgm.sample_dtype"],
        "run_id": meta["mmgm.run_id"],
        "quantization": meta["mmgm.quantization"],
    }


def quantize(x: np.ndarray, sample_dtype: str) -> np.ndarray:
    """float32 samples -> the stored dtype (uint8: round(clip(x, 0, 1) * 255), half to even)."""
    if sample_dtype == "uint8":
        return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    if sample_dtype == "float16":
        with np.errstate(over="ignore"):  # overflow -> inf, which the writer then reports
            return x.astype(np.float16)
    return x.astype(np.float32, copy=False)


def dequantize(values: np.ndarray, sample_dtype: str) -> np.ndarray:
    """Stored values -> float32 (uint8 divided by 255)."""
    if sample_dtype == "uint8":
        return values.astype(np.float32) / np.float32(255.0)
    return values.astype(np.float32)


def _first_bad(ok: np.ndarray) -> int:
    return int(np.flatnonzero(~ok)[0])


def jumps_to_table(batch, schema: pa.Schema) -> pa.Table:
    """Convert a :class:`mmgm_ray.jumps.JumpBatch` to a schema-v1 table.

    The last guard before disk: raises ValueError naming the chain and step if any sample is not
    finite (or overflows float16), or if the event shape does not match the schema.
    """
    info = schema_info(schema)
    shape, dtype = info["shape"], info["sample_dtype"]
    n = len(batch)
    xhat = batch.xhat.detach().to("cpu")
    if tuple(xhat.shape[1:]) != tuple(shape):
        raise ValueError(f"JumpBatch xhat has event shape {list(xhat.shape[1:])}, the store expects {shape}")
    x = xhat.reshape(n, -1).to(dtype=_torch_float32()).numpy()
    chain = batch.chain_id.detach().cpu().numpy().astype(np.int64, copy=False)
    step = batch.step.detach().cpu().numpy().astype(np.int64, copy=False)
    ok = np.isfinite(x).all(axis=1)
    if not ok.all():
        i = _first_bad(ok)
        raise ValueError(f"non-finite sample for chain {int(chain[i])} at step {int(step[i])} "
                         f"({int((~ok).sum())} bad row(s) in the batch); nothing from this batch was written")
    q = quantize(x, dtype)
    if dtype == "float16":
        ok = np.isfinite(q).all(axis=1)
        if not ok.all():
            i = _first_bad(ok)
            raise ValueError(f"sample for chain {int(chain[i])} at step {int(step[i])} overflows float16 "
                             f"(|x| > 65504); use sample_dtype float32")
    size = int(math.prod(shape))
    values = pa.array(q.reshape(-1), type=SAMPLE_DTYPES[dtype])
    sample = pa.FixedSizeListArray.from_arrays(values, size)
    cols = {
        "run_id": pa.repeat(pa.scalar(info["run_id"], pa.string()), n),
        "chain_id": pa.array(chain, pa.int64()),
        "block_id": pa.array(batch.block_id.detach().cpu().numpy().astype(np.int64, copy=False), pa.int64()),
        "step": pa.array(step, pa.int64()),
        "jump_index": pa.array(batch.jump_index.detach().cpu().numpy().astype(np.int64, copy=False), pa.int64()),
        "sample": sample,
        "score_norm": pa.array(batch.score_norm.detach().cpu().float().numpy(), pa.float32()),
        "kinetic": pa.array(batch.kinetic.detach().cpu().float().numpy(), pa.float32()),
        "diverged": pa.array(np.zeros(n, dtype=bool), pa.bool_()),
    }
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def divergences_to_table(events: Sequence, schema: pa.Schema) -> pa.Table:
    """Convert :class:`mmgm_ray.jumps.DivergenceEvent` s to rows with sample NULL and diverged true."""
    info = schema_info(schema)
    n = len(events)
    nan = np.full(n, np.nan, dtype=np.float32)
    cols = {
        "run_id": pa.repeat(pa.scalar(info["run_id"], pa.string()), n),
        "chain_id": pa.array([int(e.chain_id) for e in events], pa.int64()),
        "block_id": pa.array([int(e.block_id) for e in events], pa.int64()),
        "step": pa.array([int(e.step) for e in events], pa.int64()),
        "jump_index": pa.array(np.full(n, -1, dtype=np.int64), pa.int64()),
        "sample": pa.nulls(n, type=schema.field("sample").type),
        "score_norm": pa.array(nan, pa.float32()),
        "kinetic": pa.array(nan, pa.float32()),
        "diverged": pa.array(np.ones(n, dtype=bool), pa.bool_()),
    }
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def samples_from_table(table: pa.Table, shape: Sequence[int], sample_dtype: str) -> np.ndarray:
    """Decode the ``sample`` column of a table without NULL rows to float32 ``(N, *shape)``."""
    n = table.num_rows
    col = table.column("sample")
    if col.null_count:
        raise ValueError("samples_from_table: the table still holds divergence rows (sample NULL)")
    if n == 0:
        return np.zeros((0, *shape), dtype=np.float32)
    # flatten() honours slicing offsets, unlike .values
    flat = np.concatenate([chunk.flatten().to_numpy(zero_copy_only=False) for chunk in col.chunks])
    return dequantize(flat, sample_dtype).reshape(n, *shape)


def _torch_float32():
    import torch  # local: keeps `import mmgm_ray.store.schema` light for readers
    return torch.float32
