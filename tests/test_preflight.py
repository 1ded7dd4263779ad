"""mmgm_ray.preflight: the verdict on resource requests (fakes, no Ray) and the waits (a local Ray).

The fake-autoscaler end-to-end tests are in tests/test_cluster.py.
"""
from __future__ import annotations

import io
import itertools
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmgm_ray.preflight import (Capacity, NodeType, ResourceRequest, ResourcesUnavailable, Verdict, decide,
                                fits, node_types_from_config)

ROOT = Path(__file__).resolve().parents[1]


def cap(totals, available=None, **kw):
    return Capacity(totals=tuple(totals), available=tuple(available if available is not None else totals), **kw)


def req(n, bundle, strategy="PACK"):
    return ResourceRequest.uniform(n, bundle, strategy, what="test")


# The fake autoscaling cluster of issue 10: head with 0 CPUs, a 2-CPU worker type, min 0 max 2.
HEAD0 = {"CPU": 0.0, "memory": 1e9, "node:__internal_head__": 1.0}
CPU2 = NodeType("cpu2", {"CPU": 2.0}, 2)


def autoscaling(**kw):
    kw.setdefault("node_types", (CPU2,))
    kw.setdefault("max_workers", 2)
    return cap([HEAD0], autoscaling=True, source="test config", **kw)


def test_fresh_autoscaling_cluster_is_later_not_never():
    """The issue: a fresh cluster reports no CPUs; one 1-CPU worker fits once a cpu2 node comes."""
    d = decide(req(1, {"CPU": 1}), autoscaling())
    assert d.verdict is Verdict.LATER, d.message
    assert decide(req(2, {"CPU": 2}), autoscaling()).verdict is Verdict.LATER  # both nodes


def test_above_the_maximum_is_never_with_one_line():
    d = decide(req(3, {"CPU": 2}), autoscaling())
    assert d.verdict is Verdict.NEVER
    assert "\n" not in d.message
    assert "3 x {CPU: 2}" in d.message and "cpu2 {CPU: 2} x2" in d.message and "at most 2 worker nodes" in d.message
    # a bundle larger than any node type never fits, however many nodes may come
    assert decide(req(1, {"CPU": 3}), autoscaling()).verdict is Verdict.NEVER


def test_global_max_workers_caps_all_types():
    two = (CPU2, NodeType("cpu2b", {"CPU": 2.0}, 2))
    assert decide(req(3, {"CPU": 2}), autoscaling(node_types=two, max_workers=2)).verdict is Verdict.NEVER
    assert decide(req(3, {"CPU": 2}), autoscaling(node_types=two, max_workers=3)).verdict is Verdict.LATER
    assert decide(req(5, {"CPU": 2}), autoscaling(node_types=two, max_workers=None)).verdict is Verdict.NEVER


def test_nodes_up_count_against_their_type():
    """Two cpu2 nodes are up and busy: the type is at its maximum, only their totals count."""
    busy = {"CPU": 2.0}
    c = cap([HEAD0, busy, busy], [HEAD0, {"CPU": 0.0}, {"CPU": 0.0}], node_types=(CPU2,),
            type_counts={"cpu2": 2}, max_workers=2, workers_now=2, autoscaling=True)
    assert decide(req(2, {"CPU": 2}), c).verdict is Verdict.LATER   # once the other work ends
    assert decide(req(3, {"CPU": 2}), c).verdict is Verdict.NEVER


def test_gpu_requests():
    gpu = NodeType("g5", {"CPU": 8.0, "GPU": 1.0}, 2)
    cpu_only = autoscaling(node_types=(NodeType("c", {"CPU": 64.0}, 8),), max_workers=8)
    assert decide(req(1, {"CPU": 1, "GPU": 1}), cpu_only).verdict is Verdict.NEVER
    assert decide(req(2, {"CPU": 1, "GPU": 1}), autoscaling(node_types=(gpu,), max_workers=8)).verdict is Verdict.LATER
    assert decide(req(3, {"CPU": 1, "GPU": 1}), autoscaling(node_types=(gpu,), max_workers=8)).verdict is Verdict.NEVER


