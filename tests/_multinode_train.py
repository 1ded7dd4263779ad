"""Ray Train on a simulated multi-node cluster that loses the worker node mid-run (run by
tests/test_multinode.py in a subprocess: ``ray.cluster_utils.Cluster`` is one per process).

A head without CPUs and two 1-CPU worker nodes; one Ray Train worker trains the digits model with a
checkpoint every 10 steps. Once the step-20 checkpoint is reported, the node hosting the worker is
removed without grace; Ray Train (FailureConfig) starts a new worker group on the other node from the
latest checkpoint. Prints ``MULTINODE_TRAIN_SUMMARY {json}``.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

STEPS, CKPT, LOG = 60, 10, 5
STEP_SLEEP = 0.25   # the run lasts ~15 s, so the node dies between checkpoints


def wait_for_step(metrics: str, step: int, timeout_s: float = 180) -> int:
    """The first logged step >= ``step`` once metrics.jsonl shows it (-1 on timeout)."""
    t = time.perf_counter()
    while time.perf_counter() - t < timeout_s:
        if os.path.exists(metrics):
            with open(metrics) as f:
                steps = [json.loads(ln)["step"] for ln in f if ln.strip()]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.05)
    return -1


def main(out: str, temp_dir: str) -> dict:
    # the cluster records its address under RAY_TMPDIR; a private one keeps other sessions away
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    import ray
    from ray.cluster_utils import Cluster

    from mmgm_ray import faults
    from pinned import cpu_config  # tests/ is this script's folder
    from mmgm_ray.train.ray_train import run_ray_training

    os.environ[faults.ENV] = json.dumps({"train_step_sleep": STEP_SLEEP})
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    workers = {n.node_id: n for n in (cluster.add_node(num_cpus=1) for _ in range(2))}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = cpu_config("digits", *[f"output={out}", "name=noded", f"train.steps={STEPS}",
                                 f"train.checkpoint_every={CKPT}", f"train.log_every={LOG}", "train.batch_size=32",
                                 "train.warmup_steps=5", "train.preview.chains=0", "train.ema_eval_batch=0",
                                 "train.resources.max_failures=3",
                                 "train.resources.scale_timeout_s=120"])
    kill: dict = {}

    def remove_worker_node() -> None:
        seen = wait_for_step(os.path.join(cfg.run_dir, "metrics.jsonl"), 2 * CKPT)
        alive = [a for a in cluster.global_state.actor_table(None).values()
                 if a["ActorClassName"].endswith("RayTrainWorker") and a["State"] == "ALIVE"]
        if seen < 0 or len(alive) != 1:
            kill["error"] = f"no single live Ray Train worker at step {seen}: {len(alive)}"
            return
        node_id = alive[0]["Address"]["NodeID"]
        kill.update(step_seen=seen, node_id=node_id, t=time.perf_counter())
        cluster.remove_node(workers[node_id], allow_graceful=False)

    info: dict = {"worker_node_ids": sorted(workers), "kill": kill}
    try:
        threading.Thread(target=remove_worker_node, daemon=True).start()
        res = run_ray_training(cfg, progress=False)
        info.update(final_step=res.metrics.get("step"), artifact=res.artifact,
                    history=[{"step": r["step"], "start_step": r["start_step"], "loss": r["loss"]}
                             for r in res.history])
        after = [a for a in cluster.global_state.actor_table(None).values()
                 if a["ActorClassName"].endswith("RayTrainWorker")]
        info["worker_nodes_used"] = sorted({a["Address"]["NodeID"] for a in after})
    finally:
        ray.shutdown()
        cluster.shutdown()
    return info


if __name__ == "__main__":
    summary = main(sys.argv[1], sys.argv[2])
    print("MULTINODE_TRAIN_SUMMARY " + json.dumps(summary), flush=True)
    sys.stdout.flush()
    os._exit(0)   # do not wait for Ray's atexit hooks: the cluster is already shut down
