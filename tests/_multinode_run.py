"""Helper for tests/test_multinode.py: a chain pool on a simulated multi-node Ray cluster that loses
a worker node mid-run. Run as a script (``ray.cluster_utils.Cluster`` is one per process):

    python tests/_multinode_run.py OUT_DIR RAY_TEMP_DIR

On a cluster of a head without CPUs plus two 1-CPU worker nodes (so the two 1-CPU chain actors sit
on different worker nodes), it runs

1. ``ref``: the config uninterrupted;
2. ``noded``: the same config, slowed down per step; once the actor 0 has committed a checkpoint,
   the worker node hosting it is removed without grace (``remove_node(allow_graceful=False)``:
   raylet and everything on it SIGKILLed) and a fresh 1-CPU node is added for the restarted actor.

and prints one line ``MULTINODE_SUMMARY {json}`` that the test asserts on (the rows themselves are
compared by the test, from the two stores under OUT_DIR).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

CHAINS, BLOCK, STEPS, JUMP, CKPT = 512, 64, 120, 5, 10
STEP_SLEEP = 0.03   # the faulty run lasts several seconds, so the node dies mid-run
KILL_ACTOR = 0


def gmm_cfg(out: str, name: str):
    from pinned import cpu_dict  # this script runs from tests/, next to the helper

    d = {"name": name, "output": out, "seed": 11, "noise": {"sigma": 1.0, "M": 4},
         "oracle": {"kind": "gmm"}, "data": {"name": "gmm"},
         "sampler": {"block_size": BLOCK, "jump_every": JUMP},
         "store": {"rows_per_file": 700},  # parts roll inside checkpoint intervals too
         # commits at every boundary: the kills and stops below land between known checkpoints
         "pool": {"num_chains": CHAINS, "num_steps": STEPS, "checkpoint_every": CKPT, "num_actors": 2,
                  "cpus_per_actor": 1.0, "max_restarts": 3,
                  "checkpoint_min_interval_s": 0.0}}
    return cpu_dict(d)


def pid_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split(":", 1)[1]
    except FileNotFoundError:
        return False
    return True


def main(out: str, temp_dir: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from mmgm_ray import faults
    from mmgm_ray.pool import run_pool

    t0 = time.perf_counter()
    # the cluster records its address under RAY_TMPDIR (default /tmp/ray, which may not exist);
    # a private one also keeps other Ray sessions on this machine from finding this cluster
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)   # Ray writes {RAY_TMPDIR}/ray/...
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir,
        # node death noticed in ~2-4 s instead of ~15 s (measured with ray.cluster_utils)
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    t_cluster = time.perf_counter() - t0
    info: dict = {"cluster_start_s": t_cluster}
    try:
        # -- 1. reference: uninterrupted ---------------------------------------------------------
        t = time.perf_counter()
        ref = run_pool(gmm_cfg(out, "ref"), progress=False)
        info["ref"] = {k: ref[k] for k in ("status", "rows", "samples", "layout", "replacements", "restarts",
                                           "url", "min_step")}
        info["ref_s"] = time.perf_counter() - t

        # -- 2. the same config; the node of actor 0 dies mid-run ---------------------------------
        node_of = {n.node_id: n for n in workers}
        kill: dict = {}
        seen: dict = {}

        def actor_info(handle) -> dict:
            return cluster.global_state.actor_table(handle._actor_id.hex())

        def watch_pid(pid: int, t_kill: float) -> None:
            # the actor's worker process outlives its raylet until it notices the raylet is gone
            while pid_running(pid) and time.perf_counter() - t_kill < 120:
                time.sleep(0.02)
            kill["pid_gone_after_s"] = time.perf_counter() - t_kill

        def killer(state) -> None:
            seen["state"] = state
            if kill:
                if "recovered_s" not in kill and any(
                        r["block_ids"] == state.layout[KILL_ACTOR] and r["pid"] != kill["pid"] for r in state.results):
                    kill["recovered_s"] = time.perf_counter() - kill["t"]   # detection + restart + first chunk
                return
            mine = [r for r in state.results if r["block_ids"] == state.layout[KILL_ACTOR]]
            if not mine:
                return
            last = mine[-1]
            committed = min(int(e["last_step"] or 0) for e in last["blocks"].values())
            step = state.steps.get(KILL_ACTOR, 0)
            # only once a checkpoint of the actor is committed and while its next chunk runs
            if committed < CKPT or step >= STEPS - 4 * CKPT:
                return
            nodes = {i: actor_info(h)["Address"]["NodeID"] for i, h in state.actors.items()}
            a = actor_info(state.actors[KILL_ACTOR])
            node = node_of[a["Address"]["NodeID"]]
            kill.update(step=step, committed_step=committed, pid=int(a["Pid"]), node_id=node.node_id,
                        actor_nodes=nodes, t=time.perf_counter())
            cluster.remove_node(node, allow_graceful=False)
            threading.Thread(target=watch_pid, args=(kill["pid"], kill["t"]), daemon=True).start()
            kill["remove_s"] = time.perf_counter() - kill["t"]
            kill["pid_running_after_remove"] = pid_running(kill["pid"])
            fresh = cluster.add_node(num_cpus=1)   # room for the restarted actor
            kill["fresh_node_id"] = fresh.node_id
            kill["add_s"] = time.perf_counter() - kill["t"]

        t = time.perf_counter()
        os.environ[faults.ENV] = json.dumps({"actor_step_sleep": STEP_SLEEP})  # kills land mid-chunk
        run = run_pool(gmm_cfg(out, "noded"), progress=False, on_progress=killer)
        info["noded_s"] = time.perf_counter() - t
        state = seen["state"]
        info["noded"] = {k: run[k] for k in ("status", "rows", "samples", "layout", "replacements", "restarts",
                                             "url", "min_step")}
        info["kill"] = kill
        info["worker_node_ids"] = sorted(node_of)
        info["pid_running_at_end"] = pid_running(kill["pid"]) if kill else None
        # results of the restarted / replacement process of the killed actor
        after = [r for r in state.results
                 if r["block_ids"] == state.layout[KILL_ACTOR] and kill and r["pid"] != kill["pid"]]
        info["after_kill"] = [{"pid": r["pid"], "restarted": r["restarted"], "restored_step": r["restored_step"],
                               "start_step": r["start_step"], "step": r["step"]} for r in after]
    finally:
        ray.shutdown()
        cluster.shutdown()
    info["total_s"] = time.perf_counter() - t0
    return info


if __name__ == "__main__":
    summary = main(sys.argv[1], sys.argv[2])
    print("MULTINODE_SUMMARY " + json.dumps(summary), flush=True)
    sys.stdout.flush()
    os._exit(0)   # do not wait for Ray's atexit hooks: the cluster is already shut down