def test_unlimited_type_and_unknown_maximum():
    unlimited = NodeType("any", {"CPU": 4.0}, None)
    assert decide(req(100, {"CPU": 4}), autoscaling(node_types=(unlimited,), max_workers=None)).verdict is Verdict.LATER
    # an autoscaler whose config is out of sight (KubeRay): never say never
    d = decide(req(1000, {"CPU": 64, "GPU": 8}), cap([HEAD0], autoscaling=True))
    assert d.verdict is Verdict.LATER and "may add nodes (its maximum is not visible from here)" in d.message
    assert "1 node(s) up with {CPU: 0}" in d.message  # per-node markers and byte counts left out


def test_fixed_cluster_now_later_never():
    node = {"CPU": 4.0}
    assert decide(req(4, {"CPU": 1}), cap([node])).verdict is Verdict.NOW
    busy = cap([node], [{"CPU": 1.0}])
    assert decide(req(2, {"CPU": 1}), busy).verdict is Verdict.LATER      # other work holds 3 CPUs
    d = decide(req(5, {"CPU": 1}), busy)
    assert d.verdict is Verdict.NEVER and "needs {CPU: 5}" in d.message and "no autoscaling" in d.message


def test_strategies():
    two = cap([{"CPU": 2.0}, {"CPU": 2.0}])
    assert decide(req(2, {"CPU": 2}, "PACK"), two).verdict is Verdict.NOW
    assert decide(req(2, {"CPU": 2}, "STRICT_PACK"), two).verdict is Verdict.NEVER   # 4 CPUs on one node
    assert decide(req(2, {"CPU": 1}, "STRICT_PACK"), two).verdict is Verdict.NOW
    one = cap([{"CPU": 4.0}])
    assert decide(req(2, {"CPU": 1}, "STRICT_SPREAD"), one).verdict is Verdict.NEVER
    assert decide(req(2, {"CPU": 1}, "SPREAD"), one).verdict is Verdict.NOW          # soft
    # STRICT_SPREAD opens one new node per bundle
    c = autoscaling(node_types=(NodeType("big", {"CPU": 8.0}, 3),), max_workers=3)
    assert decide(req(3, {"CPU": 1}, "STRICT_SPREAD"), c).verdict is Verdict.LATER
    assert decide(req(4, {"CPU": 1}, "STRICT_SPREAD"), c).verdict is Verdict.NEVER


