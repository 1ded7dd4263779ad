"""``SampleStore`` (where a run's files live), ``BlockWriter`` (exactly-once Parquet parts for one
block) and the block checkpoints that tie writer state to chain state.

Layout under ``{root}/{run_id}/``::

    manifest.json                                          run manifest (mmgm_ray.store.manifest)
    samples/block={block_id:06d}/part-{seq:06d}.parquet    schema v1 parts, seq = 0, 1, 2, ... per block
    checkpoints/block={block_id:06d}/checkpoint-{step:09d}.pt  latest block checkpoint (tensors + meta)
    checkpoints/block={block_id:06d}/lease.json            the block's current writer epoch

Exactly-once contract (what the chain pool must do), for each block:

1. Start or restart: ``writer = store.writer(block_id)``; ``ck = writer.resume()``. ``resume`` loads
   the block checkpoint, deletes every part with ``seq >= state["next_seq"]`` (written by a dead
   actor after its last checkpoint; also stale hidden temp files) and returns ``(tensors, meta)``,
   or ``None`` for a fresh block (then ALL parts of the block are deleted: none was committed).
2. Walk: ``writer.add(jump_batch)`` / ``writer.add_divergences(events)`` in engine order. Parts roll
   deterministically (``rows_per_file`` rows, or a new file when ``(step-1)//steps_per_file`` changes).
3. Checkpoint at walk step t: ``writer.checkpoint(chain_tensors, meta, step=t)`` = ``flush()`` (every row with
   step <= t is now in a finished part) + ONE atomic file holding the chain tensors, ``meta`` and the
   writer ``state()``. Nothing else needs saving.
4. After a crash, step 1 then rerunning the deterministic chains from the checkpoint rewrites the same
   part names with identical contents: no row lost, none duplicated.
5. Integrity: the writer state records the size and CRC-32 of every part it committed (``digests``);
   ``restore`` checks the listed parts against it before touching anything (sizes always, CRCs on
   request; a cheap Parquet footer read for parts of states written before digests existed) and
   raises :class:`DamagedPartError` naming each missing or damaged part. A caller holding an older
   state that excludes those parts (the pool keeps the previous checkpoint's) restores that one:
   the parts are then rewritten, bit for bit, by rerunning the chains from there.

Parts written after the last checkpoint are "uncommitted": they exist on storage until the block is
restored or finished. The manifest lists only committed files, and readers that go through the
manifest (:func:`mmgm_ray.store.open_dataset`) see exactly the committed rows.

Fencing (writers that outlive their replacement, e.g. an actor on a node the cluster gave up on):
every writer that takes a block over calls :func:`acquire_lease`, which records a new epoch in the
block's ``lease.json``; a fenced writer (``BlockWriter.fence(epoch)``) re-reads the lease before
each part and each checkpoint and raises :class:`FencedError`, writing nothing, once a newer epoch
holds the block. Checkpoints carry their step in their name and the latest is the highest step, so
a late write of an older step can never move a block's checkpoint backwards (it is ignored and
removed by the next commit). What remains is the instant between a zombie's lease check and its
write: it can only produce names the current writer rewrites with identical bytes.
"""
from __future__ import annotations

import io
import json
import posixpath
import re
import zlib
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmgm_ray import validators as check
from mmgm_ray.config import StoreConfig
from mmgm_ray.store import fsutil
from mmgm_ray.store.schema import (
    check_dtype,
    divergences_to_table,
    jumps_to_table,
    normalize_shape,
    sample_schema,
)

_PART = re.compile(r"^part-(\d{6,})\.parquet$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d{9,})\.pt$")

