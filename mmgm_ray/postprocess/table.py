"""The functionals table of a run: per-jump scalars next to the store, built incrementally.

Layout under ``{run}/functionals/``::

    index.json                    the commit: written last, atomically (store fsutil.atomic_write)
    seg-<id>/*.parquet            one segment per pass: chain_id, jump_index, step (int64), one
                                  float64 column per functional (class_label: int64)
    artifacts/pca-<sha>.npz       principal components (mmgm_ray.diagnostics.functionals.PCABasis)
    artifacts/classifier-<sha>.pt classifier (mmgm_ray.diagnostics.classifier)

``index.json`` (format ``mmgm.functionals_table``, version 1) holds the spec (request, artifacts
with their sha256; its digest names the table), the columns, and the segments: for each, its files
with their sizes, its row count and the SOURCE parts it covers, by run-relative name and size.

Exactly the committed view: a pass reads only the parts the run manifest lists (through
:class:`mmgm_ray.postprocess.source.CommittedView`) and, of those, only the parts no segment
covers yet, so diagnosing a run again or a run still sampling processes what was committed since
the last pass. A segment's files become part of the table only when the index naming them is
written; anything else under ``functionals/`` (a pass that died, an older spec) is removed after
the next commit. Divergence rows are not in the table (the manifest counts them).

The table is rebuilt from scratch (one line on stderr says why) when its spec digest differs
from the one asked for (other functionals, projections, data or classifier), when a part it
covers is no longer committed or changed size (the run was restarted under the same name), when
one of its files is missing or has another size, or when ``index.json`` is not a table index.
One writer per run at a time.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import posixpath
import sys
import uuid
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col, lit

from mmgm_ray.cluster import require_ray
from mmgm_ray.config import DataConfig, from_dict
from mmgm_ray.data import load_dataset
from mmgm_ray.diagnostics.classifier import ClassifierConfig, cached_classifier
from mmgm_ray.diagnostics.functionals import (INPUT_COLUMNS, Functionals, FunctionalsRequest, FunctionalsSpec,
                                              PCABasis, functionals_batch, sha256_bytes)
from mmgm_ray.postprocess.source import CommittedView
from mmgm_ray.preflight import ResourceRequest, ensure_resources
from mmgm_ray.progress import Stage
from mmgm_ray.store import fsutil

__all__ = ["TABLE_DIR", "FunctionalsTable", "TableUpdate", "update_table", "open_table"]

TABLE_DIR = "functionals"
INDEX_NAME = "index.json"
TABLE_FORMAT = "mmgm.functionals_table"
TABLE_VERSION = 1
ROWS_PER_FILE = 1 << 16      # in-process segments: rows per Parquet file (~5 MB of functionals)
MAP_BATCH_ROWS = 8192        # rows per batch in this process (Functionals slices them further)
_LOW_MEMORY = {"batch_readahead": 1, "fragment_readahead": 1}
MISSING = "no functionals table yet"


def _notice(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(f"[mmgm] functionals: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class FunctionalsTable:
    """A committed functionals table and how to read it (picklable: Ray tasks get one)."""
    run_url: str
    index: dict
    files: tuple            # file-system paths of the table's Parquet files
    filesystem: pafs.FileSystem

    @property
    def spec(self) -> FunctionalsSpec:
        return FunctionalsSpec.from_dict(self.index["spec"])

    @property
    def columns(self) -> list[str]:
        """Functional columns (after chain_id, jump_index, step)."""
        return list(self.index["columns"])

    @property
    def num_rows(self) -> int:
        return int(sum(s["rows"] for s in self.index["segments"]))

    def batches(self, columns: Sequence[str], filter: Optional[pc.Expression] = None,
                batch_rows: int = 1 << 16) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns`` (rows passing ``filter``), a batch or two in memory."""
        if not self.files:
            return
        dataset = pads.dataset(list(self.files), format="parquet", filesystem=self.filesystem)
        yield from dataset.to_batches(columns=list(columns), filter=filter, batch_size=batch_rows, **_LOW_MEMORY)


@dataclass(frozen=True)
class TableUpdate:
    """What one pass did: source parts and rows processed, and why the table was rebuilt (if so)."""
    table: FunctionalsTable
    parts_processed: int
    rows_processed: int
    rebuilt: Optional[str]


