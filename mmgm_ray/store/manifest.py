"""Run manifest ``{root}/{run_id}/manifest.json``: what was run, with what, and which files are committed.

Fields (manifest_version 1)::

    format, manifest_version, schema_version, run_id, event_shape, sample_dtype, quantization,
    store {rows_per_file, steps_per_file, compression}, config (resolved run config, dict),
    model_hash, seeds, code_version {package, git_commit}, created_at, updated_at, resumes,
    blocks {"<block_id>": {files, rows, last_step, divergences, status}},
    progress {blocks, blocks_done, rows, samples, min_last_step, max_last_step},
    divergences {count, by_block}, extra

The manifest is written atomically and by ONE process (the pool driver): actors never write it,
they commit through their block checkpoints; the driver folds those in with
:func:`sync_manifest_from_checkpoints` or :func:`update_manifest`. Readers that find a manifest read
only the files it lists (the committed view).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Sequence

import pyarrow.parquet as pq

from mmgm_ray.config import StoreConfig, from_dict, to_dict
from mmgm_ray.store import fsutil
from mmgm_ray.store.schema import QUANTIZATION, SCHEMA_VERSION, normalize_shape, schema_info
from mmgm_ray.store.store import SampleStore, checkpointed_blocks, load_block_checkpoint

MANIFEST_FORMAT = "mmgm.run_manifest"
MANIFEST_VERSION = 1
#: what every reader of a manifest relies on
REQUIRED_KEYS = ("run_id", "event_shape", "sample_dtype", "blocks")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def code_version() -> dict:
    """{package: mmgm-ray version, git_commit: HEAD of the source checkout or None}."""
    try:
        pkg = importlib.metadata.version("mmgm-ray")
    except importlib.metadata.PackageNotFoundError:
        pkg = None
    src = Path(__file__).resolve().parents[2]
    if pkg is None:  # running from a source tree that is not installed
        try:
            pkg = tomllib.loads((src / "pyproject.toml").read_text())["project"]["version"]
        except Exception:
            pkg = "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    return {"package": pkg, "git_commit": commit}


def _config_dict(config: Any) -> dict | None:
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        return to_dict(config)
    if isinstance(config, dict):
        return dict(config)
    raise ValueError(f"config must be a config dataclass or a dict, got {type(config).__name__}")


def _store_config_from(config: Any, store_config: StoreConfig | None) -> StoreConfig:
    if store_config is not None:
        return store_config
    if dataclasses.is_dataclass(config) and isinstance(getattr(config, "store", None), StoreConfig):
        return config.store
    if isinstance(config, dict) and isinstance(config.get("store"), dict):
        return from_dict(StoreConfig, config["store"])
    return StoreConfig()


def _split_run_url(run_url: str) -> tuple[str, str]:
    root, _, run_id = str(run_url).rstrip("/").rpartition("/")
    if not run_id:
        raise ValueError(f"cannot tell the run id from {run_url!r}; expected ROOT/RUN_ID")
    return root, run_id


def _manifest_location(run: SampleStore | str, storage_options: dict | None):
    if isinstance(run, SampleStore):
        return run.fs, run.manifest_path
    fs, path = fsutil.resolve(str(run).rstrip("/"), storage_options)
    return fs, f"{path}/manifest.json"


def load_manifest(run: SampleStore | str, storage_options: dict | None = None) -> dict | None:
    """The manifest of a run (a SampleStore or a run URL ``{root}/{run_id}``), or None if there is none."""
    fs, path = _manifest_location(run, storage_options)
    if not fsutil.exists(fs, path):
        return None
    try:
        man = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {e}); if the run's block checkpoints "
                         f"are intact, move the file away and resume: the manifest is rebuilt from them") from e
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an mmgm run manifest")
    missing = [k for k in REQUIRED_KEYS if k not in man]
    if missing:
        raise ValueError(f"{path}: run manifest lacks {missing}; if the run's block checkpoints are intact, move "
                         f"the file away and resume: the manifest is rebuilt from them")
    return man


def write_manifest(store: SampleStore, manifest: dict) -> None:
    """Write a whole manifest atomically (single writer: the driver)."""
    data = json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False).encode()
    fsutil.atomic_write_bytes(store.fs, store.manifest_path, data)


def _compat_errors(found: dict, store: SampleStore) -> list[str]:
    want = {"schema_version": SCHEMA_VERSION, "event_shape": store.event_shape, "sample_dtype": store.sample_dtype}
    return [f"{k}: existing run has {found.get(k)!r}, this run asks for {v!r}"
            for k, v in want.items() if found.get(k) != v]


def _check_existing(store: SampleStore) -> dict | None:
    """Raise ValueError if existing data of the run is incompatible; return the manifest if any."""
    man = load_manifest(store)
    if man is not None:
        errors = _compat_errors(man, store)
    else:
        parts = store.list_parts()
        if not parts:
            return None
        with store.fs.open(store.abspath(parts[0]), "rb") as f:
            info = schema_info(pq.read_schema(f))
        errors = _compat_errors({"schema_version": info["schema_version"], "event_shape": info["shape"],
                                 "sample_dtype": info["sample_dtype"]}, store)
    if errors:
        raise ValueError(f"cannot resume run {store.url}: it was written with a different layout; "
                         f"no existing file was touched. " + "; ".join(errors)
                         + ". Use a new run_id, or the original settings.")
    return man


def create_run(root: str, run_id: str, *, event_shape: Sequence[int], config: Any = None,
               store_config: StoreConfig | None = None, sample_dtype: str | None = None,
               model_hash: str | None = None, seeds: Any = None, storage_options: dict | None = None,
               extra: dict | None = None, replace: bool = False) -> SampleStore:
    """Create a run (or resume an existing one) and return its :class:`SampleStore`.

    Checks that the store is writable (raising :class:`StoreNotWritableError` before any chain
    runs). If the run already exists, its schema version, event shape and sample dtype must match
    (else ValueError, and nothing existing is modified); on a match the manifest's ``resumes``
    counter is bumped and everything else is kept. ``config`` (a RunConfig or dict) is recorded
    resolved; its ``store`` section is used unless ``store_config`` is given.

    ``replace=True`` starts an existing run that never committed anything (no block checkpoint: it
    failed or was stopped before its first commit) afresh: its files are removed and a new manifest
    is written. A run with a block checkpoint is never replaced (ValueError).
    """
    cfg = _store_config_from(config, store_config)
    store = SampleStore(root, run_id, event_shape=event_shape, config=cfg, sample_dtype=sample_dtype,
                        storage_options=storage_options, check_writable=True)
    if replace:
        _clear_uncommitted(store)
    existing = _check_existing(store)
    if existing is not None:
        existing["resumes"] = int(existing.get("resumes", 0)) + 1
        existing["updated_at"] = _now()
        write_manifest(store, existing)
        return store
    config_dict = _config_dict(config)
    man = {
        "format": MANIFEST_FORMAT, "manifest_version": MANIFEST_VERSION,
        "schema_version": SCHEMA_VERSION, "run_id": run_id,
        "event_shape": normalize_shape(event_shape), "sample_dtype": store.sample_dtype,
        "quantization": QUANTIZATION[store.sample_dtype],
        "store": {"rows_per_file": cfg.rows_per_file, "steps_per_file": cfg.steps_per_file,
                  "compression": cfg.compression},
        "config": config_dict, "model_hash": model_hash, "seeds": seeds,
        "code_version": code_version(), "created_at": _now(), "updated_at": _now(), "resumes": 0,
        "blocks": {}, "progress": {}, "divergences": {"count": 0, "by_block": {}},
        "extra": dict(extra or {}),
    }
    _recompute(man)
    write_manifest(store, man)
    return store


def _clear_uncommitted(store: SampleStore) -> None:
    committed = checkpointed_blocks(store)
    if committed:
        raise ValueError(f"run {store.url} has committed blocks {committed[:5]}...; it is resumed, never replaced")
    for folder in ("samples", "checkpoints"):
        if fsutil.exists(store.fs, store.abspath(folder)):
            store.fs.rm(store.abspath(folder), recursive=True)
    fsutil.remove(store.fs, store.manifest_path)


def manifest_from_checkpoints(run_url: str, storage_options: dict | None = None) -> dict | None:
    """The manifest of a run whose ``manifest.json`` is gone, rebuilt from its block checkpoints
    (not written): config, model hash and event shape from the run record every checkpoint carries,
    the actor layout from their layouts, the committed files from their writer states. None when
    the run has no block checkpoint; ValueError when the checkpoints carry no run record (written
    before records existed) or disagree. Divergence counts are kept; the event list (with reasons)
    is not recoverable and starts empty (the divergence rows stay in the store)."""
    root, run_id = _split_run_url(run_url)
    # a store object only to locate and read checkpoints: the event shape comes from them
    locator = SampleStore(root, run_id, event_shape=(1,), storage_options=storage_options, check_writable=False)
    blocks = checkpointed_blocks(locator)
    if not blocks:
        return None
    metas = {b: load_block_checkpoint(locator, b)[1] for b in blocks}
    records = {json.dumps(m.get("run"), sort_keys=True) for m in metas.values()}
    if len(records) != 1 or not metas[blocks[0]].get("run"):
        raise ValueError(f"cannot rebuild the manifest of {run_url}: its block checkpoints carry "
                         f"{'no run record' if not metas[blocks[0]].get('run') else 'different run records'}; "
                         f"resume with the run's config (--config) on a run that still has its manifest.json")
    run = metas[blocks[0]]["run"]
    cfg = from_dict(StoreConfig, run["config"]["store"])
    layout = sorted({tuple(m["layout"]) for m in metas.values()})
    man = {
        "format": MANIFEST_FORMAT, "manifest_version": MANIFEST_VERSION, "schema_version": SCHEMA_VERSION,
        "run_id": run_id, "event_shape": normalize_shape(run["event_shape"]), "sample_dtype": cfg.sample_dtype,
        "quantization": QUANTIZATION[cfg.sample_dtype],
        "store": {"rows_per_file": cfg.rows_per_file, "steps_per_file": cfg.steps_per_file,
                  "compression": cfg.compression},
        "config": run["config"], "model_hash": run["model_hash"], "seeds": None, "code_version": code_version(),
        "created_at": _now(), "updated_at": _now(), "resumes": 0, "status": "interrupted",
        "blocks": {str(b): _entry(m) for b, m in metas.items()}, "divergence_events": [],
        "extra": {"layout": [list(g) for g in layout], "kind": "sample",
                  "rebuilt": {"at": _now(), "from": f"{len(blocks)} block checkpoints"}},
    }
    _recompute(man)
    return man


def _entry(meta: dict) -> dict:
    """A block's manifest entry from its checkpoint meta (the committed writer state)."""
    st = meta["writer"]
    return {"files": st["files"], "rows": st["rows_written"], "last_step": st["last_step"],
            "divergences": st.get("divergences", 0), "status": meta.get("status", "running"),
            "epoch": meta.get("epoch")}