STATE_VERSION = 1
# a part up to this size is serialized in memory and written in one call: pyarrow writing into a
# Python file object calls back into Python (taking the GIL from the engine thread) once per page;
# larger parts stream, so memory stays within the actor's plan
BUFFER_PART_BYTES = 64 << 20
# dictionary encoding only for the columns whose values repeat within a part (a block's chain ids
# repeat once per jump); samples and floats are all distinct, where a dictionary costs CPU and grows
# the file (measured on bench/pool.py's rows: 0.64 ms and 43 kB per 2,560-row part instead of 1.15 ms
# and 63 kB; the chain ids' dictionary then takes 141 -> 109 ns and 16.0 -> 14.8 B per row)
DICTIONARY_COLUMNS = ("run_id", "chain_id", "block_id", "step", "jump_index", "diverged")
# row-group min/max statistics only for the columns readers filter on (burn-in steps, chain and block
# ids, diverged rows); those of the sample and its two float statistics serve no reader and cost
# ~20 ns per row (bench/pool.py's rows: 0.72 -> 0.55 ms per 2,560-row part with zstd)
STATISTICS_COLUMNS = ("run_id", "chain_id", "block_id", "step", "jump_index", "diverged")
CHECKPOINT_FORMAT = "mmgm.block_checkpoint"
CHECKPOINT_VERSION = 1


class FencedError(RuntimeError):
    """A newer writer epoch holds the block: this writer must stop (its commits are refused)."""


class DamagedPartError(RuntimeError):
    """Committed parts of a block are missing or differ from what was committed (``damaged``:
    run-relative name -> what is wrong). Nothing was modified."""

    def __init__(self, url: str, block_id: int, damaged: dict[str, str]):
        self.block_id, self.damaged = int(block_id), dict(damaged)
        listed = "; ".join(f"{url}/{f}: {why}" for f, why in sorted(damaged.items()))
        super().__init__(f"block {block_id}: committed part(s) missing or damaged: {listed}")


def _check_block_id(block_id: int) -> int:
    if isinstance(block_id, bool) or not isinstance(block_id, (int, np.integer)) or block_id < 0:
        raise ValueError(f"block_id must be an int >= 0, got {block_id!r}")
    return int(block_id)