# ---- index ---------------------------------------------------------------------------------------

def _table_location(run_url: str, storage_options: Optional[dict]):
    fs, run_path = fsutil.resolve(run_url, storage_options)
    return fs, run_path, posixpath.join(run_path, TABLE_DIR)


def _read_index(fs, table_path: str) -> tuple[Optional[dict], Optional[str]]:
    """(index, None), or (None, why it is not usable)."""
    path = posixpath.join(table_path, INDEX_NAME)
    if not fsutil.exists(fs, path):
        return None, MISSING
    try:
        index = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"{path} is not valid JSON ({e})"
    if not isinstance(index, dict) or index.get("format") != TABLE_FORMAT or index.get("version") != TABLE_VERSION:
        return None, f"{path} is not a functionals table index (format {TABLE_FORMAT} v{TABLE_VERSION})"
    try:
        FunctionalsSpec.from_dict(index["spec"])
        for seg in index["segments"]:
            sizes = _sizes(fs, posixpath.join(table_path, seg["name"]))  # one listing per segment
            for f in seg["files"]:
                size = sizes.get(posixpath.basename(f["file"]))
                if size is None:
                    return None, f"functionals file {f['file']} is missing"
                if size != f["size"]:
                    return None, f"functionals file {f['file']} has changed size (corrupt)"
    except (KeyError, TypeError, ValueError) as e:
        return None, f"{path} is not a functionals table index ({type(e).__name__}: {e})"
    return index, None


def _sizes(fs, folder: str) -> dict:
    """File name -> size in ``folder`` (empty when it does not exist), from a fresh listing."""
    try:
        fs.invalidate_cache(folder)
        entries = fs.ls(folder, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e["size"]) for e in entries if e.get("type") != "directory"}


def _arrow_fs(fs) -> pafs.FileSystem:
    return pafs.LocalFileSystem() if fsutil.is_local(fs) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _table(run_url: str, fs, table_path: str, index: dict) -> FunctionalsTable:
    files = tuple(posixpath.join(table_path, f["file"]) for s in index["segments"] for f in s["files"])
    return FunctionalsTable(run_url, index, files, _arrow_fs(fs))


def open_table(run_url: str, storage_options: Optional[dict] = None) -> FunctionalsTable:
    """The committed functionals table of a run, read-only; one-line ValueError when there is none
    or it is not usable (then ``mmgm diagnose RUN`` rebuilds it)."""
    run_url = str(run_url).rstrip("/")
    fs, _, table_path = _table_location(run_url, storage_options)
    index, why = _read_index(fs, table_path)
    if index is None:
        raise ValueError(f"{run_url}: {why}; run `mmgm diagnose {run_url}` to (re)build the functionals table")
    return _table(run_url, fs, table_path, index)


# ---- sources -------------------------------------------------------------------------------------

def _source_sizes(view: CommittedView) -> dict:
    """Run-relative name -> size of every committed part, one listing per block folder."""
    fs, run_path = fsutil.resolve(view.run_url, view.storage_options)
    rel = [f[len(run_path) + 1:] for f in view.files]
    listed = {folder: _sizes(fs, posixpath.join(run_path, folder)) for folder in {posixpath.dirname(r) for r in rel}}
    missing = [r for r in rel if posixpath.basename(r) not in listed[posixpath.dirname(r)]]
    if missing:
        raise ValueError(f"{view.run_url}: committed part {missing[0]} is missing from storage "
                         f"({len(missing)} missing); the store is damaged")
    return {r: listed[posixpath.dirname(r)][posixpath.basename(r)] for r in rel}


# ---- artifacts -----------------------------------------------------------------------------------

def _reusable(fs, run_path: str, old: Optional[FunctionalsSpec], key: str, same: bool) -> Optional[tuple]:
    """(ref, bytes) of the old spec's artifact when the request for it is unchanged and the file
    still matches its hash."""
    ref = getattr(old, key) if old is not None and same else None
    if not ref:
        return None
    path = posixpath.join(run_path, ref["path"])
    if not fsutil.exists(fs, path):
        return None
    blob = fs.cat_file(path)
    return (ref, blob) if sha256_bytes(blob) == ref["sha256"] else None


