"""Parquet sample store: every jump of every chain, written exactly once, readable everywhere.

Schema v1 (``mmgm.schema_version = "1"``; full description in ``SCHEMA.md`` next to this file)
-----------------------------------------------------------------------------------------------
One row per jump (or per divergence event)::

    run_id string | chain_id int64 | block_id int64 | step int64 | jump_index int64 |
    sample fixed_size_list<uint8|float16|float32>[prod(event_shape)] (NULL on divergence rows) |
    score_norm float32 | kinetic float32 | diverged bool

Schema metadata: ``mmgm.schema_version`` ("1"), ``mmgm.shape`` (JSON list), ``mmgm.sample_dtype``,
``mmgm.run_id``, ``mmgm.quantization`` (uint8: ``round(clip(x,0,1)*255)``; readers divide by 255).
Divergence events are rows with ``sample = NULL``, ``diverged = true``, ``jump_index = -1`` and NaN
score_norm / kinetic, so the store is the full record; sample readers filter them out. A
non-finite sample is never written: the writer raises ValueError naming chain and step.

Layout and storage
------------------
``{root}/{run_id}/samples/block={block_id:06d}/part-{seq:06d}.parquet``, plus ``manifest.json`` and
``checkpoints/block={block_id:06d}/checkpoint-{step:09d}.pt`` (+ ``lease.json``, the writer epoch). ``root`` is a local path or fsspec URL
(``file://``, ``s3://``, ``gs://`` with gcsfs installed, ``memory://``). ``memory://`` lives in one
process only: Ray actors and the driver each see their own, so use it for single-process tests.
Files appear atomically: local writes go to a hidden temp name and are renamed; object stores get
one PUT (or completed multipart upload), so a partial file is never visible.

Public API
----------
* :class:`SampleStore` (root, run_id, event_shape, config, storage_options) and
  :func:`create_run` / :func:`open_run` to make or reopen one with its manifest.
* :class:`BlockWriter` (``store.writer(block_id)``): ``add``, ``add_divergences``, ``flush``,
  ``state``, ``restore``, ``checkpoint``, ``resume``. The exactly-once contract with the chain
  pool is in :mod:`mmgm_ray.store.store`.
* :func:`save_block_checkpoint` / :func:`load_block_checkpoint`; writer epochs (fencing):
  :func:`acquire_lease`, :func:`read_lease`, ``BlockWriter.fence``, :class:`FencedError`.
* :func:`load_manifest`, :func:`update_manifest`, :func:`sync_manifest_from_checkpoints`.
* :func:`open_dataset`, :func:`read_samples`, :func:`read_divergences`.
* Errors: :class:`StoreNotWritableError`, :class:`StoreFullError`, :class:`StoreAccessError` (OSError
  subclasses); :class:`DamagedPartError` (a committed part missing or damaged); ValueError for bad
  input (non-finite sample, schema mismatch on resume, bad shape/dtype, bad storage options).
* Recovery: :func:`manifest_from_checkpoints` rebuilds a lost manifest from the block checkpoints.
"""
from mmgm_ray.store.fsutil import StoreAccessError, StoreError, StoreFullError, StoreNotWritableError
from mmgm_ray.store.manifest import (
    code_version,
    create_run,
    load_manifest,
    manifest_from_checkpoints,
    open_run,
    sync_manifest_from_checkpoints,
    update_manifest,
    write_manifest,
)
from mmgm_ray.store.reader import open_dataset, read_divergences, read_samples
from mmgm_ray.store.schema import (
    METADATA_COLUMNS,
    SAMPLE_DTYPES,
    SCHEMA_VERSION,
    dequantize,
    quantize,
    sample_schema,
    schema_info,
)
from mmgm_ray.store.store import (BlockWriter, DamagedPartError, FencedError, SampleStore, acquire_lease,
                                  checkpointed_blocks, load_block_checkpoint, read_lease, save_block_checkpoint)

__all__ = [
    "SCHEMA_VERSION", "SAMPLE_DTYPES", "METADATA_COLUMNS", "sample_schema", "schema_info", "quantize",
    "dequantize", "SampleStore", "BlockWriter", "save_block_checkpoint", "load_block_checkpoint",
    "acquire_lease", "read_lease", "FencedError", "DamagedPartError", "checkpointed_blocks",
    "create_run", "open_run", "load_manifest", "update_manifest", "write_manifest",
    "sync_manifest_from_checkpoints", "manifest_from_checkpoints", "code_version", "open_dataset",
    "read_samples", "read_divergences", "StoreError", "StoreFullError", "StoreNotWritableError",
    "StoreAccessError",
]