class SampleStore:
    """Where one run's samples, checkpoints and manifest live, and how they are written.

    Args:
        root: a local path or fsspec URL (``file://``, ``s3://``, ``gs://``, ``memory://``, ...);
            the run lives under ``{root}/{run_id}``. ``memory://`` is per process: files written by a
            Ray actor there are invisible to the driver, so use it only within one process (tests).
        run_id: folder name of the run (letters, digits, ``._=+-``; not starting with '.' or '_',
            which pyarrow.dataset would hide).
        event_shape: shape of one sample, e.g. ``(1, 28, 28)``.
        config: :class:`mmgm_ray.config.StoreConfig` (sample dtype, rolling, compression).
        sample_dtype: overrides ``config.sample_dtype`` when given.
        storage_options: passed to ``fsspec.core.url_to_fs`` (credentials, endpoint_url, ...).
        check_writable: create the run folder and write+delete a probe file now, raising
            :class:`StoreNotWritableError` before any chain runs.

    Instances pickle (fsspec file systems do), so a Ray driver can hand one to its actors.
    """

    def __init__(self, root: str, run_id: str, *, event_shape: Sequence[int],
                 config: StoreConfig | None = None, sample_dtype: str | None = None,
                 storage_options: dict | None = None, check_writable: bool = True):
        check.run_name("run_id", run_id)
        self.config = config if config is not None else StoreConfig()
        self.config.validate()
        self.event_shape = normalize_shape(event_shape)
        self.sample_dtype = check_dtype(sample_dtype or self.config.sample_dtype)
        self.root = str(root).rstrip("/")
        self.run_id = run_id
        self.url = f"{self.root}/{run_id}"
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsutil.resolve(self.url, self.storage_options)
        self.schema = sample_schema(run_id, self.event_shape, self.sample_dtype)
        if check_writable:
            fsutil.check_writable(self.fs, self.path, self.url)

    def __repr__(self) -> str:
        return (f"SampleStore({self.url!r}, shape={self.event_shape}, dtype={self.sample_dtype}, "
                f"rows_per_file={self.config.rows_per_file}, steps_per_file={self.config.steps_per_file})")

    # ---- paths (run-relative names are what manifests and writer states record) ----------------

    @staticmethod
    def block_relpath(block_id: int) -> str:
        """``samples/block=NNNNNN`` (run-relative)."""
        return f"samples/block={_check_block_id(block_id):06d}"

    @classmethod
    def part_relpath(cls, block_id: int, seq: int) -> str:
        """``samples/block=NNNNNN/part-SSSSSS.parquet`` (run-relative)."""
        return f"{cls.block_relpath(block_id)}/part-{int(seq):06d}.parquet"

    def abspath(self, relpath: str) -> str:
        """File-system path (no protocol) of a run-relative name."""
        return posixpath.join(self.path, relpath)

    @property
    def samples_path(self) -> str:
        return self.abspath("samples")

    @property
    def manifest_path(self) -> str:
        return self.abspath("manifest.json")

    def checkpoint_dir(self, block_id: int) -> str:
        return self.abspath(f"checkpoints/block={_check_block_id(block_id):06d}")

    def checkpoint_path(self, block_id: int, step: int) -> str:
        return posixpath.join(self.checkpoint_dir(block_id), f"checkpoint-{int(step):09d}.pt")

    def checkpoint_steps(self, block_id: int) -> list[int]:
        """Steps of the block's checkpoint files on storage, ascending (normally one)."""
        names = fsutil.list_names(self.fs, self.checkpoint_dir(block_id))
        return sorted(int(m.group(1)) for m in map(_CHECKPOINT.match, names) if m)

    def lease_path(self, block_id: int) -> str:
        return posixpath.join(self.checkpoint_dir(block_id), "lease.json")

    # ---- listing / io --------------------------------------------------------------------------

    def list_blocks(self) -> list[int]:
        """Block ids that have a folder under ``samples/``."""
        out = []
        for name in fsutil.list_names(self.fs, self.samples_path):
            if name.startswith("block="):
                try:
                    out.append(int(name[len("block="):]))
                except ValueError:
                    pass
        return sorted(out)

    def list_parts(self, block_id: int | None = None) -> list[str]:
        """Run-relative names of the visible parts (one block, or all blocks), sorted.

        This is what is on storage, committed or not; see :func:`mmgm_ray.store.open_dataset` for
        the committed view.
        """
        blocks = [block_id] if block_id is not None else self.list_blocks()
        out = []
        for b in blocks:
            names = fsutil.list_names(self.fs, self.abspath(self.block_relpath(b)))
            out += [f"{self.block_relpath(b)}/{n}" for n in names if _PART.match(n)]
        return out

    def write_parquet(self, table: pa.Table, relpath: str) -> fsutil.Digest:
        """Write ``table`` (schema v1) atomically at ``relpath``; return the file's size and CRC-32."""
        if not table.schema.equals(self.schema, check_metadata=True):
            raise ValueError(f"table schema does not match the store schema:\n{table.schema}\nvs\n{self.schema}")
        comp = self.config.compression
        comp = None if comp in ("none", "uncompressed") else comp
        dictionary = [c for c in DICTIONARY_COLUMNS if c in table.column_names]
        statistics = [c for c in STATISTICS_COLUMNS if c in table.column_names]

        def write(f) -> None:
            pq.write_table(table, f, compression=comp, use_dictionary=dictionary, write_statistics=statistics)

        if table.nbytes > BUFFER_PART_BYTES:
            return fsutil.atomic_write(self.fs, self.abspath(relpath), write)
        sink = pa.BufferOutputStream()
        write(sink)
        return fsutil.atomic_write_bytes(self.fs, self.abspath(relpath), sink.getvalue())

    def writer(self, block_id: int) -> "BlockWriter":
        """A :class:`BlockWriter` for ``block_id`` (call ``resume()`` or ``restore()`` before writing)."""
        return BlockWriter(self, block_id)


