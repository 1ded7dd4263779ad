"""End to end on a fake autoscaling cluster (tests/fake_cluster.py): a head with no CPUs and a 2-CPU
worker type (min 0, max 2), the shape of the shipped launcher config and of autoscaling KubeRay
clusters, where ``ray.cluster_resources()`` is empty until the autoscaler adds a node (issue 10).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from fake_cluster import FakeAutoscalingCluster

from mmgm_ray.factory import ARTIFACT_NAME, load_artifact

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY = ["model.net.channels=8", "model.net.mid_attn=false", "train.batch_size=32", "train.warmup_steps=2",
        "train.log_every=5", "train.checkpoint_every=10", "train.preview_chains=0", "train.ema_eval_batch=0"]


@pytest.fixture(scope="module")
def fake_cluster():
    with FakeAutoscalingCluster({"cpu2": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 2}},
                                max_workers=2, head_resources={"CPU": 0}) as c:
        yield c


def mmgm(cluster, *args, timeout=400):
    sets = [a for s in args for a in ("--set", s)]
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "mmgm_ray.cli", "train", "--config", "digits", *sets],
                       env=cluster.env, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


@pytest.mark.timeout(600)
def test_train_asks_the_autoscaler_for_a_node(fake_cluster, tmp_path):
    """`mmgm train` on the fresh cluster (no CPUs anywhere) waits for the autoscaler to add a
    cpu2 node instead of refusing, then trains to the end."""
    status = fake_cluster.status()
    assert "1 cpu2" not in status and "0.0/2.0 CPU" not in status  # nothing but the 0-CPU head
    p, secs = mmgm(fake_cluster, *TINY, "train.steps=10", f"output={tmp_path}", "name=scaled")
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    err = p.stderr
    assert "[mmgm preflight] train.num_workers=1: 1 x {CPU: 1} (PACK) does not fit the free resources now" in err
    assert "may add cpu2 {CPU: 2} x2" in err and "resources are there" in err
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["artifact"].endswith(f"/scaled/{ARTIFACT_NAME}") and out["metrics"]["step"] == 10
    _, cfg, info = load_artifact(out["artifact"])
    assert info["extra"]["step"] == 10 and cfg.name == "scaled"
    assert "cpu2" in fake_cluster.status()
    print(f"mmgm train with scale-up: {secs:.1f} s")


def test_request_above_the_maximum_fails_fast(fake_cluster, tmp_path):
    """3 workers x 2 CPUs: the autoscaler can add at most 2 cpu2 nodes (4 CPUs): one line, exit 2."""
    p, secs = mmgm(fake_cluster, *TINY, "train.num_workers=3", "train.cpus_per_worker=2", "train.batch_size=16",
                   f"output={tmp_path}", "name=toobig", timeout=120)
    assert p.returncode == 2, (p.stdout + p.stderr)[-4000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("mmgm train: error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "train.num_workers=3: 3 x {CPU: 2} (PACK) needs {CPU: 6} and can never be scheduled" in lines[0]
    assert "may add cpu2 {CPU: 2}" in lines[0] and "at most 2 worker nodes" in lines[0]
    assert "[mmgm preflight]" not in p.stderr  # no wait: refused before asking for nodes
    assert not (tmp_path / "toobig").exists()
    assert secs < 60, secs