def open_run(run_url: str, *, storage_options: dict | None = None, check_writable: bool = True) -> SampleStore:
    """Open an existing run ``{root}/{run_id}`` from its manifest (shape, dtype and rolling from there)."""
    man = load_manifest(run_url, storage_options)
    if man is None:
        raise FileNotFoundError(f"no manifest.json under {run_url}; create the run with create_run()")
    root, run_id = _split_run_url(run_url)
    cfg = StoreConfig(sample_dtype=man["sample_dtype"], **man.get("store", {}))
    return SampleStore(root, run_id, event_shape=man["event_shape"], config=cfg,
                       storage_options=storage_options, check_writable=check_writable)


def _recompute(man: dict) -> None:
    blocks = man.get("blocks", {})
    steps = [b["last_step"] for b in blocks.values() if b.get("last_step") is not None]
    rows = sum(int(b.get("rows", 0)) for b in blocks.values())
    div = {k: int(b.get("divergences", 0)) for k, b in blocks.items() if b.get("divergences")}
    man["progress"] = {
        "blocks": len(blocks),
        "blocks_done": sum(1 for b in blocks.values() if b.get("status") == "done"),
        "rows": rows, "samples": rows - sum(div.values()),
        "min_last_step": min(steps) if steps else None, "max_last_step": max(steps) if steps else None,
    }
    man["divergences"] = {"count": sum(div.values()), "by_block": div}