class BlockWriter:
    """Buffers one block's JumpBatches and divergence rows and writes them as deterministic parts.

    Not thread-safe; one writer per block at a time (Ray gives each block to one actor).

    Rolling: a part is written as soon as ``rows_per_file`` rows are buffered (exactly that many
    rows), and, when ``steps_per_file > 0``, whenever a row's window ``(step-1)//steps_per_file``
    differs from the buffered rows' window. ``flush()`` writes whatever is buffered.

    Failure: a write error (e.g. :class:`StoreFullError`) leaves the rows in the buffer and the
    counters unchanged; nothing partial is visible. Retry with ``flush()`` (never re-``add`` the
    same batch: it is already buffered).
    """

    def __init__(self, store: SampleStore, block_id: int):
        self.store = store
        self.block_id = _check_block_id(block_id)
        self.epoch: int | None = None  # set by fence(): every commit then checks the block's lease
        self._reset(self.initial_state())
        self._checked_clean = False  # first write verifies no parts of an earlier attempt remain

    def fence(self, epoch: int) -> None:
        """Commit only while the block's lease holds ``epoch`` (see :func:`acquire_lease`)."""
        self.epoch = int(epoch)

    def _check_lease(self) -> None:
        if self.epoch is None:
            return
        current = read_lease(self.store, self.block_id)
        if current != self.epoch:
            raise FencedError(f"block {self.block_id}: writer epoch {self.epoch} was superseded by epoch "
                              f"{current}; another writer holds the block, so this one stops")

    # ---- state -----------------------------------------------------------------------------------

    def initial_state(self) -> dict:
        """The state of a block with nothing committed."""
        return {"version": STATE_VERSION, "block_id": self.block_id, "next_seq": 0, "files": [],
                "rows_written": 0, "last_step": None, "divergences": 0, "digests": {}}

    def _reset(self, state: dict) -> None:
        self._next_seq = int(state["next_seq"])
        self._files = list(state["files"])
        # [size, crc32] per part; states written before digests existed have none
        self._digests = {f: list(d) for f, d in (state.get("digests") or {}).items() if f in self._files}
        self._rows_written = int(state["rows_written"])
        self._last_step = state.get("last_step")
        self._divergences = int(state.get("divergences", 0))
        self._buf: list[pa.Table] = []
        self._buf_rows = 0
        self._window: int | None = None

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def files(self) -> list[str]:
        """Run-relative names of the parts this writer has finished (committed or not)."""
        return list(self._files)

    @property
    def buffered_rows(self) -> int:
        return self._buf_rows

    @property
    def rows_written(self) -> int:
        return self._rows_written

    def state(self) -> dict:
        """Small JSON-able dict: {version, block_id, next_seq, files, rows_written, last_step, divergences,
        digests} (``digests``: part name -> [size, crc32]).

        Raises RuntimeError while rows are buffered: a state that omitted them would lose them after
        a restore. Call ``flush()`` first (``checkpoint()`` does).
        """
        if self._buf_rows:
            raise RuntimeError(f"block {self.block_id}: {self._buf_rows} rows are buffered; "
                               f"call flush() before state()")
        return {"version": STATE_VERSION, "block_id": self.block_id, "next_seq": self._next_seq,
                "files": list(self._files), "rows_written": self._rows_written,
                "last_step": self._last_step, "divergences": self._divergences,
                "digests": {f: list(d) for f, d in self._digests.items()}}

    def manifest_entry(self, status: str = "running") -> dict:
        """Per-block manifest entry {files, rows, last_step, divergences, status} for the flushed state."""
        st = self.state()
        return {"files": st["files"], "rows": st["rows_written"], "last_step": st["last_step"],
                "divergences": st["divergences"], "status": status, "epoch": self.epoch}

    def restore(self, state: dict, *, checksums: bool = False) -> None:
        """Return to ``state`` (from ``state()``): delete this block's parts with seq >= next_seq and
        stale hidden temp files, drop the buffer, continue writing at next_seq.

        Raises :class:`DamagedPartError` (a RuntimeError), modifying nothing, if a part the state
        lists is missing or damaged (see :meth:`damaged`).
        """
        if int(state.get("version", 0)) != STATE_VERSION:
            raise ValueError(f"unsupported writer state version {state.get('version')!r}")
        if int(state["block_id"]) != self.block_id:
            raise ValueError(f"writer state is for block {state['block_id']}, this writer is block {self.block_id}")
        bad = self.damaged(state, checksums=checksums)
        if bad:
            raise DamagedPartError(self.store.url, self.block_id, bad)
        next_seq = int(state["next_seq"])
        fs = self.store.fs
        folder = self.store.abspath(self.store.block_relpath(self.block_id))
        for name in fsutil.list_names(fs, folder):
            m = _PART.match(name)
            if m and int(m.group(1)) >= next_seq:
                fs.rm(posixpath.join(folder, name))  # written after the last checkpoint
            elif name.startswith(".") and name.endswith(".tmp"):
                fs.rm(posixpath.join(folder, name))  # temp file of a writer that died mid-write
        self._reset(state)
        self._checked_clean = True

    def damaged(self, state: dict, *, checksums: bool = False) -> dict[str, str]:
        """{run-relative part name: what is wrong} for the parts ``state`` lists that are missing or
        differ from what was committed: size (from one listing of the block's folder), CRC-32 too
        when ``checksums`` (reads every part), a Parquet footer read for parts without a recorded
        digest (states written before digests existed). Empty when all is well."""
        sizes = fsutil.list_sizes(self.store.fs, self.store.abspath(self.store.block_relpath(self.block_id)))
        digests = state.get("digests") or {}
        out = {}
        for rel in state["files"]:
            size = sizes.get(posixpath.basename(rel))
            want = digests.get(rel)
            if size is None:
                out[rel] = "missing"
            elif want is None:
                out.update({rel: why for why in [self._footer_problem(rel)] if why})
            elif size != int(want[0]):
                out[rel] = f"{size} bytes, {int(want[0])} committed"
            elif checksums and zlib.crc32(self.store.fs.cat_file(self.store.abspath(rel))) != int(want[1]):
                out[rel] = "CRC-32 differs from the committed one"
        return out

    def _footer_problem(self, rel: str) -> str | None:
        try:
            with self.store.fs.open(self.store.abspath(rel), "rb") as f:
                pq.read_metadata(f)
        except Exception as e:  # noqa: BLE001 - whatever the reader says, the part is unreadable
            return f"unreadable Parquet footer ({type(e).__name__})"
        return None

    # ---- writing -------------------------------------------------------------------------------

    def add(self, batch) -> None:
        """Buffer a :class:`mmgm_ray.jumps.JumpBatch` (all rows must belong to this block).

        Raises ValueError (and buffers nothing of the batch) on a non-finite sample, naming chain and
        step, or on a wrong block id / event shape. May write parts (see rolling).
        """
        if len(batch) == 0:
            return
        ids = batch.block_id.detach().cpu().numpy()
        if ids.min() != self.block_id or ids.max() != self.block_id:   # O(n): np.unique sorts
            raise ValueError(f"JumpBatch holds block ids {np.unique(ids).tolist()}, "
                             f"this writer is block {self.block_id}")
        self._append(jumps_to_table(batch, self.store.schema))

    def add_divergences(self, events: Iterable) -> None:
        """Buffer :class:`mmgm_ray.jumps.DivergenceEvent` s as rows with sample NULL, diverged true."""
        events = [events] if hasattr(events, "reason") else list(events)
        if not events:
            return
        bad = sorted({int(e.block_id) for e in events} - {self.block_id})
        if bad:
            raise ValueError(f"divergence events for blocks {bad} given to the writer of block {self.block_id}")
        self._append(divergences_to_table(events, self.store.schema))

    def _append(self, table: pa.Table) -> None:
        spf = self.store.config.steps_per_file
        if not spf:
            self._push(table)
            return
        steps = table.column("step").to_numpy()
        win = (np.maximum(steps, 1) - 1) // spf
        cuts = [0, *(np.flatnonzero(np.diff(win)) + 1).tolist(), len(win)]
        for s, e in zip(cuts[:-1], cuts[1:]):
            w = int(win[s])
            if self._buf_rows and self._window != w:
                self._write_buffered(self._buf_rows)
            self._window = w
            self._push(table.slice(s, e - s))

    def _push(self, table: pa.Table) -> None:
        self._buf.append(table)
        self._buf_rows += table.num_rows
        while self._buf_rows >= self.store.config.rows_per_file:
            self._write_buffered(self.store.config.rows_per_file)

    def _write_buffered(self, nrows: int) -> None:
        combined = pa.concat_tables(self._buf)
        # one contiguous chunk: the bytes of a part then depend only on its rows
        head = combined.slice(0, nrows).combine_chunks()
        rest = combined.slice(nrows)
        self._write_part(head)
        self._buf = [rest] if rest.num_rows else []
        self._buf_rows = rest.num_rows

    def _write_part(self, table: pa.Table) -> None:
        if not self._checked_clean:
            stale = [p for p in self.store.list_parts(self.block_id)
                     if int(_PART.match(posixpath.basename(p)).group(1)) >= self._next_seq]
            if stale:
                raise RuntimeError(f"block {self.block_id} already has parts {stale[:3]}... from an earlier "
                                   f"attempt; call resume() or restore(state) before writing")
            self._checked_clean = True
        rel = self.store.part_relpath(self.block_id, self._next_seq)
        self._check_lease()
        digest = self.store.write_parquet(table, rel)
        # counters move only after the part is visible
        self._next_seq += 1
        self._files.append(rel)
        self._digests[rel] = [digest.size, digest.crc32]
        self._rows_written += table.num_rows
        self._divergences += int(table.column("diverged").to_numpy().sum())
        top = int(pc.max(table.column("step")).as_py())
        self._last_step = top if self._last_step is None else max(self._last_step, top)

    def flush(self) -> str | None:
        """Write all buffered rows as one part; return its run-relative name (None if nothing buffered)."""
        if not self._buf_rows:
            return None
        self._write_buffered(self._buf_rows)
        return self._files[-1]

    close = flush

    # ---- checkpoints ---------------------------------------------------------------------------

    def checkpoint(self, tensors: dict, meta: dict | None = None, *, step: int) -> dict:
        """Flush, then save ``tensors`` + ``meta`` + the writer state as ONE atomic block checkpoint
        at walk step ``step``. ``meta["writer"]`` is reserved for the writer state; the writer's
        epoch (if fenced) is recorded as ``meta["epoch"]``. Returns the writer state.
        """
        meta = dict(meta or {})
        if "writer" in meta:
            raise ValueError("meta key 'writer' is reserved for the writer state")
        self.flush()
        st = self.state()
        meta["writer"] = st
        if self.epoch is not None:
            meta["epoch"] = self.epoch
        self._check_lease()
        save_block_checkpoint(self.store, self.block_id, tensors, meta, step=step)
        return st

    def resume(self) -> tuple[dict, dict] | None:
        """Load this block's checkpoint and ``restore`` its writer state; return (tensors, meta).

        Without a checkpoint, restore the initial state (deleting any parts of an earlier attempt)
        and return None: the block starts from scratch.
        """
        ck = self.load()
        if ck is None:
            self.restore(self.initial_state())
            return None
        self.restore(ck[1]["writer"])
        return ck

    def load(self) -> tuple[dict, dict] | None:
        """This block's latest checkpoint (tensors, meta), or None, without restoring anything
        (stale checkpoint temp files are removed). For callers that choose the state to restore."""
        self._remove_stale_checkpoint_temps()
        ck = load_block_checkpoint(self.store, self.block_id)
        if ck is not None and "writer" not in ck[1]:
            raise ValueError(f"block {self.block_id} checkpoint has no writer state (meta['writer'])")
        return ck

    def _remove_stale_checkpoint_temps(self) -> None:
        # a process killed while saving a block checkpoint leaves its hidden temp file behind
        fs = self.store.fs
        folder = self.store.checkpoint_dir(self.block_id)
        for name in fsutil.list_names(fs, folder):
            if name.startswith(".") and name.endswith(".tmp"):
                fsutil.remove(fs, posixpath.join(folder, name))