def _load_data(request: FunctionalsRequest, d: int, what: str):
    try:
        dataset = load_dataset(from_dict(DataConfig, request.data))
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{what}: cannot load the data set {request.data.get('name')!r} ({e}); name one that "
                         "loads here (mmgm diagnose --data/--data-path) or ask for none (--pcs 0)") from None
    if int(np.prod(dataset.event_shape)) != d:
        raise ValueError(f"{what}: data set {request.data.get('name')!r} has events of shape "
                         f"{list(dataset.event_shape)}, the run's samples have {d} values")
    return dataset


def _pca_artifact(request: FunctionalsRequest, d: int) -> tuple[dict, bytes]:
    basis = PCABasis.fit(_load_data(request, d, "principal components"), request.n_pcs, request.data)
    blob = basis.to_bytes()
    sha = sha256_bytes(blob)
    return {"path": f"{TABLE_DIR}/artifacts/pca-{sha[:16]}.npz", "sha256": sha, "k": int(basis.components.shape[1]),
            "variances": [float(v) for v in basis.variances]}, blob


def _classifier_artifact(request: FunctionalsRequest, d: int, cache_dir: Optional[str]) -> tuple[dict, bytes]:
    try:
        blob, meta = cached_classifier(request.data, ClassifierConfig(**request.classifier), cache_dir)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"classes: no classifier for the data set {request.data.get('name')!r} ({e})") from None
    if int(np.prod(meta["event_shape"])) != d:
        raise ValueError(f"classes: data set {request.data.get('name')!r} has events of shape "
                         f"{meta['event_shape']}, the run's samples have {d} values")
    sha = sha256_bytes(blob)
    return {"path": f"{TABLE_DIR}/artifacts/classifier-{sha[:16]}.pt", "sha256": sha,
            "num_classes": int(meta["num_classes"]), "accuracy": float(meta["accuracy"]),
            "holdout": int(meta["holdout"]), "class_frequencies": meta["class_frequencies"]}, blob


def resolve_spec(view: CommittedView, request: FunctionalsRequest, old: Optional[FunctionalsSpec] = None,
                 cache_dir: Optional[str] = None) -> tuple[FunctionalsSpec, dict]:
    """The spec of ``request`` for this run and its artifacts' bytes (run-relative path -> bytes).
    Artifacts of ``old`` are reused while their part of the request is unchanged (a refit would
    give other bytes, hence another digest, hence a needless rebuild); new ones are fitted or
    trained (the classifier comes from its per-data-set cache)."""
    fs, run_path = fsutil.resolve(view.run_url, view.storage_options)
    info = view.info
    d = int(np.prod(info["shape"]))
    blobs: dict = {}
    pca = cls = None
    if request.n_pcs:
        same = old is not None and old.request.data == request.data and old.request.n_pcs == request.n_pcs
        pca, blob = _reusable(fs, run_path, old, "pca", same) or _pca_artifact(request, d)
        blobs[pca["path"]] = blob
    if request.classes:
        same = old is not None and old.request.data == request.data and old.request.classifier == request.classifier
        cls, blob = _reusable(fs, run_path, old, "classifier", same) or _classifier_artifact(request, d, cache_dir)
        blobs[cls["path"]] = blob
    return FunctionalsSpec(request, tuple(info["shape"]), info["sample_dtype"], pca, cls), blobs


# ---- segments ------------------------------------------------------------------------------------

def _write_local(view: CommittedView, fn: Functionals, fs, seg_path: str, stage: Stage) -> None:
    """The pass in this process: the same batches through the same callable, files of about
    ``ROWS_PER_FILE`` rows (one row group per batch), each written atomically."""
    def files():
        buf, rows = [], 0
        for b in view.batches(INPUT_COLUMNS, filter=pc.field("diverged") == False,  # noqa: E712
                              batch_rows=MAP_BATCH_ROWS):
            buf.append(pa.table(fn(b)))
            rows += buf[-1].num_rows
            stage.update(buf[-1].num_rows)
            if rows >= ROWS_PER_FILE:
                yield buf
                buf, rows = [], 0
        if buf:
            yield buf

    def write(f, tables):
        with pq.ParquetWriter(f, tables[0].schema, compression="zstd") as w:
            for t in tables:
                w.write_table(t)

    for i, tables in enumerate(files()):
        fsutil.atomic_write(fs, posixpath.join(seg_path, f"part-{i:06d}.parquet"), lambda f, t=tables: write(f, t))


