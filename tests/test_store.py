"""Tests of the Parquet sample store (mmgm_ray.store): schema, rolling, exactly-once restore,
atomic visibility, bad input, and the same round trip on s3:// (moto server over HTTP) and memory://."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from mmgm_ray.config import StoreConfig
from mmgm_ray.jumps import DivergenceEvent, JumpBatch
from mmgm_ray.store import (
    METADATA_COLUMNS,
    FencedError,
    SampleStore,
    StoreFullError,
    StoreNotWritableError,
    acquire_lease,
    create_run,
    load_block_checkpoint,
    load_manifest,
    open_dataset,
    open_run,
    read_divergences,
    read_lease,
    read_samples,
    save_block_checkpoint,
    sync_manifest_from_checkpoints,
    update_manifest,
)
from pinned import cpu_config

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 3, 2)
CHAINS = 4          # chains per block in these tests
JUMP_EVERY = 10


# ---- a tiny deterministic "engine" -------------------------------------------------------------

def jump_batch(block: int, step: int, chains=None, shape=SHAPE, scale: float = 1.0) -> JumpBatch:
    """Deterministic jumps of one block at one walk step (values depend only on block and step)."""
    chains = list(range(CHAINS)) if chains is None else list(chains)
    g = torch.Generator().manual_seed(block * 100_003 + step)
    n = len(chains)
    x = torch.rand((CHAINS, *shape), generator=g)[chains] * scale
    cid = torch.tensor([block * CHAINS + c for c in chains], dtype=torch.int64)
    return JumpBatch(chain_id=cid, block_id=torch.full((n,), block, dtype=torch.int64),
                     step=torch.full((n,), step, dtype=torch.int64),
                     jump_index=torch.full((n,), step // JUMP_EVERY - 1, dtype=torch.int64),
                     xhat=x.float(), score_norm=torch.rand(n, generator=g), kinetic=torch.rand(n, generator=g))


def with_xhat(b: JumpBatch, x: torch.Tensor) -> JumpBatch:
    # JumpBatch overrides __len__ (rows), which breaks namedtuple._replace: rebuild it instead
    return JumpBatch(b.chain_id, b.block_id, b.step, b.jump_index, x, b.score_norm, b.kinetic)


def drive(writer, block: int, start: int, end: int, checkpoint_every: int, diverge_at: int | None = None,
          stop_after: int | None = None) -> None:
    """Run walk steps (start, end] of one block: a jump every JUMP_EVERY steps, chain 1 diverging at
    ``diverge_at``, a block checkpoint every ``checkpoint_every`` steps; return early (a "crash",
    nothing flushed) after ``stop_after``."""
    for step in range(start + 1, end + 1):
        if step % JUMP_EVERY == 0:
            alive = [c for c in range(CHAINS) if diverge_at is None or c != 1 or step < diverge_at]
            writer.add(jump_batch(block, step, alive))
        if diverge_at is not None and step == diverge_at:
            writer.add_divergences([DivergenceEvent(block * CHAINS + 1, block, step, "exploding")])
        if stop_after is not None and step == stop_after:
            return
        if step % checkpoint_every == 0:
            writer.checkpoint({"step": torch.tensor(step), "y": torch.full((CHAINS, 2), float(step))},
                              {"step": step, "status": "done" if step == end else "running"}, step=step)


def expected_rows(end: int, diverge_at: int | None) -> int:
    jumps = sum(len([c for c in range(CHAINS) if diverge_at is None or c != 1 or s < diverge_at])
                for s in range(JUMP_EVERY, end + 1, JUMP_EVERY))
    return jumps + (1 if diverge_at is not None and diverge_at <= end else 0)


def visible_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tree_snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- schema and round trips --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32"])
def test_round_trip_schema_and_metadata(tmp_path, dtype):
    store = create_run(str(tmp_path), "run-a", event_shape=SHAPE, config={"seed": 7},
                       store_config=StoreConfig(sample_dtype=dtype, rows_per_file=1000),
                       model_hash="abc123", seeds={"seed": 7})
    for b in (0, 1):
        w = store.writer(b)
        assert w.resume() is None
        drive(w, b, 0, 60, checkpoint_every=30, diverge_at=35 if b == 1 else None)
    man = sync_manifest_from_checkpoints(store)

    # manifest
    assert man["schema_version"] == "1" and man["event_shape"] == list(SHAPE) and man["sample_dtype"] == dtype
    assert man["model_hash"] == "abc123" and man["seeds"] == {"seed": 7} and man["config"] == {"seed": 7}
    assert man["code_version"]["package"] == "0.1.0"
    assert man["blocks"]["1"]["status"] == "done" and man["blocks"]["1"]["last_step"] == 60
    assert man["divergences"]["count"] == 1 and man["progress"]["blocks_done"] == 2
    assert man["progress"]["rows"] == expected_rows(60, None) + expected_rows(60, 35)

    # schema + metadata of a file as written
    part = tmp_path / "run-a" / "samples" / "block=000001" / "part-000000.parquet"
    schema = pq.read_schema(part)
    want_type = {"uint8": pa.uint8(), "float16": pa.float16(), "float32": pa.float32()}[dtype]
    assert schema.names == ["run_id", "chain_id", "block_id", "step", "jump_index", "sample",
                            "score_norm", "kinetic", "diverged"]
    assert schema.field("sample").type == pa.list_(want_type, 6) and schema.field("sample").nullable
    assert [schema.field(c).type for c in ("chain_id", "block_id", "step", "jump_index")] == [pa.int64()] * 4
    assert schema.field("run_id").type == pa.string() and schema.field("diverged").type == pa.bool_()
    assert schema.field("score_norm").type == pa.float32() and schema.field("kinetic").type == pa.float32()
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["mmgm.schema_version"] == "1" and json.loads(meta["mmgm.shape"]) == list(SHAPE)
    assert meta["mmgm.sample_dtype"] == dtype and meta["mmgm.run_id"] == "run-a"
    assert meta["mmgm.quantization"] == ("round(clip(x,0,1)*255)" if dtype == "uint8" else "none")

    # values back
    x, meta_t = read_samples(store.url)
    assert x.dtype == np.float32 and x.shape == (man["progress"]["samples"], *SHAPE)
    assert meta_t.column_names == METADATA_COLUMNS and not any(meta_t.column("diverged").to_pylist())
    ref = np.stack([jump_batch(b, s).xhat[c].numpy()
                    for b, c, s in zip(meta_t.column("block_id").to_pylist(),
                                       (np.array(meta_t.column("chain_id")) % CHAINS).tolist(),
                                       meta_t.column("step").to_pylist())])
    tol = {"uint8": 0.5 / 255 + 1e-7, "float16": 1e-3, "float32": 0.0}[dtype]
    assert np.abs(x - ref).max() <= tol
    if dtype == "uint8":  # exactly the documented quantization
        assert np.array_equal(np.rint(x * 255), np.rint(np.clip(ref, 0, 1) * 255))
    # divergence row kept in the store, filtered by sample readers
    div = read_divergences(store.url)
    assert div.num_rows == 1 and div.column("chain_id").to_pylist() == [CHAINS + 1]
    raw = pq.read_table(tmp_path / "run-a" / "samples").filter(pc.field("diverged"))
    assert raw.column("sample").null_count == 1 and raw.column("jump_index").to_pylist() == [-1]
    # a chain that diverged emits nothing after its divergence step
    assert meta_t.filter(pc.field("chain_id") == CHAINS + 1).column("step").to_pylist() == [10, 20, 30]


def test_uint8_quantization_clips_and_rounds(tmp_path):
    store = SampleStore(str(tmp_path), "q", event_shape=(4,), sample_dtype="uint8")
    w = store.writer(0)
    w.resume()
    b = jump_batch(0, 10, [0], shape=(4,))
    b = with_xhat(b, torch.tensor([[-0.5, 0.5, 1.7, 0.2]]))
    w.add(b)
    w.flush()
    raw = pq.read_table(tmp_path / "q" / "samples").column("sample").to_pylist()
    assert raw == [[0, 128, 255, 51]]  # round(clip(x,0,1)*255), half to even: 127.5 -> 128
    x, _ = read_samples(store.url, use_manifest=False)
    assert np.allclose(x, [[0.0, 128 / 255, 1.0, 51 / 255]])


def test_readers_pyarrow_pandas_duckdb(tmp_path):
    import duckdb
    import pandas as pd

    store = create_run(str(tmp_path), "rd", event_shape=SHAPE, store_config=StoreConfig(rows_per_file=7))
    w = store.writer(3)
    w.resume()
    drive(w, 3, 0, 50, checkpoint_every=50, diverge_at=25)
    sync_manifest_from_checkpoints(store)
    n_rows = expected_rows(50, 25)
    samples_dir = tmp_path / "rd" / "samples"

    # pyarrow.dataset: the store's view and plain directory discovery agree
    t = open_dataset(store.url).to_table()
    assert t.num_rows == n_rows
    t2 = ds.dataset(str(samples_dir), format="parquet").to_table()
    assert t2.num_rows == n_rows
    # pandas
    df = pd.read_parquet(samples_dir)
    assert len(df) == n_rows and int(df["diverged"].sum()) == 1
    row = df[(df.chain_id == 3 * CHAINS) & (df.step == 20)].iloc[0]
    assert np.allclose(np.asarray(row["sample"], dtype=np.float32),
                       jump_batch(3, 20).xhat[0].numpy().ravel())
    # DuckDB
    con = duckdb.connect()
    glob = f"{samples_dir}/*/*.parquet"
    cnt, ndiv, nnull = con.execute(
        f"SELECT count(*), sum(diverged::INT), count(*) - count(sample) "
        f"FROM read_parquet('{glob}', hive_partitioning = false)").fetchone()
    assert (cnt, ndiv, nnull) == (n_rows, 1, 1)
    # Parquet has no fixed-size list: DuckDB reads a FLOAT list, every non-null one of length 6
    typ, lens = con.execute(f"SELECT any_value(typeof(sample)), list(DISTINCT len(sample)) "
                            f"FROM read_parquet('{glob}', hive_partitioning = false) "
                            f"WHERE sample IS NOT NULL").fetchone()
    assert typ.startswith("FLOAT[") and lens == [6]
    first = con.execute(f"SELECT sample FROM read_parquet('{glob}', hive_partitioning = false) "
                        f"WHERE chain_id = {3 * CHAINS} AND step = 20").fetchone()[0]
    assert np.allclose(np.asarray(first, dtype=np.float32), jump_batch(3, 20).xhat[0].numpy().ravel())


@pytest.mark.ray
def test_ray_data_reads_parts(tmp_path, ray_session):
    # ray_session (tests/conftest.py) is the one Ray instance of the test session: a private
    # ray.init/ray.shutdown here would tear it down under the other Ray tests.
    ray = ray_session
    store = create_run(str(tmp_path), "ray", event_shape=SHAPE,
                       store_config=StoreConfig(sample_dtype="uint8", rows_per_file=9))
    w = store.writer(0)
    w.resume()
    drive(w, 0, 0, 40, checkpoint_every=40)
    sync_manifest_from_checkpoints(store)
    d = ray.data.read_parquet(str(tmp_path / "ray" / "samples"))
    sch = d.schema().base_schema
    assert sch.field("sample").type == pa.list_(pa.uint8(), 6)
    rows = d.take_all()  # one small read task; a filter would start a second stage
    assert len(rows) == expected_rows(40, None)
    assert sorted((r["chain_id"], r["step"]) for r in rows) == \
        sorted((c, s) for c in range(CHAINS) for s in range(10, 41, 10))
    rows = [r for r in rows if r["chain_id"] == 2 and r["step"] == 30]
    got = np.asarray(rows[0]["sample"], dtype=np.float32) / 255
    assert np.allclose(got, jump_batch(0, 30).xhat[2].numpy().ravel(), atol=0.5 / 255 + 1e-7)


# ---- rolling -----------------------------------------------------------------------------------

def test_roll_by_rows(tmp_path):
    store = SampleStore(str(tmp_path), "rows", event_shape=SHAPE, config=StoreConfig(rows_per_file=5))
    w = store.writer(0)
    w.resume()
    for step in range(10, 70, 10):       # 6 batches x 4 rows = 24 rows
        w.add(jump_batch(0, step))
    assert w.buffered_rows == 4 and w.next_seq == 4
    w.flush()
    names = [p.name for p in sorted((tmp_path / "rows" / "samples" / "block=000000").iterdir())]
    assert names == [f"part-{i:06d}.parquet" for i in range(5)]
    sizes = [pq.read_metadata(tmp_path / "rows" / "samples" / "block=000000" / n).num_rows for n in names]
    assert sizes == [5, 5, 5, 5, 4]
    assert w.state()["rows_written"] == 24 and w.flush() is None


def test_roll_by_steps(tmp_path):
    store = SampleStore(str(tmp_path), "steps", event_shape=SHAPE,
                        config=StoreConfig(rows_per_file=100, steps_per_file=20))
    w = store.writer(0)
    w.resume()
    for step in range(10, 70, 10):
        w.add(jump_batch(0, step))
    # one batch spanning two windows is split at the window boundary
    mixed = JumpBatch.cat([jump_batch(0, 70), jump_batch(0, 80), jump_batch(0, 90)])
    w.add(mixed)
    w.flush()
    folder = tmp_path / "steps" / "samples" / "block=000000"
    steps = [sorted(set(pq.read_table(p).column("step").to_pylist())) for p in sorted(folder.iterdir())]
    assert steps == [[10, 20], [30, 40], [50, 60], [70, 80], [90]]
    # rows cap still applies inside a window
    store2 = SampleStore(str(tmp_path), "steps2", event_shape=SHAPE,
                         config=StoreConfig(rows_per_file=3, steps_per_file=20))
    w2 = store2.writer(0)
    w2.resume()
    for step in (10, 20):
        w2.add(jump_batch(0, step))
    w2.flush()
    assert [f.rsplit("/", 1)[1] for f in w2.files] == ["part-000000.parquet", "part-000001.parquet",
                                                       "part-000002.parquet"]
    assert [pq.read_metadata(tmp_path / "steps2" / f).num_rows for f in w2.files] == [3, 3, 2]


# ---- exactly-once: checkpoint, crash, restore --------------------------------------------------

def _reference_run(root: Path, cfg: StoreConfig):
    store = create_run(str(root), "eo", event_shape=SHAPE, store_config=cfg)
    for b in (0, 1):
        w = store.writer(b)
        assert w.resume() is None
        drive(w, b, 0, 200, checkpoint_every=50, diverge_at=75 if b == 0 else None)
    sync_manifest_from_checkpoints(store)
    return store


@pytest.mark.parametrize("cfg", [StoreConfig(rows_per_file=6), StoreConfig(rows_per_file=50, steps_per_file=30)],
                         ids=["rows", "steps"])
def test_crash_restore_rewrites_identical_files(tmp_path, cfg):
    ref = _reference_run(tmp_path / "ref", cfg)

    store = create_run(str(tmp_path / "crash"), "eo", event_shape=SHAPE, store_config=cfg)
    w = store.writer(1)
    w.resume()
    drive(w, 1, 0, 200, checkpoint_every=50)
    w0 = store.writer(0)
    w0.resume()
    # block 0 "crashes" at step 130: checkpoint at 100, parts written after it, buffer lost
    drive(w0, 0, 0, 200, checkpoint_every=50, diverge_at=75, stop_after=130)
    assert w0.next_seq > load_block_checkpoint(store, 0)[1]["writer"]["next_seq"]  # uncommitted parts exist
    block0 = tmp_path / "crash" / "eo" / "samples" / "block=000000"
    (block0 / "part-000099.parquet").write_bytes(b"PAR1 torn garbage")  # anything a dead actor left
    (block0 / ".part-000098.parquet.deadbeef.tmp").write_bytes(b"half")
    sync_manifest_from_checkpoints(store)
    # committed view while crashed: exactly the rows up to the block-0 checkpoint at step 100
    x_mid, m_mid = read_samples(store.url, blocks=[0])
    assert m_mid.column("step").to_numpy().max() == 100
    assert len(x_mid) == expected_rows(100, 75) - 1

    # restart: a new writer (new actor) resumes from the checkpoint and reruns the chains from there
    w0b = store.writer(0)
    tensors, meta = w0b.resume()
    assert meta["step"] == 100 and int(tensors["step"]) == 100 and tensors["y"].shape == (CHAINS, 2)
    assert not (block0 / "part-000099.parquet").exists()
    assert not any(p.name.startswith(".") for p in block0.iterdir())
    drive(w0b, 0, meta["step"], 200, checkpoint_every=50, diverge_at=75)
    sync_manifest_from_checkpoints(store)

    a = visible_bytes(tmp_path / "ref" / "eo" / "samples")
    b = visible_bytes(tmp_path / "crash" / "eo" / "samples")
    assert a.keys() == b.keys() and a == b  # same names, byte-identical
    assert load_manifest(store)["blocks"] == load_manifest(ref)["blocks"]
    x, meta_t = read_samples(store.url)
    keys = list(zip(meta_t.column("chain_id").to_pylist(), meta_t.column("step").to_pylist()))
    assert len(keys) == len(set(keys))                                  # no duplicates
    assert len(keys) + 1 == expected_rows(200, 75) + expected_rows(200, None)  # no gaps (+1 divergence row)
    for c in range(2 * CHAINS):                                          # every chain, every jump step
        steps = sorted(s for cc, s in keys if cc == c)
        last = 70 if c == 1 else 200
        assert steps == list(range(10, last + 1, 10))
    xr, _ = read_samples(ref.url)
    assert np.array_equal(x, xr)


def test_state_requires_flush_and_writer_refuses_stale_parts(tmp_path):
    store = SampleStore(str(tmp_path), "st", event_shape=SHAPE)
    w = store.writer(0)
    w.resume()
    w.add(jump_batch(0, 10))
    with pytest.raises(RuntimeError, match="flush"):
        w.state()
    w.flush()
    assert w.state()["next_seq"] == 1
    # a second writer that skipped resume()/restore() must not silently append next to old parts
    w2 = store.writer(0)
    w2.add(jump_batch(0, 10))
    with pytest.raises(RuntimeError, match="resume"):
        w2.flush()
    # restore() refuses a state whose committed parts are gone
    st = w.state()
    (tmp_path / "st" / "samples" / "block=000000" / "part-000000.parquet").unlink()
    with pytest.raises(RuntimeError, match="missing"):
        store.writer(0).restore(st)
    with pytest.raises(ValueError, match="block ids"):
        w.add(jump_batch(1, 10))


def test_block_checkpoint_is_one_atomic_weights_only_file(tmp_path):
    store = SampleStore(str(tmp_path), "ck", event_shape=SHAPE)
    assert load_block_checkpoint(store, 5) is None
    t = {"y": torch.randn(3, 4), "v": torch.zeros(3, 4), "rng": torch.tensor([1, 2], dtype=torch.int64)}
    path = save_block_checkpoint(store, 5, t, {"step": 40, "note": "x"}, step=40)
    assert path.endswith("checkpoints/block=000005/checkpoint-000000040.pt")
    folder = tmp_path / "ck" / "checkpoints" / "block=000005"
    assert [p.name for p in folder.iterdir()] == ["checkpoint-000000040.pt"]  # one file, no temp left
    obj = torch.load(folder / "checkpoint-000000040.pt", weights_only=True)  # plain weights_only load works
    assert json.loads(obj["meta_json"]) == {"step": 40, "note": "x"} and obj["step"] == 40
    tensors, meta = load_block_checkpoint(store, 5)
    assert meta == {"step": 40, "note": "x"} and all(torch.equal(tensors[k], t[k]) for k in t)
    save_block_checkpoint(store, 5, {"y": torch.ones(1)}, {"step": 50}, step=50)  # the next one replaces it
    assert load_block_checkpoint(store, 5)[1] == {"step": 50}
    assert [p.name for p in folder.iterdir()] == ["checkpoint-000000050.pt"]
    with pytest.raises(ValueError, match="JSON"):
        save_block_checkpoint(store, 5, {"y": torch.ones(1)}, {"bad": object()}, step=60)
    with pytest.raises(ValueError, match="torch.Tensor"):
        save_block_checkpoint(store, 5, {"y": [1, 2]}, {}, step=60)
    assert load_block_checkpoint(store, 5)[1] == {"step": 50}  # failed saves changed nothing
    # a late write of an older step (a writer that lost the block) never moves the checkpoint back
    save_block_checkpoint(store, 5, {"y": torch.zeros(1)}, {"step": 30}, step=30)
    assert load_block_checkpoint(store, 5)[1] == {"step": 50}


def test_fenced_writer_of_an_older_epoch_commits_nothing(tmp_path):
    """Once a newer writer takes the block (acquire_lease), the older writer's part writes and
    checkpoints raise FencedError and leave storage exactly as it was."""
    store = SampleStore(str(tmp_path), "fence", event_shape=SHAPE, config=StoreConfig(rows_per_file=4))
    assert read_lease(store, 0) == 0
    old = store.writer(0)
    old.fence(acquire_lease(store, 0, holder="old"))
    assert old.epoch == 1
    old.add(jump_batch(0, 10))                                   # 4 rows: one part, epoch 1 holds the lease
    old.checkpoint({"y": torch.ones(2)}, {"status": "running"}, step=10)
    assert load_block_checkpoint(store, 0)[1]["epoch"] == 1
    new = store.writer(0)
    new.fence(acquire_lease(store, 0, holder="new"))
    assert new.epoch == 2 and read_lease(store, 0) == 2
    folder = tmp_path / "fence"
    before = tree_snapshot(folder)
    with pytest.raises(FencedError, match="superseded by epoch 2"):
        old.add(jump_batch(0, 20))                               # a full part: refused before writing
    with pytest.raises(FencedError):
        old.checkpoint({"y": torch.zeros(2)}, {"status": "running"}, step=20)
    assert tree_snapshot(folder) == before
    # the new holder resumes from the last commit and goes on
    tensors, meta = new.resume()
    assert meta["epoch"] == 1 and torch.equal(tensors["y"], torch.ones(2))
    new.add(jump_batch(0, 20))
    new.checkpoint({"y": torch.full((2,), 2.0)}, {"status": "running"}, step=20)
    assert load_block_checkpoint(store, 0)[1]["epoch"] == 2 and new.manifest_entry()["epoch"] == 2


# ---- crash during a write, full disk, bad input ------------------------------------------------

CRASH_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {repo!r})
    from fsspec.implementations.local import LocalFileOpener
    from mmgm_ray.config import RunConfig, StoreConfig
    from mmgm_ray.store import SampleStore
    from mmgm_ray.jumps import JumpBatch
    sys.path.insert(0, {tests!r})
    from test_store import jump_batch
    store = SampleStore({root!r}, "cr", event_shape=(1, 3, 2), config=StoreConfig(rows_per_file=8))
    w = store.writer(0)
    w.resume()
    w.add(jump_batch(0, 10)); w.add(jump_batch(0, 20))      # 8 rows -> part 0 written
    print(json.dumps(w.state()), flush=True)
    orig = LocalFileOpener.write
    def dying_write(self, data):
        orig(self, bytes(data)[: max(1, len(data) // 2)])
        self.flush()
        os._exit(17)                                         # the process dies mid-file
    LocalFileOpener.write = dying_write
    w.add(jump_batch(0, 30)); w.add(jump_batch(0, 40))      # part 1 dies while being written
    print("not reached", flush=True)
""")