# ---- block checkpoints ---------------------------------------------------------------------------

def save_block_checkpoint(store: SampleStore, block_id: int, tensors: dict[str, Any], meta: dict, *,
                          step: int) -> str:
    """Atomically save one block checkpoint at walk step ``step``: ``tensors`` (dict of str ->
    torch.Tensor) and ``meta`` (JSON-able dict) in ONE file, so the two can never disagree. Returns
    its path.

    The file ``checkpoint-{step:09d}.pt`` is ``torch.save`` of {format, version, run_id, block_id,
    step, meta_json, tensors}; it loads with ``torch.load(weights_only=True)``. Once it is written,
    the block's checkpoints of lower steps are removed: the latest checkpoint is the highest step,
    so it never moves backwards (temp + rename locally, one PUT on object stores).
    """
    import torch  # here, not at the top: readers of the store (pyarrow, DuckDB users) never need torch

    block_id = _check_block_id(block_id)
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ValueError("tensors must be a dict of str -> torch.Tensor")
    try:
        meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta must be JSON-serialisable: {e}") from e
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "run_id": store.run_id, "block_id": block_id, "step": int(step), "meta_json": meta_json,
        "tensors": {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
    }
    path = store.checkpoint_path(block_id, step)
    buf = io.BytesIO()   # one write call: torch.save writes a record at a time (see BUFFER_PART_BYTES)
    torch.save(payload, buf)
    fsutil.atomic_write_bytes(store.fs, path, buf.getbuffer())
    for old in store.checkpoint_steps(block_id):
        if old < step:
            fsutil.remove(store.fs, store.checkpoint_path(block_id, old))
    return path