def test_mixed_bundles_are_never_claimed_never():
    """First-fit decreasing is only exact for equal bundles. 3+3+2+2+2+2 CPUs on two 7-CPU nodes
    fits as 3+2+2 | 3+2+2, but FFD puts both 3s on one node and strands a 2: the verdict must be
    LATER (the placement group then finds the packing), never NEVER."""
    mixed = ResourceRequest(({"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.0}))
    assert not fits(mixed.bundles, [{"CPU": 7.0}, {"CPU": 7.0}])
    assert decide(mixed, cap([{"CPU": 7.0}, {"CPU": 7.0}])).verdict is Verdict.LATER
    # the same shapes all equal are decided exactly
    assert decide(req(5, {"CPU": 3}), cap([{"CPU": 7.0}, {"CPU": 7.0}])).verdict is Verdict.NEVER


def test_max_resources_cap():
    c = autoscaling(node_types=(NodeType("g", {"CPU": 8.0, "GPU": 1.0}, None),), max_workers=None,
                    max_resources={"GPU": 4.0})
    assert decide(req(4, {"GPU": 1}), c).verdict is Verdict.LATER
    assert decide(req(5, {"GPU": 1}), c).verdict is Verdict.NEVER


def test_fits_matches_closed_form_for_equal_bundles():
    """Equal bundles: PACK fits iff sum_i floor(node_i / bundle) >= n (min over resources), and
    STRICT_SPREAD iff at least n nodes hold one; STRICT_PACK iff one node holds n. Random fixed clusters."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        nodes = [{"CPU": float(rng.integers(0, 9)), "GPU": float(rng.integers(0, 3))} for _ in range(rng.integers(1, 5))]
        b = {"CPU": float(rng.integers(1, 4)), **({"GPU": 1.0} if rng.random() < 0.5 else {})}
        n = int(rng.integers(1, 9))
        per = [min(nd[k] // v for k, v in b.items()) for nd in nodes]
        assert fits([b] * n, nodes, "PACK") == (sum(per) >= n)
        assert fits([b] * n, nodes, "STRICT_SPREAD") == (sum(p >= 1 for p in per) >= n)
        assert fits([b] * n, nodes, "STRICT_PACK") == (max(per) >= n)


def test_fits_with_new_nodes_matches_enumeration():
    """With node types to add (per-type maxima, a global cap), compare with enumerating every
    choice of nodes to add: the greedy choice (most copies per node first) is exact for equal bundles."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        types = [NodeType(f"t{i}", {"CPU": float(rng.integers(1, 9))}, int(rng.integers(0, 3))) for i in range(3)]
        up = [{"CPU": float(rng.integers(0, 5))}]
        cap_new = int(rng.integers(0, 5))
        b, n = {"CPU": float(rng.integers(1, 4))}, int(rng.integers(1, 10))
        best = 0
        for counts in itertools.product(*(range(t.max_count + 1) for t in types)):
            if sum(counts) <= cap_new:
                nodes = up + [t.resources for t, c in zip(types, counts) for _ in range(c)]
                best = max(best, sum(nd["CPU"] // b["CPU"] for nd in nodes))
        assert fits([b] * n, up, "PACK", types, {}, cap_new) == (best >= n), (types, up, cap_new, b, n)


def test_request_validation():
    with pytest.raises(ValueError, match="strategy"):
        ResourceRequest(({"CPU": 1},), "TIGHT")
    with pytest.raises(ValueError, match="negative"):
        ResourceRequest(({"CPU": -1},))
    r = req(2, {"CPU": 1, "GPU": 0})
    assert r.bundles == ({"CPU": 1.0}, {"CPU": 1.0}) and r.total() == {"CPU": 2.0}
    assert r.describe() == "test: 2 x {CPU: 1} (PACK)"


def test_node_types_from_config_defaults_and_the_shipped_launcher():
    types, mw = node_types_from_config({"head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 0}}, "w": {"resources": {"CPU": 2}}, "x": {"resources": {"CPU": 4}, "max_workers": 1}}})
    assert mw == 2 and types == (NodeType("w", {"CPU": 2.0}, 2), NodeType("x", {"CPU": 4.0}, 1))
    launcher = yaml.safe_load((ROOT / "infra" / "cluster-launcher" / "aws-gpu.yaml").read_text())
    types, mw = node_types_from_config(launcher)
    assert mw == 8 and [t.name for t in types] == ["ray.worker.gpu"] and types[0].max_count == 8


# ---- where the maximum comes from (discover_capacity with its sources faked) --------------------

@pytest.fixture
def sources(monkeypatch):
    """Fake the four sources discover_capacity reads; tests set what each returns."""
    from mmgm_ray import preflight

    state = {"nodes": ([HEAD0], [HEAD0], ["ray.head.default"]), "status": None, "gcs": None, "monitor": None}
    monkeypatch.setattr(preflight, "_nodes", lambda gcs: state["nodes"])
    monkeypatch.setattr(preflight, "_autoscaler_status", lambda: state["status"])
    monkeypatch.setattr(preflight, "_gcs_cluster_config", lambda: state["gcs"])
    monkeypatch.setattr(preflight, "_monitor_cmdline", lambda gcs: state["monitor"])
    return state


def _report(*types):
    return {"autoscaler_report": {"active_nodes": {t: 1 for t in types}}}


def test_capacity_from_the_monitors_config_file(sources, tmp_path):
    from mmgm_ray.preflight import discover_capacity

    (tmp_path / "boot.yaml").write_text(yaml.safe_dump({"max_workers": 3, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 0}}, "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 3}}}))
    sources["status"] = _report("h", "gpu")
    sources["monitor"] = (["python", "ray/autoscaler/_private/monitor.py", "--gcs-address=h:6379",
                           "--autoscaling-config=boot.yaml"], str(tmp_path))  # relative to the monitor's cwd
    c = discover_capacity("h:6379")
    assert c.autoscaling and c.max_workers == 3 and c.node_types == (NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 3),)
    assert c.type_counts == {"h": 1, "gpu": 1} and c.source == f"autoscaler config {tmp_path / 'boot.yaml'}"
    sources["monitor"] = (["monitor.py", "--autoscaling-config", str(tmp_path / "missing.yaml")], "/")
    c = discover_capacity("h:6379")
    assert c.autoscaling and c.node_types is None and "missing.yaml is unreadable (FileNotFoundError)" in c.source


def test_capacity_fixed_and_unknown(sources):
    from mmgm_ray.preflight import discover_capacity

    sources["monitor"] = (["python", "monitor.py", "--gcs-address=h:6379"], "/")  # `ray start` without a config
    assert not discover_capacity("h:6379").autoscaling
    sources["monitor"] = None  # driver elsewhere (Ray client) or autoscaler in its own container (KubeRay)
    sources["status"] = _report("node_" + "f" * 56)  # Ray's read-only autoscaler mirrors the nodes
    c = discover_capacity("h:6379")
    assert not c.autoscaling and c.source == "fixed cluster: read-only autoscaler"
    sources["status"] = _report("headgroup", "gpu-workers")  # KubeRay's group names: it autoscales
    c = discover_capacity("h:6379")
    assert c.autoscaling and c.node_types is None and "not visible" in c.source
    assert decide(req(10 ** 4, {"GPU": 8}), c).verdict is Verdict.LATER


def test_capacity_from_the_gcs_cluster_config(sources):
    from mmgm_ray.preflight import discover_capacity

    sources["gcs"] = ((NodeType("g", {"GPU": 1.0}, None),), {"GPU": 4.0})
    c = discover_capacity("h:6379")
    assert c.source == "the GCS cluster config" and c.max_resources == {"GPU": 4.0}
    assert decide(req(5, {"GPU": 1}), c).verdict is Verdict.NEVER


def test_monitor_is_found_by_its_gcs_port(tmp_path):
    """_monitor_cmdline reads /proc: this very process posing as a monitor is found by its port."""
    from mmgm_ray.preflight import _monitor_cmdline

    argv = ["python", "/x/ray/autoscaler/_private/monitor.py", "--gcs-address=10.0.0.1:46379",
            "--autoscaling-config=/c.yaml"]
    # a process whose argv looks like the monitor's (python ignores arguments after -c CODE)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv[1:]], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        found = None
        while found is None and time.monotonic() < deadline:
            found = _monitor_cmdline("127.0.0.1:46379")
            time.sleep(0.1)
        assert found is not None and found[0][-1] == "--autoscaling-config=/c.yaml" and found[1] == str(tmp_path)
        assert _monitor_cmdline("127.0.0.1:46380") is None
    finally:
        proc.kill()
        proc.wait()


# ---- against a local Ray (fixed cluster of 4 logical CPUs) --------------------------------------

def _wait_idle(ray, timeout_s: float = 120.0) -> None:
    """Actors killed by earlier tests in the shared session release their CPUs asynchronously."""
    from mmgm_ray.preflight import discover_capacity

    def busy() -> bool:
        if ray.available_resources().get("CPU", 0.0) < ray.cluster_resources().get("CPU", 0.0):
            return True
        # The per-node view (GCS cluster status) that ``decide`` reads lags the scheduler by a
        # report period, so wait for it too before asserting a NOW verdict.
        cap = discover_capacity()
        return sum(a.get("CPU", 0) for a in cap.available) < sum(t.get("CPU", 0) for t in cap.totals)

    deadline = time.monotonic() + timeout_s
    while busy():
        assert time.monotonic() < deadline, f"CPUs still busy: {ray.available_resources()}"
        time.sleep(0.5)


@pytest.mark.ray
def test_local_cluster_is_fixed_and_never_fails_fast(ray_session):
    from mmgm_ray.preflight import discover_capacity, ensure_resources

    _wait_idle(ray_session)
    c = discover_capacity()
    assert not c.autoscaling and c.node_types is None, c
    assert "autoscaler has no config" in c.source  # its monitor was found and has no config file
    assert sum(t.get("CPU", 0) for t in c.totals) == 4
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"test: 5 x \{CPU: 1\} \(PACK\) needs \{CPU: 5\} and can never"):
        ensure_resources(req(5, {"CPU": 1}), timeout_s=60)
    assert time.monotonic() - t0 < 10
    assert ensure_resources(req(4, {"CPU": 1}), timeout_s=5).verdict is Verdict.NOW


@pytest.mark.ray
def test_busy_cluster_waits_bounded_then_proceeds(ray_session):
    """3 of 4 CPUs held by actors: 2 CPUs are LATER; with no change the wait ends after its timeout
    with one line; when an actor goes, the wait returns."""
    ray = ray_session
    from mmgm_ray.preflight import ensure_resources

    @ray.remote(num_cpus=1)
    class Hold:
        def ping(self):
            return 1

    _wait_idle(ray)
    holders = [Hold.remote() for _ in range(3)]
    try:
        ray.get([h.ping.remote() for h in holders])
        out = io.StringIO()
        t0 = time.monotonic()
        with pytest.raises(ResourcesUnavailable) as e:
            ensure_resources(req(2, {"CPU": 1}), timeout_s=3, progress_every_s=1, stream=out)
        assert 3 <= time.monotonic() - t0 < 15
        msg = str(e.value)
        assert "\n" not in msg and "1 of 1 not started after 3 s" in msg and "CPU 1 free of 4" in msg
        assert "waiting" in out.getvalue() and "does not fit the free resources now" in out.getvalue()
        timer = threading.Timer(2.0, lambda: ray.kill(holders[0]))
        timer.start()
        d = ensure_resources(req(2, {"CPU": 1}), timeout_s=60, progress_every_s=1, stream=out)
        timer.join()
        assert d.verdict is Verdict.LATER and "resources are there" in out.getvalue()
        # the probe's placement group is removed (asynchronously): its 2 CPUs come back
        deadline = time.monotonic() + 20
        while ray.available_resources().get("CPU") != 2.0:
            assert time.monotonic() < deadline, ray.available_resources()
            time.sleep(0.2)
        assert all(p["state"] == "REMOVED" for p in ray.util.placement_group_table().values())
    finally:
        for h in holders:
            ray.kill(h)


@pytest.mark.ray
def test_wait_scheduled_bounds_the_pool_hang(ray_session):
    """Five 1-CPU actors on 4 CPUs: today's pool would wait forever for the fifth."""
    ray = ray_session
    from mmgm_ray.preflight import wait_scheduled

    @ray.remote(num_cpus=1)
    class Chain:
        def __init__(self, fail=False):
            if fail:
                raise RuntimeError("bad model path")

    _wait_idle(ray)
    actors = [Chain.remote() for _ in range(4)]
    try:
        wait_scheduled(actors, timeout_s=120)  # returns once all four run (process start-up is slow here)
        actors.append(Chain.remote())
        t0 = time.monotonic()
        with pytest.raises(ResourcesUnavailable) as e:
            wait_scheduled(actors, timeout_s=3, what="5 chain actors", progress_every_s=1, stream=io.StringIO())
        assert time.monotonic() - t0 < 20
        assert re.search(r"^5 chain actors: 1 of 5 not started after 3 s; cluster now CPU 0 free of 4", str(e.value))
        ray.kill(actors.pop(0))
        wait_scheduled(actors, timeout_s=120)  # the fifth takes the freed CPU
    finally:
        for a in actors:
            ray.kill(a)
    bad = Chain.remote(fail=True)
    with pytest.raises(Exception, match="bad model path"):
        wait_scheduled([bad], timeout_s=30)
    ray.kill(bad)
