"""End to end on a fake autoscaling cluster (tests/fake_cluster.py): a head with no CPUs and a 2-CPU
worker type (min 0, max 2), the shape of the shipped launcher config and of autoscaling KubeRay
clusters, where ``ray.cluster_resources()`` is empty until the autoscaler adds a node (issue 10).
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fake_cluster import FakeAutoscalingCluster, free_port
from infra_commands import INFRA, documented_commands, local_argv

from mmgm_ray.config import to_dict
from mmgm_ray.factory import ARTIFACT_NAME, load_artifact
from pinned import cpu_config

LAUNCHER = INFRA / "cluster-launcher" / "aws-gpu.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY = ["model.net.channels=8", "model.net.mid_attn=false", "train.batch_size=32", "train.warmup_steps=2",
        "train.log_every=5", "train.checkpoint_every=10", "train.preview.chains=0", "train.ema_eval_batch=0"]


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
    assert "[mmgm preflight] train.resources.num_workers=1: 1 x {CPU: 1} (PACK) does not fit the free resources now" in err
    assert "may add cpu2 {CPU: 2} x2" in err and "resources are there" in err
    # the last JSON line; Ray may print the autoscaler's events to the driver's stdout around it
    out = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith('{"artifact"')][-1])
    assert out["artifact"].endswith(f"/scaled/{ARTIFACT_NAME}") and out["metrics"]["step"] == 10
    _, cfg, info = load_artifact(out["artifact"])
    assert info["extra"]["step"] == 10 and cfg.name == "scaled"
    assert "cpu2" in fake_cluster.status()
    print(f"mmgm train with scale-up: {secs:.1f} s")


def test_request_above_the_maximum_fails_fast(fake_cluster, tmp_path):
    """3 workers x 2 CPUs: the autoscaler can add at most 2 cpu2 nodes (4 CPUs): one line, exit 2."""
    p, secs = mmgm(fake_cluster, *TINY, "train.resources.num_workers=3", "train.resources.cpus_per_worker=2", "train.batch_size=16",
                   f"output={tmp_path}", "name=toobig", timeout=120)
    assert p.returncode == 2, (p.stdout + p.stderr)[-4000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("mmgm train: error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "train.resources.num_workers=3: 3 x {CPU: 2} (PACK) needs {CPU: 6} and can never be scheduled" in lines[0]
    assert "may add cpu2 {CPU: 2}" in lines[0] and "at most 2 worker nodes" in lines[0]
    assert "[mmgm preflight]" not in p.stderr  # no wait: refused before asking for nodes
    assert not (tmp_path / "toobig").exists()
    assert secs < 60, secs


# ---- the infra files, run: every documented job command, the launcher's head command -----------

def _resolved(argv: list[str]) -> tuple:
    """(script name, resolved config as JSON): commands equal after the rewrite run once."""
    config = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return Path(argv[1]).name, json.dumps(to_dict(cpu_config(config, *sets)), sort_keys=True)


@pytest.mark.timeout(1500)
def test_documented_jobs_run(fake_cluster, tmp_path):
    """Every RayJob entrypoint and `ray job submit` command of infra/ (tests/infra_commands.py),
    with the bucket pointed at a local folder and tiny sizes, succeeds as a job on the cluster:
    train, then sample from the train job's model.pt, then the main job (FID included)."""
    bucket = tmp_path / "bucket"
    runs: dict = {}
    for cmd in documented_commands():
        argv = local_argv(cmd, str(bucket), "python")
        runs.setdefault(_resolved(argv), (argv, []))[1].append(cmd.source)
    order = {"train.py": 0, "sample.py": 1, "main.py": 2}
    assert {k[0] for k in runs} == set(order)
    for (script, _), (argv, sources) in sorted(runs.items(), key=lambda kv: order[kv[0][0]]):
        t0 = time.monotonic()
        p = fake_cluster.submit(argv, timeout_s=600)
        logs = p.stdout + p.stderr
        assert p.returncode == 0 and "succeeded" in logs, f"{sources}: {' '.join(argv)}\n{logs[-4000:]}"
        print(f"{script} ({len(sources)} documented command(s)): {time.monotonic() - t0:.0f} s")
    _, cfg, info = load_artifact(str(bucket / "digits-train" / ARTIFACT_NAME))
    assert info["extra"]["step"] == 6 and cfg.name == "digits-train"
    manifest = json.loads((bucket / "digits-sample" / "manifest.json").read_text())
    # 8 chains x 40 walk steps / jump_every 10 = 32 jumps, every one written once
    assert manifest["status"] == "done" and manifest["progress"]["rows"] == 32, manifest["progress"]
    report = json.loads((bucket / "digits-main-samples" / "report.json").read_text())
    assert report["fid"]["n"] == 4 and report["fid"]["fid"] > 0, report.get("fid")