def test_crash_during_write_leaves_no_visible_partial_file(tmp_path):
    import duckdb

    script = CRASH_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), root=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    state = json.loads(proc.stdout.splitlines()[0])
    folder = tmp_path / "cr" / "samples" / "block=000000"
    names = sorted(p.name for p in folder.iterdir())
    temps = [n for n in names if n.startswith(".")]
    assert [n for n in names if not n.startswith(".")] == ["part-000000.parquet"]
    assert len(temps) == 1 and (folder / temps[0]).stat().st_size > 0  # the torn bytes exist, hidden
    # every reader sees only the complete part
    assert ds.dataset(str(tmp_path / "cr" / "samples"), format="parquet").to_table().num_rows == 8
    assert open_dataset(str(tmp_path / "cr")).count_rows() == 8
    n = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{folder}/*.parquet')").fetchone()[0]
    assert n == 8
    # the restarted writer cleans the temp file and continues at part 1
    store = SampleStore(str(tmp_path), "cr", event_shape=SHAPE, config=StoreConfig(rows_per_file=8))
    w = store.writer(0)
    w.restore(state)
    assert sorted(p.name for p in folder.iterdir()) == ["part-000000.parquet"]
    w.add(jump_batch(0, 30))
    w.add(jump_batch(0, 40))
    assert w.files[-1].endswith("part-000001.parquet") and read_samples(store.url, use_manifest=False)[0].shape[0] == 16


def test_non_finite_sample_rejected(tmp_path):
    store = SampleStore(str(tmp_path), "nf", event_shape=SHAPE)
    w = store.writer(2)
    w.resume()
    b = jump_batch(2, 30)
    x = b.xhat.clone()
    x[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"chain 10 at step 30"):
        w.add(with_xhat(b, x))
    x[2, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite sample for chain 10 at step 30"):
        w.add(with_xhat(b, x))
    assert w.buffered_rows == 0 and w.flush() is None  # nothing of the bad batch was kept
    assert not (tmp_path / "nf" / "samples").exists()
    # float16 overflow would turn a finite sample into inf on disk: rejected too
    s16 = SampleStore(str(tmp_path), "nf16", event_shape=SHAPE, sample_dtype="float16")
    w16 = s16.writer(0)
    w16.resume()
    with pytest.raises(ValueError, match="overflows float16"):
        w16.add(jump_batch(0, 10, scale=1e6))
    with pytest.raises(ValueError, match="event shape"):
        w.add(jump_batch(2, 40, shape=(6,)))


def test_enospc_local_no_partial_file_and_previous_untouched(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileOpener

    store = SampleStore(str(tmp_path), "full", event_shape=SHAPE, config=StoreConfig(rows_per_file=4))
    w = store.writer(0)
    w.resume()
    w.add(jump_batch(0, 10))
    w.add(jump_batch(0, 20))
    folder = tmp_path / "full" / "samples" / "block=000000"
    before = tree_snapshot(folder)
    assert len(before) == 2

    orig = LocalFileOpener.write

    def full_disk(self, data):
        orig(self, bytes(data)[: len(data) // 2])  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalFileOpener, "write", full_disk)
    with pytest.raises(StoreFullError, match="no space left") as ei:
        w.add(jump_batch(0, 30))
    assert ei.value.errno == errno.ENOSPC
    assert tree_snapshot(folder) == before           # no new file, no temp file, old ones untouched
    assert w.next_seq == 2 and w.buffered_rows == 4  # the rows are kept for a retry
    with pytest.raises(StoreFullError):
        save_block_checkpoint(store, 0, {"y": torch.ones(2)}, {"step": 30}, step=30)
    assert not (tmp_path / "full" / "checkpoints" / "block=000000").exists() or \
        not any((tmp_path / "full" / "checkpoints" / "block=000000").iterdir())
    monkeypatch.setattr(LocalFileOpener, "write", orig)
    assert w.flush().endswith("part-000002.parquet")  # space is back: the retry writes the same rows
    assert read_samples(store.url, use_manifest=False)[0].shape[0] == 12


def test_enospc_object_store_no_partial_object(monkeypatch):
    root = f"memory://enospc-{uuid.uuid4().hex[:8]}"
    store = SampleStore(root, "full", event_shape=SHAPE, config=StoreConfig(rows_per_file=4))
    w = store.writer(0)
    w.resume()
    w.add(jump_batch(0, 10))
    before = {p: store.fs.cat_file(p) for p in store.fs.find(store.path)}

    def full(path, value, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.fs, "pipe_file", full)
    with pytest.raises(StoreFullError):
        w.add(jump_batch(0, 20))
    monkeypatch.undo()
    assert {p: store.fs.cat_file(p) for p in store.fs.find(store.path)} == before
    assert store.list_parts() == ["samples/block=000000/part-000000.parquet"]


def test_unwritable_store_path_under_regular_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(StoreNotWritableError, match="not writable"):
        SampleStore(str(f / "sub"), "r", event_shape=SHAPE)
    with pytest.raises(StoreNotWritableError, match="not writable"):
        create_run(str(f), "r", event_shape=SHAPE)
    assert f.read_text() == "x"


RO_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    sys.dont_write_bytecode = True
    from mmgm_ray.store import SampleStore, StoreNotWritableError
    if os.geteuid() == 0:  # root ignores permission bits: drop to nobody (after imports: the
        os.setgid(65534)   # interpreter's own files may be unreadable to nobody)
        os.setuid(65534)
    try:
        SampleStore({root!r}, "r", event_shape=(2,))
    except StoreNotWritableError as e:
        print("REFUSED", e)
    else:
        print("WROTE")
""")


def test_unwritable_store_read_only_folder():
    parent = Path(tempfile.mkdtemp(prefix="mmgm-ro-"))
    try:
        parent.chmod(0o755)
        ro = parent / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        proc = subprocess.run([sys.executable, "-c", RO_SCRIPT.format(repo=str(REPO), root=str(ro))],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HOME": str(parent)})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("REFUSED") and "not writable" in proc.stdout, proc.stdout
        assert list(ro.iterdir()) == []
    finally:
        (parent / "ro").chmod(0o755)
        shutil.rmtree(parent)


@pytest.mark.parametrize("change", [{"event_shape": (6,)}, {"sample_dtype": "uint8"}])
def test_schema_mismatch_on_resume_touches_nothing(tmp_path, change):
    store = create_run(str(tmp_path), "mm", event_shape=SHAPE, store_config=StoreConfig(rows_per_file=5))
    w = store.writer(0)
    w.resume()
    drive(w, 0, 0, 30, checkpoint_every=30)
    sync_manifest_from_checkpoints(store)
    before = tree_snapshot(tmp_path / "mm")
    kw = {"event_shape": SHAPE, "store_config": StoreConfig(rows_per_file=5), **change}
    with pytest.raises(ValueError, match="cannot resume run") as ei:
        create_run(str(tmp_path), "mm", **kw)
    assert ("event_shape" in str(ei.value)) == ("event_shape" in change)
    assert tree_snapshot(tmp_path / "mm") == before
    # without a manifest the parts' own schema metadata is checked
    (tmp_path / "mm" / "manifest.json").unlink()
    before = tree_snapshot(tmp_path / "mm")
    with pytest.raises(ValueError, match="cannot resume run"):
        create_run(str(tmp_path), "mm", **kw)
    assert tree_snapshot(tmp_path / "mm") == before
    # the matching settings resume fine
    again = create_run(str(tmp_path), "mm", event_shape=SHAPE, store_config=StoreConfig(rows_per_file=5))
    assert again.writer(0).resume()[1]["step"] == 30


def test_manifest_is_the_committed_view(tmp_path):
    cfg = cpu_config(None, "name=cv", "seed=3", "store.rows_per_file=4")  # store section comes from here
    store = create_run(f"file://{tmp_path}", "cv", event_shape=SHAPE, config=cfg)
    assert store.config.rows_per_file == 4 and load_manifest(store)["config"]["seed"] == 3
    assert open_dataset(store.url).count_rows() == 0 and read_samples(store.url)[0].shape == (0, *SHAPE)
    store = pickle.loads(pickle.dumps(store))  # what a Ray driver does when it hands the store to actors
    w = store.writer(0)
    w.resume()
    drive(w, 0, 0, 20, checkpoint_every=20)
    sync_manifest_from_checkpoints(store)
    w.add(jump_batch(0, 30))                    # a part written after the checkpoint (uncommitted)
    assert len(store.list_parts(0)) == 3
    assert open_dataset(store.url).count_rows() == 8
    assert open_dataset(store.url, use_manifest=False).count_rows() == 12
    man = update_manifest(store, blocks={0: w.manifest_entry("done")}, status="finished")
    assert man["status"] == "finished" and man["progress"]["rows"] == 12
    assert open_dataset(store.url).count_rows() == 12
    reopened = open_run(store.url)
    assert reopened.event_shape == list(SHAPE) and reopened.config.rows_per_file == 4
    with pytest.raises(ValueError, match="cannot set"):
        update_manifest(store, event_shape=[3])


# ---- memory:// and s3:// (moto server over HTTP) ------------------------------------------------

def _fsspec_round_trip(root: str, storage_options: dict | None = None):
    cfg = StoreConfig(sample_dtype="float16", rows_per_file=6)
    store = create_run(root, "remote", event_shape=SHAPE, store_config=cfg, storage_options=storage_options,
                       seeds=[1, 2])
    w = store.writer(0)
    assert w.resume() is None
    drive(w, 0, 0, 100, checkpoint_every=50, diverge_at=45, stop_after=70)   # crash after step 70
    # an object the dead writer left beyond anything the rerun will write
    store.fs.pipe_file(store.abspath("samples/block=000000/part-000042.parquet"), b"torn")
    w_again = store.writer(0)
    tensors, meta = w_again.resume()
    assert meta["step"] == 50
    drive(w_again, 0, 50, 100, checkpoint_every=50, diverge_at=45)
    man = sync_manifest_from_checkpoints(store)
    assert man["blocks"]["0"]["status"] == "done"
    assert store.list_parts(0) == man["blocks"]["0"]["files"]  # orphans of the crash are gone
    x, meta_t = read_samples(store.url, storage_options=storage_options)
    keys = list(zip(meta_t.column("chain_id").to_pylist(), meta_t.column("step").to_pylist()))
    assert len(keys) == len(set(keys)) == expected_rows(100, 45) - 1
    ref = np.stack([jump_batch(0, s).xhat[c].numpy() for c, s in keys])
    assert np.abs(x - ref).max() <= 1e-3
    assert read_divergences(store.url, storage_options=storage_options).num_rows == 1
    assert open_run(store.url, storage_options=storage_options).sample_dtype == "float16"
    return store, man


def test_memory_filesystem_round_trip():
    root = f"memory://mmgm-{uuid.uuid4().hex[:8]}"  # memory:// is per process: fine within one test
    store, man = _fsspec_round_trip(root)
    names = store.fs.find(store.path)
    assert not any(n.rsplit("/", 1)[1].startswith(".") for n in names)  # no temp objects
    assert load_manifest(store.url)["seeds"] == [1, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    try:
        yield endpoint, opts
    finally:
        server.stop()


def test_s3_round_trip_through_moto_server(moto_s3):
    import boto3
    import s3fs

    endpoint, opts = moto_s3
    bucket = f"mmgm-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    store, man = _fsspec_round_trip(f"s3://{bucket}/runs", opts)
    assert isinstance(store.fs, s3fs.S3FileSystem)
    # the objects really are on the server: list them with a plain boto3 client over HTTP
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    parts = [k for k in keys if "/samples/" in k]
    assert parts == [f"runs/remote/{f}" for f in man["blocks"]["0"]["files"]]
    assert "runs/remote/manifest.json" in keys and "runs/remote/checkpoints/block=000000/checkpoint-000000100.pt" in keys
    assert not any(k.rsplit("/", 1)[1].startswith(".") for k in keys)  # no probe / temp objects left
    body = client.get_object(Bucket=bucket, Key=parts[0])["Body"].read()
    assert pq.read_schema(pa.BufferReader(body)).metadata[b"mmgm.sample_dtype"] == b"float16"
    # a missing bucket is reported before any chain runs, and no bucket gets created
    with pytest.raises(StoreNotWritableError, match="not writable"):
        SampleStore(f"s3://no-such-{bucket}/runs", "r", event_shape=SHAPE, storage_options=opts)
    assert f"no-such-{bucket}" not in [b["Name"] for b in client.list_buckets()["Buckets"]]