def load_block_checkpoint(store: SampleStore, block_id: int) -> tuple[dict, dict] | None:
    """Load the latest (highest-step) block checkpoint: (tensors, meta), or None if there is none.

    Uses ``torch.load(weights_only=True, map_location="cpu")``.
    """
    from mmgm_ray.torchio import load_weights_only  # see save_block_checkpoint: torch only when needed

    steps = store.checkpoint_steps(block_id)
    if not steps:
        return None
    path = store.checkpoint_path(block_id, steps[-1])
    obj = load_weights_only(store.fs.cat_file(path), f"block checkpoint {path}")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an mmgm block checkpoint")
    if int(obj.get("version", 0)) != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {obj.get('version')!r}")
    if obj["run_id"] != store.run_id or int(obj["block_id"]) != int(block_id):
        raise ValueError(f"{path} belongs to run {obj['run_id']!r} block {obj['block_id']}, "
                         f"expected run {store.run_id!r} block {block_id}")
    return dict(obj["tensors"]), json.loads(obj["meta_json"])


def checkpointed_blocks(store: SampleStore) -> list[int]:
    """Block ids that have at least one checkpoint file (i.e. committed something), ascending."""
    out = []
    for name in fsutil.list_names(store.fs, store.abspath("checkpoints")):
        if name.startswith("block=") and name[len("block="):].isdigit():
            b = int(name[len("block="):])
            if store.checkpoint_steps(b):
                out.append(b)
    return sorted(out)


# ---- leases (writer epochs) --------------------------------------------------------------------------

def read_lease(store: SampleStore, block_id: int) -> int:
    """The block's current writer epoch (0 before any writer took a lease)."""
    try:
        return int(json.loads(store.fs.cat_file(store.lease_path(block_id)))["epoch"])
    except FileNotFoundError:
        return 0


def acquire_lease(store: SampleStore, block_id: int, holder: str = "") -> int:
    """Take the block over: record epoch = current + 1 and return it. Writers of older epochs that
    are fenced stop at their next commit. One taker at a time (the pool gives a block to one live
    actor; Ray restarts or the driver's replacement happen after the previous holder is gone)."""
    epoch = read_lease(store, block_id) + 1
    body = json.dumps({"epoch": epoch, "holder": holder}).encode()
    fsutil.atomic_write_bytes(store.fs, store.lease_path(block_id), body)
    return epoch