# What `ray up` fills in for resources: {} from the instance type (AWS autodetection).
INSTANCE_RESOURCES = {"g5.2xlarge": {"CPU": 8, "GPU": 1}}


@pytest.fixture(scope="module")
def launcher_cluster():
    """The launcher's own `ray start --head` command (ports and the bootstrap config replaced), on
    the fake provider with the launcher's node types and max_workers."""
    cfg = yaml.safe_load(LAUNCHER.read_text())
    head_cmds = cfg["head_start_ray_commands"]
    assert "ray stop" in head_cmds  # run by the launcher on a fresh VM, never here: it ends every Ray
    (start,) = [c for c in head_cmds if "ray start --head" in c]
    assert "RAY_AUTH_MODE=token" in start  # the fixture's environment sets the same
    argv = shlex.split(start.split("ray start", 1)[1])
    replaced = ("--port", "--object-manager-port", "--autoscaling-config")
    start_args = ["start", *[a for a in argv if not a.startswith(replaced)],
                  f"--object-manager-port={free_port()}"]
    head = cfg["head_node_type"]
    workers = {name: {"resources": t.get("resources") or INSTANCE_RESOURCES[t["node_config"]["InstanceType"]],
                      "min_workers": t.get("min_workers", 0), "max_workers": t["max_workers"]}
               for name, t in cfg["available_node_types"].items() if name != head}
    with FakeAutoscalingCluster(workers, cfg["max_workers"], cfg["available_node_types"][head]["resources"],
                                start_args=start_args) as c:
        yield c


LAUNCHER_PROBE = """
import json, ray
from mmgm_ray.preflight import ResourceRequest, decide, discover_capacity, ensure_resources
ray.init()
cap = discover_capacity()
gpu = lambda n: ResourceRequest.uniform(n, {"CPU": 1, "GPU": 1}, what=f"train.resources.num_workers={n}")
verdicts = {n: decide(gpu(n), cap).verdict.value for n in (1, 8, 9)}
head_cpus = ray.cluster_resources().get("CPU", 0.0)
ensure_resources(gpu(1), timeout_s=240, progress_every_s=5)
print("RESULT", json.dumps({"verdicts": verdicts, "never": decide(gpu(9), cap).message, "head_cpus": head_cpus,
                  "types": [[t.name, t.max_count] for t in cap.node_types], "cpus": ray.cluster_resources().get("CPU"),
                  "gpus": ray.cluster_resources().get("GPU")}))
"""


@pytest.mark.timeout(600)
def test_launcher_head_command_and_its_maximum(launcher_cluster):
    """The launcher's head has no CPUs; the pre-flight reads the launcher's node types (8 GPU
    workers at most): 9 one-GPU workers can never run, 1 makes the autoscaler add a GPU node."""
    p = subprocess.run([sys.executable, "-c", LAUNCHER_PROBE], env=launcher_cluster.env, capture_output=True,
                       text=True, timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    # the driver also prints the autoscaler's events ("(autoscaler +3s) Adding 1 node(s) ...")
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    out = json.loads(line[len("RESULT "):])
    assert out["head_cpus"] == 0.0 and out["types"] == [["ray.worker.gpu", 8]]
    assert out["verdicts"] == {"1": "later", "8": "later", "9": "never"}
    assert "9 x {CPU: 1, GPU: 1} (PACK) needs {CPU: 9, GPU: 9}" in out["never"]
    assert "ray.worker.gpu {CPU: 8, GPU: 1} x8 (at most 8 worker nodes" in out["never"]
    assert out["cpus"] == 8.0 and out["gpus"] == 1.0  # one fake g5.2xlarge joined
