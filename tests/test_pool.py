"""The Ray chain pool (mmgm_ray.pool): exactly-once sample stores under actor kills, driver stops,
crashes mid-write and divergences; s3:// over HTTP (moto server); bad input; ``mmgm generate``.

The reference is one uninterrupted 2-actor run of 1,024 oracle chains; every faulty run of the same
config must end with the same rows, bitwise (sample bytes included), no duplicate and no gap.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import random
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmgm_ray import faults
from mmgm_ray.config import DataConfig, RunConfig
from mmgm_ray.engine import WalkJumpEngine, chain_blocks
from mmgm_ray.factory import load_sampling_model
from mmgm_ray.store import (StoreNotWritableError, create_run, load_manifest, open_dataset, read_divergences,
                            read_lease, read_samples, sync_manifest_from_checkpoints)
from s3_server import s3_bucket
from pinned import cpu_dict, cpu_sets

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

CHAINS, STEPS, JUMP, CKPT = 1024, 100, 5, 20


def gmm_cfg(out, name, **pool) -> RunConfig:
    d = {"name": name, "output": str(out), "seed": 3, "noise": {"sigma": 1.0, "M": 4},
         "oracle": {"kind": "gmm"}, "data": {"name": "gmm"},
         "sampler": {"block_size": 128, "jump_every": JUMP},
         "store": {"rows_per_file": 700},  # parts roll inside checkpoint intervals too
         # commits at every boundary: the kills and stops below land between known checkpoints
         "pool": {"num_chains": CHAINS, "num_steps": STEPS, "checkpoint_every": CKPT, "num_actors": 2,
                  "cpus_per_actor": 1.0, "max_restarts": 3,
                  "checkpoint_min_interval_s": 0.0, **pool}}
    return cpu_dict(d)


def rows(url, storage_options=None) -> tuple[pa.Table, bytes]:
    """(metadata columns without run_id, sorted by chain/step; the sample bytes in that order)."""
    t = open_dataset(url, storage_options=storage_options).to_table()
    t = t.sort_by([("chain_id", "ascending"), ("step", "ascending"), ("diverged", "ascending")])
    sample = t.column("sample").combine_chunks()
    data = sample.flatten().to_numpy(zero_copy_only=False).tobytes() if len(sample) else b""
    return t.drop(["run_id", "sample"]).replace_schema_metadata(None), data


def assert_same_rows(url, ref, storage_options=None):
    meta, data = rows(url, storage_options)
    ref_meta, ref_data = ref
    assert meta.num_rows == ref_meta.num_rows
    assert meta.equals(ref_meta)
    assert data == ref_data  # bitwise


def assert_exactly_once(meta: pa.Table, chains=CHAINS, steps=STEPS):
    keys = list(zip(meta.column("chain_id").to_pylist(), meta.column("step").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate (chain, step) rows"
    want = {(c, s) for c in range(chains) for s in range(JUMP, steps + 1, JUMP)}
    assert set(keys) == want, "missing or extra rows"


def no_orphans(run_dir: pathlib.Path):
    """Every visible part is listed by the manifest, and no temp file remains."""
    man = json.loads((run_dir / "manifest.json").read_text())
    listed = {f for b in man["blocks"].values() for f in b["files"]}
    on_disk = {str(p.relative_to(run_dir)) for p in (run_dir / "samples").rglob("*.parquet")}
    assert on_disk == listed
    assert not [p for p in run_dir.rglob(".*") if p.is_file()]


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    from mmgm_ray.pool import run_pool

    out = tmp_path_factory.mktemp("pool-ref")
    summary = run_pool(gmm_cfg(out, "ref"), progress=False)
    return out, summary, rows(summary["url"])


# ---- round trip, >= 1,000 chains on 2 actors ---------------------------------------------------

def test_round_trip_two_actors_1024_chains(reference, capsys):
    import ray

    out, summary, ref = reference
    assert summary["status"] == "done" and summary["actors"] == 2 and summary["chains"] == CHAINS
    assert summary["rows"] == summary["samples"] == CHAINS * STEPS // JUMP
    meta, data = ref
    assert_exactly_once(meta)
    assert not np.isnan(np.frombuffer(data, np.float32)).any()
    no_orphans(out / "ref")
    # bitwise the same as the bare engine run in this process with the pool's layout
    cfg = gmm_cfg(out, "ref")
    model, shape, _ = load_sampling_model(cfg, "cpu")
    x_pool, m_pool = read_samples(summary["url"])
    for group in summary["layout"]:
        eng = WalkJumpEngine(model, cfg.sampler, shape, cfg.seed, group)
        eng.initialize()
        jb = eng.run_collect(STEPS)
        order = np.lexsort((jb.step.numpy(), jb.chain_id.numpy()))
        sel = np.isin(m_pool.column("block_id").to_numpy(), group)
        assert np.array_equal(x_pool[sel], jb.xhat.numpy()[order])
    # manifest: resolved config, model hash, seeds, code version, progress
    man = load_manifest(summary["url"])
    assert man["status"] == "done" and man["config"]["pool"]["num_chains"] == CHAINS
    assert man["model_hash"].startswith("oracle-") and man["seeds"]["run_seed"] == 3
    assert "package" in man["code_version"] and man["extra"]["layout"] == summary["layout"]
    assert man["pool_progress"]["chain_steps_done"] == CHAINS * STEPS
    # other readers: pyarrow.dataset over the folder, Ray Data
    import pyarrow.dataset as pads
    assert pads.dataset(str(out / "ref" / "samples"), format="parquet").count_rows() == summary["rows"]
    rds = ray.data.read_parquet(str(out / "ref" / "samples")).materialize()  # one execution
    assert rds.count() == summary["rows"]
    assert pa.types.is_fixed_size_list(rds.schema().base_schema.field("sample").type)


def test_progress_line_on_stderr(capsys):
    from mmgm_ray.pool.driver import _Progress

    p = _Progress(1000, 10, 100, True)
    p.snapshot(0, 0, 0)
    p.snapshot(100, 8, 10, 0.0)   # first results: the wall rate is measured from here
    time.sleep(1.1)
    snap = p.snapshot(500, 40, 50, 0.0)
    p.show(snap, final=True)
    err = capsys.readouterr().err
    assert "chains 10" in err and "chain-steps/s" in err and "samples 40" in err and "ETA" in err
    assert 0 < snap["chain_steps_per_s"] and snap["eta_s"] is not None


# ---- faults: actor kills, driver stop --------------------------------------------------------------

@pytest.mark.slow
def test_actors_killed_mid_run_same_rows_bitwise(reference, tmp_path, monkeypatch):
    import ray

    from mmgm_ray.pool import run_pool

    rng = random.Random(7)
    kills = {0: 0, 1: 0}

    def killer(state):
        # kill only after the actor returned a checkpointed chunk, while its next chunk runs
        for i, handle in list(state.actors.items()):
            step = state.steps.get(i, 0)
            if step < CKPT or step >= STEPS - CKPT:
                continue
            if i == 0 and kills[0] < 2 and step >= CKPT * (1 + 2 * kills[0]):
                time.sleep(rng.uniform(0.0, 0.15))
                ray.kill(handle, no_restart=False)   # Ray restarts it; the pending call is retried
                kills[0] += 1
            elif i == 1 and kills[1] == 0:
                time.sleep(rng.uniform(0.0, 0.15))
                ray.kill(handle, no_restart=True)    # dead for good: the pool starts a replacement
                kills[1] += 1

    monkeypatch.setenv(faults.ENV, json.dumps({"actor_step_sleep": 0.01}))  # kills land mid-chunk
    summary = run_pool(gmm_cfg(tmp_path, "killed"), progress=False, on_progress=killer)
    assert kills[0] >= 1 and kills[1] == 1
    assert summary["status"] == "done"
    assert summary["replacements"] >= 1 and summary["restarts"] >= 1
    assert_same_rows(summary["url"], reference[2])
    no_orphans(tmp_path / "killed")


def test_driver_stop_then_resume_same_rows(reference, tmp_path, monkeypatch):
    from mmgm_ray import cli
    from mmgm_ray.pool import run_pool

    def ctrl_c(state):
        if state.chunks_done >= 2:
            raise KeyboardInterrupt

    monkeypatch.setenv(faults.ENV, json.dumps({"actor_step_sleep": 0.005}))
    summary = run_pool(gmm_cfg(tmp_path, "stopped"), progress=False, on_progress=ctrl_c)
    assert summary["status"] == "interrupted" and summary["min_step"] < STEPS
    man = load_manifest(summary["url"])
    assert man["status"] == "interrupted"
    committed = man["progress"]["rows"]
    assert 0 < committed < CHAINS * STEPS // JUMP
    # committed view is consistent: exactly the rows up to each block's last checkpoint
    meta, _ = rows(summary["url"])
    assert meta.num_rows == committed
    # resume through the CLI with the run's recorded config
    assert cli.main(["sample", "--resume", summary["url"], "--no-progress", *cpu_sets()]) == 0
    man = load_manifest(summary["url"])
    assert man["status"] == "done" and man["resumes"] == 1
    assert_same_rows(summary["url"], reference[2])
    no_orphans(tmp_path / "stopped")


# ---- crash during a write / during a checkpoint (in-process actor) ---------------------------------

def _inprocess(root, name, cfg, crash=None, monkeypatch=None):
    """Drive one ChainActor in this process; ``crash`` makes a store call fail once, then restart."""
    from mmgm_ray.pool import ChainActor

    create_run(str(root), name, event_shape=(2,), config=cfg)
    blocks = chain_blocks(cfg.pool.num_chains, cfg.sampler.block_size)
    if crash is not None:
        undo = crash(monkeypatch)
        actor = ChainActor(cfg, str(root), name, blocks)
        with pytest.raises(RuntimeError, match="simulated crash"):
            while not actor.advance(CKPT)["done"]:
                pass
        actor.close()
        undo()
        # a hard kill would also leave a hidden temp file behind
        junk = root / name / "samples" / "block=000000" / ".part-000099.parquet.dead.tmp"
        junk.write_bytes(b"PAR1 half a file")
        # nothing visible is partial: every visible part is a whole Parquet file
        for p in (root / name / "samples").rglob("part-*.parquet"):
            pq.read_table(p)
    actor = ChainActor(cfg, str(root), name, blocks)
    while not actor.advance(CKPT)["done"]:
        pass
    actor.close()
    store = create_run(str(root), name, event_shape=(2,), config=cfg)
    sync_manifest_from_checkpoints(store, blocks)
    return store.url


def _crash_mid_write(monkeypatch):
    import mmgm_ray.store.store as st

    real = st.pq.write_table
    calls = {"n": 0}

    def half_write(table, f, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            buf = pa.BufferOutputStream()
            real(table, buf, **kw)
            f.write(buf.getvalue().to_pybytes()[:100])  # half a file, then the process "dies"
            raise OSError("simulated crash during a Parquet write")
        return real(table, f, **kw)

    monkeypatch.setattr(st.pq, "write_table", half_write)
    return monkeypatch.undo


def _crash_mid_checkpoint(monkeypatch):
    import mmgm_ray.store.store as st

    real = st.save_block_checkpoint
    calls = {"n": 0}

    def second_block_fails(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # 2nd checkpoint round: block 0 saved at step 40, block 1 still at 20
            raise OSError("simulated crash while saving block checkpoints")
        return real(*a, **kw)

    monkeypatch.setattr(st, "save_block_checkpoint", second_block_fails)
    return monkeypatch.undo


@pytest.mark.parametrize("crash", [_crash_mid_write, _crash_mid_checkpoint], ids=["mid-write", "mid-checkpoint"])
def test_crash_leaves_no_partial_file_and_restart_is_exact(tmp_path, monkeypatch, crash):
    cfg = gmm_cfg(tmp_path, "x", num_chains=128, num_steps=80)
    cfg.sampler.block_size = 64
    cfg.store.rows_per_file = 300
    ref = rows(_inprocess(tmp_path, "clean", cfg))
    url = _inprocess(tmp_path, "crashed", cfg, crash=crash, monkeypatch=monkeypatch)
    assert_same_rows(url, ref)
    assert_exactly_once(rows(url)[0], chains=128, steps=80)
    no_orphans(tmp_path / "crashed")


def test_zombie_writer_is_fenced_and_rows_stay_bitwise(tmp_path):
    """Two actors hold the same blocks with different epochs (an actor on a lost node that still
    runs, and its replacement): the older one's commits are refused, no checkpoint moves back, and
    the store equals an uninterrupted run bitwise."""
    from mmgm_ray.pool import ChainActor

    cfg = gmm_cfg(tmp_path, "x", num_chains=128, num_steps=80)
    cfg.sampler.block_size = 64
    cfg.store.rows_per_file = 300
    ref = rows(_inprocess(tmp_path, "clean", cfg))
    store = create_run(str(tmp_path), "zombie", event_shape=(2,), config=cfg)
    blocks = chain_blocks(cfg.pool.num_chains, cfg.sampler.block_size)
    old = ChainActor(cfg, str(tmp_path), "zombie", blocks)
    old.advance(CKPT)
    old.commit()                                        # step 20 committed under epoch 1
    new = ChainActor(cfg, str(tmp_path), "zombie", blocks)
    assert new.start_step == CKPT and {read_lease(store, b) for b in blocks} == {2}
    latest = {b: store.checkpoint_steps(b) for b in blocks}
    with pytest.raises(RuntimeError, match="FencedError"):
        old.advance(CKPT)                               # the zombie walks on, but may not commit
        old.commit()
    assert {b: store.checkpoint_steps(b) for b in blocks} == latest
    seen = [min(store.checkpoint_steps(b)[-1] for b in blocks)]
    while not new.advance(CKPT)["done"]:
        seen.append(min(store.checkpoint_steps(b)[-1] for b in blocks))
    new.commit()
    assert seen == sorted(seen)                         # checkpoints only ever move forward
    new.close()
    old.close()
    man = sync_manifest_from_checkpoints(store, blocks)
    assert {e["epoch"] for e in man["blocks"].values()} == {2}
    assert_same_rows(store.url, ref)
    assert_exactly_once(rows(store.url)[0], chains=128, steps=80)
    no_orphans(tmp_path / "zombie")


def test_block_size_does_not_change_the_rows(tmp_path):
    """Noise is keyed per chain, not per block: block sizes 32 and 128 store the same rows, bitwise
    (with the previous per-block keying most rows differed)."""
    stored = []
    for bs in (32, 128):
        cfg = gmm_cfg(tmp_path, f"bs{bs}", num_chains=128, num_steps=40)
        cfg.sampler.block_size = bs
        meta, data = rows(_inprocess(tmp_path, f"bs{bs}", cfg))
        stored.append((meta.drop(["block_id"]), data))
    (meta_a, data_a), (meta_b, data_b) = stored
    assert meta_a.num_rows == 128 * 40 // JUMP
    assert meta_a.equals(meta_b) and data_a == data_b


def _commit_steps(cfg, root, name, stretch=None, stop=None) -> tuple[list[int], str]:
    """Advance one in-process actor chunk by chunk; return the step each call returned at (each
    right after a checkpoint) and the run's url. ``stretch`` overrides the memory plan's;
    ``stop(actor)`` arms a stop request (then one call)."""
    import dataclasses

    from mmgm_ray.pool import ChainActor

    store = create_run(str(root), name, event_shape=(2,), config=cfg)
    blocks = chain_blocks(cfg.pool.num_chains, cfg.sampler.block_size)
    actor = ChainActor(cfg, str(root), name, blocks)
    if stretch is not None:
        actor.memory_plan = dataclasses.replace(actor.memory_plan, checkpoint_stretch=stretch)
    if stop is not None:
        stop(actor)
    returned, done = [], False
    while not done:
        r = actor.advance(CKPT)
        returned.append(r["step"])
        done = r["done"] or stop is not None
    actor.commit()
    actor.close()
    assert {b: store.checkpoint_steps(b) for b in blocks} == {b: [returned[-1]] for b in blocks}
    sync_manifest_from_checkpoints(store, blocks)
    return returned, store.url


def test_min_interval_passes_boundaries_by_and_keeps_the_rows(tmp_path):
    """``pool.checkpoint_min_interval_s``: a cheap oracle reaches a boundary every few milliseconds.
    With an hour's minimum the actor commits only at the end of the run (one part per block instead
    of one per interval); with 0 at every boundary; with the memory plan's stretch at 3 at every
    third one (the end of the run always commits). The rows are the same bitwise in all three."""
    runs = {}
    for name, interval, stretch in (("every", 0.0, None), ("hour", 3600.0, 64), ("stretch3", 3600.0, 3)):
        cfg = gmm_cfg(tmp_path, name, num_chains=128, num_steps=100, checkpoint_min_interval_s=interval)
        cfg.sampler.block_size = 64
        cfg.store.rows_per_file = 10_000      # parts roll only at commits
        runs[name] = _commit_steps(cfg, tmp_path, name, stretch)
    assert runs["every"][0] == [20, 40, 60, 80, 100]
    assert runs["hour"][0] == [100]
    assert runs["stretch3"][0] == [60, 100]
    assert [len(load_manifest(url)["blocks"]["0"]["files"]) for _, url in runs.values()] == [5, 1, 2]
    ref = rows(runs["every"][1])
    for _, url in runs.values():
        assert_same_rows(url, ref)
        assert_exactly_once(rows(url)[0], chains=128, steps=100)


def test_min_interval_never_delays_a_stop(tmp_path, monkeypatch):
    """A stop request (Ctrl-C of the driver) at walk step 7 commits at the next boundary (20),
    however long the minimum interval."""
    import mmgm_ray.pool.actor as actor_mod

    def stop_at_step_7(actor):
        monkeypatch.setattr(actor_mod.faults, "after_walk_step", lambda step: step == 7 and actor.request_stop())

    cfg = gmm_cfg(tmp_path, "stop", num_chains=128, num_steps=100, checkpoint_min_interval_s=3600.0)
    cfg.sampler.block_size = 64
    assert _commit_steps(cfg, tmp_path, "stop", stretch=64, stop=stop_at_step_7)[0] == [CKPT]


# ---- a diverging chain is isolated and reported -----------------------------------------------------

def test_diverging_chain_isolated_and_reported(ray_session, tmp_path):
    from mmgm_ray.data import ImageDataset, write_parquet_dataset
    from mmgm_ray.pool import run_pool

    # chains start at data points; one of the 16 points is absurd, so the chains drawing it blow up
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    x[5] = 1e6
    data_path = str(tmp_path / "init.parquet")
    write_parquet_dataset(ImageDataset("init", x, None, (2,), "test"), data_path, sample_dtype="float32")
    cfg = cpu_dict({
        "name": "div", "output": str(tmp_path), "seed": 1, "noise": {"sigma": 1.0, "M": 4},
        "oracle": {"kind": "gmm", "means": [[0.0, 0.0], [2.0, 2.0]], "var": 0.5},
        "data": {"name": "parquet", "path": data_path},
        "sampler": {"block_size": 64, "jump_every": JUMP, "init": "data"},
        "pool": {"num_chains": 256, "num_steps": 40, "checkpoint_every": 20, "num_actors": 2}})
    summary = run_pool(cfg, progress=False)
    assert summary["status"] == "done"
    # the same chains diverge as in a bare engine run
    model, shape, _ = load_sampling_model(cfg, "cpu")
    eng = WalkJumpEngine(model, cfg.sampler, shape, cfg.seed, chain_blocks(256, 64))
    eng.initialize(x)
    list(eng.run(40))
    expect = sorted(e.chain_id for e in eng.divergences)
    assert 1 <= len(expect) < 256
    div = read_divergences(summary["url"])
    assert sorted(div.column("chain_id").to_pylist()) == expect
    man = load_manifest(summary["url"])
    assert man["divergences"]["count"] == len(expect) == summary["divergences"]
    assert sorted(d["chain_id"] for d in man["divergence_events"]) == expect
    assert {d["reason"] for d in man["divergence_events"]} <= {"exploding", "non-finite"}
    xs, meta = read_samples(summary["url"])
    assert np.isfinite(xs).all()                     # no NaN sample stored
    chains = set(meta.column("chain_id").to_pylist())
    assert chains == set(range(256)) - set(expect)   # the others went on
    assert meta.num_rows == (256 - len(expect)) * 40 // JUMP


# ---- s3:// through s3fs against a local S3 server (moto, over HTTP) -----------------------------------

@pytest.mark.slow
def test_s3_store_via_moto_server(reference, tmp_path, moto_endpoint):
    import boto3

    from mmgm_ray.pool import run_pool

    opts = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"}}
    client = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    bucket = s3_bucket(moto_endpoint)
    cfg = gmm_cfg(f"s3://{bucket}/runs", "ref")
    summary = run_pool(cfg, storage_options=opts, progress=False)
    assert summary["status"] == "done"
    assert_same_rows(summary["url"], reference[2], storage_options=opts)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    man = load_manifest(summary["url"], opts)
    parts = sorted(k for k in keys if "/samples/" in k)
    assert parts == sorted(f"runs/ref/{f}" for b in man["blocks"].values() for f in b["files"])
    assert "runs/ref/manifest.json" in keys
    n_blocks = len(chain_blocks(CHAINS, 128))       # one checkpoint and one lease per block
    assert sum("/checkpoints/" in k and k.endswith(".pt") for k in keys) == n_blocks
    assert sum(k.endswith("/lease.json") for k in keys) == n_blocks
    assert not any(k.rsplit("/", 1)[1].startswith(".") for k in keys)


# ---- bad input ------------------------------------------------------------------------------------

def _tree_digest(root: pathlib.Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_bad_input_clear_errors_existing_data_untouched(reference, tmp_path, capsys):
    import shutil

    from mmgm_ray import cli
    from mmgm_ray.pool import run_pool

    # missing model artifact: nothing is created
    cfg = gmm_cfg(tmp_path, "nomodel")
    cfg.oracle.kind = "none"
    cfg.model_path = str(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="model artifact not found"):
        run_pool(cfg, progress=False)
    assert not (tmp_path / "nomodel").exists()
    # unwritable store (the output path is under a regular file)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreNotWritableError, match="not writable"):
        run_pool(gmm_cfg(tmp_path / "afile", "r"), progress=False)
    assert cli.main(["sample", *cpu_sets(f"output={tmp_path / 'afile'}", "oracle.kind=gmm", "data.name=gmm"),
                     "--no-progress"]) == 2
    assert "not writable" in capsys.readouterr().err
    # existing run: a copy of the reference, never modified by refused calls
    shutil.copytree(reference[0] / "ref", tmp_path / "ref")
    before = _tree_digest(tmp_path / "ref")
    with pytest.raises(ValueError, match="already exists"):
        run_pool(gmm_cfg(tmp_path, "ref"), progress=False)
    bad = gmm_cfg(tmp_path, "ref")
    bad.store.sample_dtype = "float16"
    with pytest.raises(ValueError, match="store.sample_dtype"):
        run_pool(bad, resume=True, progress=False)
    bad = gmm_cfg(tmp_path, "ref")
    bad.data.gmm_dim = 3   # another event shape
    with pytest.raises(ValueError, match="data.gmm_dim"):
        run_pool(bad, resume=True, progress=False)
    with pytest.raises(ValueError, match="no run manifest"):
        run_pool(gmm_cfg(tmp_path, "nothing-here"), resume=True, progress=False)
    assert _tree_digest(tmp_path / "ref") == before


# ---- mmgm generate ----------------------------------------------------------------------------------

def test_generate_cli_reads_back_with_load_dataset(ray_session, tmp_path):
    from PIL import Image

    from mmgm_ray import cli
    from mmgm_ray.data import load_dataset
    from mmgm_ray.factory import build_score_model, save_artifact

    # a tiny (untrained) image model artifact: exercises the artifact path and the PNG output
    mcfg = cpu_dict({"noise": {"sigma": 1.0, "M": 4}, "model": {"net": {"arch": "mlp", "hidden": 16, "depth": 1}}})
    model = build_score_model(mcfg, (1, 8, 8))
    save_artifact(str(tmp_path / "model.pt"), model, mcfg, (1, 8, 8))
    run_cfg = {"name": "gen", "output": str(tmp_path / "runs"), "model_path": str(tmp_path / "model.pt"),
               "noise": {"sigma": 1.0, "M": 4}, "model": {"net": {"arch": "mlp", "hidden": 16, "depth": 1}},
               "sampler": {"block_size": 16, "jump_every": 5},
               "pool": {"num_chains": 64, "num_actors": 2, "checkpoint_every": 10}}
    (tmp_path / "gen.yaml").write_text(json.dumps(run_cfg))  # JSON is YAML
    out = tmp_path / "ds"
    rc = cli.main(["generate", "--config", str(tmp_path / "gen.yaml"), "--out", str(out),
                   "--num-samples", "100", "--burn-in", "10", "--thin", "2",
                   "--grid", str(tmp_path / "grid.png"), "--png-dir", str(tmp_path / "png"), "--no-progress",
                   *cpu_sets()])
    assert rc == 0
    ds = load_dataset(DataConfig(name="parquet", path=str(out)))
    assert len(ds) == 100 and ds.event_shape == (1, 8, 8) and torch.isfinite(ds.x).all()
    # the data set holds exactly the selected jumps: steps 20, 30 (burn-in 10, thin 2 of jump_every 5)
    x, meta = read_samples(str(tmp_path / "runs" / "gen"))
    steps = meta.column("step").to_numpy()
    kept = np.isin(steps, [20, 30])
    chains, st = meta.column("chain_id").to_numpy()[kept], steps[kept]
    order = np.lexsort((chains, st))[:100]
    assert np.array_equal(ds.x.numpy(), x[kept][order])
    assert Image.open(tmp_path / "grid.png").size[0] > 64
    assert len(list((tmp_path / "png").glob("*.png"))) == 100