def update_manifest(store: SampleStore, *, blocks: dict[int, dict] | None = None, **fields) -> dict:
    """Read-modify-write the manifest: merge per-block entries ``{block_id: {files, rows, last_step,
    divergences, status}}`` (see :meth:`BlockWriter.manifest_entry`), set top-level ``fields``
    (e.g. ``status="done"``), recompute ``progress`` and ``divergences``; write atomically.

    Single writer only (the driver). Returns the new manifest.
    """
    man = load_manifest(store)
    if man is None:
        raise FileNotFoundError(f"no manifest under {store.url}; call create_run() first")
    reserved = {"format", "manifest_version", "schema_version", "run_id", "event_shape", "sample_dtype",
                "blocks", "progress", "divergences"}
    bad = reserved & set(fields)
    if bad:
        raise ValueError(f"update_manifest cannot set {sorted(bad)}")
    for b, entry in (blocks or {}).items():
        key = str(int(b))
        merged = dict(man["blocks"].get(key, {}))
        merged.update(entry)
        man["blocks"][key] = merged
    man.update(fields)
    man["updated_at"] = _now()
    _recompute(man)
    write_manifest(store, man)
    return man


def sync_manifest_from_checkpoints(store: SampleStore, block_ids: Sequence[int] | None = None) -> dict:
    """Fold the committed state of each block checkpoint into the manifest (driver-side).

    For every block (``block_ids`` or all blocks that have samples), the entry becomes the writer
    state saved in its latest checkpoint, with ``status = meta.get("status", "running")``. Parts
    written after a block's checkpoint are therefore not listed (they are not committed yet).
    """
    ids = list(block_ids) if block_ids is not None else store.list_blocks()
    entries = {}
    for b in ids:
        ck = load_block_checkpoint(store, b)
        if ck is not None:
            entries[b] = _entry(ck[1])
    return update_manifest(store, blocks=entries)
