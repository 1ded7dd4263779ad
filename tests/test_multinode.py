"""The chain pool and Ray Train on a simulated multi-node Ray cluster that loses a worker node mid-run.

``ray.cluster_utils.Cluster`` is one per process, so the cluster lives in a subprocess
(``tests/_multinode_run.py``): a head without CPUs plus two 1-CPU worker nodes, so each of the two
1-CPU chain actors sits on its own worker node. The script runs a GMM-oracle config once
uninterrupted (``ref``) and once (``noded``) while the worker node hosting actor 0 is removed
without grace after its first committed checkpoint (raylet and node processes SIGKILLed), a fresh
node being added for the restarted actor. Node death is detected fast (health check every 0.5 s).

Here: both runs are ``done``; the node-loss run has exactly the reference's rows (chain, step,
jump index, ..., sample bytes) bitwise, with no duplicate, no gap and no orphan file; and both equal
a bare in-process engine run of the same layout (so the reference itself is not wrong).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from mmgm_ray.engine import WalkJumpEngine
from mmgm_ray.factory import load_sampling_model
from mmgm_ray.store import load_manifest, open_dataset, read_samples

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_multinode_run.py"
sys.path.insert(0, str(SCRIPT.parent))
import _multinode_run as mn  # noqa: E402  (the config and constants the script uses)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

SUBPROCESS_TIMEOUT_S = 240


def _run_script(out: pathlib.Path, script: pathlib.Path = SCRIPT, tag: str = "MULTINODE_SUMMARY") -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)           # the script starts and addresses its own cluster
    temp = f"/tmp/mmgm-mn-{os.getpid()}"   # short: Ray's unix socket paths have a length limit
    # own session / process group: on a timeout the whole simulated cluster is killed with it
    proc = subprocess.Popen([sys.executable, str(script), str(out), temp], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"multi-node script timed out after {SUBPROCESS_TIMEOUT_S} s:\n{log[-6000:]}")
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    lines = [ln for ln in log.splitlines() if ln.startswith(tag + " ")]
    assert proc.returncode == 0 and lines, f"multi-node script failed (rc {proc.returncode}):\n{log[-6000:]}"
    return json.loads(lines[-1][len(tag) + 1:])


def _rows(url: str, use_manifest: bool = True) -> tuple[pa.Table, bytes]:
    """(metadata columns without run_id, sorted by chain/step; the sample bytes in that order)."""
    t = open_dataset(url, use_manifest=use_manifest).to_table()
    t = t.sort_by([("chain_id", "ascending"), ("step", "ascending"), ("diverged", "ascending")])
    sample = t.column("sample").combine_chunks()
    data = sample.flatten().to_numpy(zero_copy_only=False).tobytes() if len(sample) else b""
    return t.drop(["run_id", "sample"]).replace_schema_metadata(None), data


def _assert_exactly_once(meta: pa.Table) -> None:
    keys = list(zip(meta.column("chain_id").to_pylist(), meta.column("step").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate (chain, step) rows"
    want = {(c, s) for c in range(mn.CHAINS) for s in range(mn.JUMP, mn.STEPS + 1, mn.JUMP)}
    assert set(keys) == want, f"missing {len(want - set(keys))} / extra {len(set(keys) - want)} rows"
    # jump_index counts the jumps of a chain: step / jump_every
    ji = meta.column("jump_index").to_numpy()
    st = meta.column("step").to_numpy()
    assert np.array_equal(ji, st // mn.JUMP - 1)


def _no_orphans(run_dir: pathlib.Path) -> None:
    """Every visible part is listed by the manifest, and no hidden temp file remains."""
    man = json.loads((run_dir / "manifest.json").read_text())
    listed = {f for b in man["blocks"].values() for f in b["files"]}
    on_disk = {str(p.relative_to(run_dir)) for p in (run_dir / "samples").rglob("*.parquet")}
    assert on_disk == listed, f"unlisted {sorted(on_disk - listed)}, missing {sorted(listed - on_disk)}"
    assert not [p for p in run_dir.rglob(".*") if p.is_file()]


def test_worker_node_lost_mid_run_same_rows_bitwise(tmp_path):
    out = tmp_path / "runs"
    s = _run_script(out)
    print("multi-node summary:", json.dumps({k: v for k, v in s.items() if k != "after_kill"}))

    # -- the node loss happened as planned --------------------------------------------------------
    kill = s["kill"]
    assert kill, "the worker node was never removed (actor 0 never committed a checkpoint mid-run?)"
    workers = set(s["worker_node_ids"])
    nodes = kill["actor_nodes"]
    assert set(nodes.values()) <= workers and len(set(nodes.values())) == 2, nodes  # one actor per worker node
    assert kill["node_id"] == nodes[str(mn.KILL_ACTOR)]
    assert mn.CKPT <= kill["committed_step"] <= kill["step"] < mn.STEPS
    assert kill["fresh_node_id"] not in workers
    assert not s["pid_running_at_end"], "the killed actor's process outlived the run"

    # -- the pool recovered from the checkpoint and finished ----------------------------------------
    ref, run = s["ref"], s["noded"]
    assert ref["status"] == "done" and ref["restarts"] == 0 and ref["replacements"] == 0
    assert run["status"] == "done" and run["min_step"] == mn.STEPS
    assert run["restarts"] + run["replacements"] >= 1
    assert run["layout"] == ref["layout"]
    after = s["after_kill"]
    assert after, "no chunk came back from a new process for the killed actor's blocks"
    assert {a["pid"] for a in after}.isdisjoint({kill["pid"]})
    # resumed from a committed checkpoint (not from scratch, not from the end). It may be later than
    # the step seen at removal: the old process lives ~0.5 s more, until it notices its node is gone,
    # and can commit one more checkpoint; deterministic chains make that checkpoint valid.
    restored = after[0]["restored_step"]
    assert mn.CKPT <= restored < mn.STEPS and restored % mn.CKPT == 0, (restored, kill)
    assert after[-1]["step"] == mn.STEPS
    n_rows = mn.CHAINS * mn.STEPS // mn.JUMP
    assert run["rows"] == run["samples"] == ref["rows"] == n_rows

    # -- same rows, bitwise; exactly once; no orphan -----------------------------------------------
    ref_meta, ref_data = _rows(ref["url"])
    meta, data = _rows(run["url"])
    _assert_exactly_once(ref_meta)
    _assert_exactly_once(meta)
    assert meta.num_rows == ref_meta.num_rows == n_rows
    assert meta.equals(ref_meta)
    assert data == ref_data  # bitwise
    # what is on disk (without the manifest) is the same committed view: nothing stray
    meta_disk, data_disk = _rows(run["url"], use_manifest=False)
    assert meta_disk.equals(ref_meta) and data_disk == ref_data
    _no_orphans(out / "noded")
    _no_orphans(out / "ref")
    man = load_manifest(run["url"])
    assert man["status"] == "done" and man["progress"]["rows"] == n_rows
    assert all(b["status"] == "done" for b in man["blocks"].values())

    # -- and the reference is the bare engine's output for the same layout ---------------------------
    cfg = mn.gmm_cfg(str(out), "ref")
    model, shape, _ = load_sampling_model(cfg, "cpu")
    x_run, m_run = read_samples(run["url"])
    for group in run["layout"]:
        eng = WalkJumpEngine(model, cfg.sampler, shape, cfg.seed, group)
        eng.initialize()
        jb = eng.run_collect(mn.STEPS)
        order = np.lexsort((jb.step.numpy(), jb.chain_id.numpy()))
        sel = np.isin(m_run.column("block_id").to_numpy(), group)
        assert np.array_equal(x_run[sel], jb.xhat.numpy()[order])


def test_training_survives_losing_its_worker_node(tmp_path):
    """Ray Train on the simulated cluster: the node running the only Train worker is removed after
    the step-20 checkpoint; the worker group restarts on the other node from the latest checkpoint
    and the run completes, every logged step once, the curve continuing where it stopped."""
    s = _run_script(tmp_path / "runs", ROOT / "tests" / "_multinode_train.py", "MULTINODE_TRAIN_SUMMARY")
    print("multi-node training summary:", json.dumps({k: v for k, v in s.items() if k != "history"}))
    kill = s["kill"]
    assert "error" not in kill and kill.get("node_id"), kill
    assert s["final_step"] == 60
    steps = [r["step"] for r in s["history"]]
    assert steps == list(range(5, 61, 5))                       # no duplicated and no missing step
    resumed = [r["start_step"] for r in s["history"] if r["start_step"] > 0]
    # restarted from a checkpoint at or before the loss (the step-20 line is logged just before its
    # checkpoint is reported, so the latest persisted one may still be step 10)
    assert resumed and len(set(resumed)) == 1 and resumed[0] % 10 == 0 and 0 < resumed[0] <= kill["step_seen"]
    # the first group ran on the removed node, the restarted one on the other worker node
    assert kill["node_id"] in s["worker_nodes_used"] and set(s["worker_nodes_used"]) == set(s["worker_node_ids"])
    assert (tmp_path / "runs" / "noded" / "model.pt").exists()