def _write_ray(view: CommittedView, spec: FunctionalsSpec, blobs: dict, seg_path: str, stage: Stage,
               num_gpus: float, concurrency: Optional[int], actors: bool) -> None:
    """The pass on the cluster through Ray Data, the workers writing the segment's files (never
    through this process). By default the map is a task fused with the Parquet read and the write
    (:func:`functionals_batch`, one :class:`Functionals` per worker process): the samples never
    cross the object store, only their functionals (~1/20 of the bytes) are written. With
    ``actors`` (the default with GPUs) it is an actor pool of :class:`Functionals`, each holding
    the classifier on its device for the whole pass."""
    require_ray("the functionals pass on Ray")
    bundle = {"CPU": 1.0, **({"GPU": float(num_gpus)} if num_gpus else {})}
    ensure_resources(ResourceRequest.uniform(1, bundle, what="diagnose functionals (one map_batches worker)"))
    kwargs = {"spec": spec.to_dict(), "artifacts": blobs, "device": "cuda" if num_gpus else "cpu"}
    if actors:
        res = ray.cluster_resources()
        size = concurrency or max(1, int(res.get("GPU", 0) // num_gpus if num_gpus else res.get("CPU", 1)))
        how = {"fn": Functionals, "fn_constructor_kwargs": kwargs, "num_gpus": num_gpus or None,
               "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=size)}
    else:
        how = {"fn": functionals_batch, "fn_kwargs": kwargs, "concurrency": concurrency, "num_gpus": num_gpus or None}
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        ds = view.ray_dataset(INPUT_COLUMNS, filter=col("diverged") == lit(False))
        # batch_size=None: whole read blocks, so the map fuses with the Parquet read (a batch size
        # would put every sample through the object store between a read task and a map task)
        ds = ds.map_batches(batch_size=None, batch_format="pyarrow", num_cpus=1, **how)
        ds.write_parquet(seg_path, filesystem=view.filesystem, compression="zstd")
    finally:
        ctx.enable_progress_bars = bars
    stage.update(len(view.files))


def _segment_files(fs, table_path: str, seg: str) -> tuple[list, int]:
    """[{file, size}] of a written segment and its row count (from the Parquet footers)."""
    files, rows = [], 0
    sizes = _sizes(fs, posixpath.join(table_path, seg))  # no folder: no row passed the filter
    for name in sorted(n for n in sizes if n.endswith(".parquet") and not n.startswith(".")):
        with fs.open(posixpath.join(table_path, seg, name), "rb") as f:
            rows += pq.read_metadata(f).num_rows
        files.append({"file": f"{seg}/{name}", "size": sizes[name]})
    return files, rows


def _write_segment(view: CommittedView, new: list, spec: FunctionalsSpec, blobs: dict, fs, table_path: str, *,
                   executor: str, num_gpus: float, concurrency: Optional[int], actors: bool, progress: bool) -> dict:
    fs_run_path = fsutil.resolve(view.run_url, view.storage_options)[1]
    sub = dataclasses.replace(view, files=tuple(posixpath.join(fs_run_path, r) for r in new))
    seg = f"seg-{uuid.uuid4().hex[:12]}"
    seg_path = posixpath.join(table_path, seg)
    if executor == "ray":
        with Stage("functionals (Ray Data)", total=len(new), unit="parts", enabled=progress) as stage:
            _write_ray(sub, spec, blobs, seg_path, stage, num_gpus, concurrency, actors)
    else:
        fs.makedirs(seg_path, exist_ok=True)
        with Stage("functionals (in process)", unit="rows", enabled=progress) as stage:
            _write_local(sub, Functionals(spec.to_dict(), blobs), fs, seg_path, stage)
    files, rows = _segment_files(fs, table_path, seg)
    return {"name": seg, "files": files, "rows": rows, "sources": None}


# ---- one pass ------------------------------------------------------------------------------------

def _stale(index: Optional[dict], why: Optional[str], digest: str, sources: dict, rebuild: bool) -> Optional[str]:
    """Why the existing table cannot be extended (None: it can)."""
    if index is None:
        return why
    if rebuild:
        return "rebuild asked for"
    if index["digest"] != digest:
        return "the functionals asked for differ from the table's (spec digest changed)"
    for seg in index["segments"]:
        for s in seg["sources"]:
            if sources.get(s["file"]) != s["size"]:
                return (f"source part {s['file']} is no longer committed or changed size "
                        "(the run was restarted under the same name)")
    return None


def _commit(fs, table_path: str, view: CommittedView, spec: FunctionalsSpec, segments: list) -> dict:
    index = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "run_id": view.manifest["run_id"],
             "spec": spec.to_dict(), "digest": spec.digest(), "columns": spec.columns(), "segments": segments,
             "rows": int(sum(s["rows"] for s in segments)),
             "updated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    data = json.dumps(index, indent=1, allow_nan=False).encode()
    fsutil.atomic_write_bytes(fs, posixpath.join(table_path, INDEX_NAME), data)
    return index


def _remove_unreferenced(fs, table_path: str, index: dict) -> None:
    """Delete what the committed index does not name (dead passes, older specs' files)."""
    keep = {s["name"] for s in index["segments"]} | {INDEX_NAME, "artifacts"}
    arts = {posixpath.basename(a["path"]) for a in (index["spec"]["pca"], index["spec"]["classifier"]) if a}
    for name in fsutil.list_names(fs, table_path):
        if name not in keep:
            fs.rm(posixpath.join(table_path, name), recursive=True)
    for name in fsutil.list_names(fs, posixpath.join(table_path, "artifacts")):
        if name not in arts:
            fsutil.remove(fs, posixpath.join(table_path, "artifacts", name))


def update_table(view: CommittedView, request: FunctionalsRequest, *, executor: str = "ray",
                 rebuild: bool = False, num_gpus: float = 0.0, concurrency: Optional[int] = None,
                 actors: Optional[bool] = None, cache_dir: Optional[str] = None, progress: bool = True) -> TableUpdate:
    """Bring the run's functionals table up to the committed view ``view`` and return it.

    ``executor="ray"``: the pass runs on the cluster this process joined (Ray Data; at most
    ``concurrency`` workers at once; ``num_gpus`` per worker; ``actors``: an actor pool instead of
    tasks fused with the read, default with GPUs); ``"local"``: in this process. Only parts no
    segment covers are read; see the module docstring for when the table is rebuilt instead."""
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    fs, run_path, table_path = _table_location(view.run_url, view.storage_options)
    index, why = _read_index(fs, table_path)
    old = FunctionalsSpec.from_dict(index["spec"]) if index else None
    spec, blobs = resolve_spec(view, request, old, cache_dir)
    sources = _source_sizes(view)
    stale = _stale(index, why, spec.digest(), sources, rebuild)
    rebuilt = None if stale in (None, MISSING) else stale
    if rebuilt:
        _notice(f"rebuilding the table: {rebuilt}", progress)
    if stale is not None:
        index = None
    segments = list(index["segments"]) if index else []
    covered = {s["file"] for seg in segments for s in seg["sources"]}
    new = [r for r in sources if r not in covered]
    rows = 0
    for path, blob in blobs.items():  # new artifacts, or a damaged copy of a reused one
        full = posixpath.join(run_path, path)
        if not fsutil.exists(fs, full) or sha256_bytes(fs.cat_file(full)) != sha256_bytes(blob):
            fsutil.atomic_write_bytes(fs, full, blob)
    if new:
        seg = _write_segment(view, new, spec, blobs, fs, table_path, executor=executor, num_gpus=num_gpus,
                             concurrency=concurrency, actors=bool(num_gpus) if actors is None else actors,
                             progress=progress)
        seg["sources"] = [{"file": r, "size": sources[r]} for r in new]
        segments.append(seg)
        rows = seg["rows"]
    if new or index is None:
        index = _commit(fs, table_path, view, spec, segments)
        _remove_unreferenced(fs, table_path, index)
    return TableUpdate(_table(view.run_url, fs, table_path, index), len(new), rows, rebuilt)
