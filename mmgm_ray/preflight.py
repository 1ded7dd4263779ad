"""Pre-flight resource checks against what a Ray cluster CAN provide, autoscaler included.

A request (``ResourceRequest``: bundles such as N x {"CPU": 1, "GPU": 1}, plus a placement strategy)
gets one of three verdicts (``decide``, pure and unit-tested with fakes):

* ``NOW``: it fits the free resources of the nodes that are up;
* ``LATER``: it fits the largest cluster the autoscaler may build (or the nodes that are up, once
  other work finishes), or the maximum is unknown (an autoscaler whose config is out of sight);
* ``NEVER``: it fits no cluster the autoscaler may build: one ``ValueError`` line names the request
  and the cluster's maximum.

``ensure_resources`` acts on it: ``NOW`` returns at once, ``NEVER`` raises, ``LATER`` creates a
placement group of exactly the request (a pending demand the autoscaler sees and scales for, with no
global state: ``ray.autoscaler.sdk.request_resources`` would overwrite every other caller's request
and keep nodes up until cleared), prints progress to stderr, removes the group once it is placed
(the nodes stay up for the autoscaler's idle timeout, long enough for the real workload to claim
them) and raises ``ResourcesUnavailable`` after ``timeout_s``. ``wait_scheduled`` bounds the wait
for actors or a placement group that were already created.

Where the maximum comes from (``discover_capacity``), first found wins:

1. the cluster config in the GCS (``ray._private.state.state.get_cluster_config()``: node groups
   with resources and max counts; Ray Train V2 reads the same; open-source autoscalers in Ray 2.60
   do not write it, managed ones may);
2. the autoscaler config file of this cluster's monitor process (``--autoscaling-config=`` on its
   command line, found in /proc by the GCS port): the cluster launcher (``~/ray_bootstrap_config.yaml``
   on the head, where ``ray job submit`` runs drivers) and fake multi-node clusters. A monitor
   without that flag means a fixed cluster (Ray's read-only autoscaler mirrors the nodes);
3. otherwise the nodes that are up; the cluster autoscales (maximum unknown, e.g. KubeRay, whose
   autoscaler runs in another container) unless the autoscaler's status in the GCS shows only the
   read-only node types ``node_<id>``.

Placement (``fits``) is first-fit decreasing, opening new nodes of the type that holds the most
copies of the bundle: exact when all bundles are equal (every request this project makes). For
mixed bundles it can miss a packing, so ``NEVER`` is only claimed for uniform requests.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Callable, Iterable, Mapping, Optional, Sequence

import ray
import yaml
from ray.autoscaler.v2.sdk import get_cluster_status
from ray.util.placement_group import placement_group, remove_placement_group

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
EPS = 1e-9  # Ray stores resources in units of 1e-4; float sums must not fail an exact fit
PREFIX = "[mmgm preflight]"
AUTOSCALING_STATUS_KEY = "__autoscaling_status"  # ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS
READONLY_TYPE_PREFIX = "node_"  # ray.autoscaler._private.util.format_readonly_node_type
NOISY_RESOURCES = ("memory", "object_store_memory")
DEFAULT_MAX_WORKERS = 2  # Ray's defaults.yaml for cloud providers when a config omits max_workers


class ResourcesUnavailable(ValueError):
    """The cluster did not provide a request in time. A ValueError so that the CLI reports it as one
    line, like any other run that cannot start."""


class Verdict(Enum):
    NOW = "now"
    LATER = "later"
    NEVER = "never"


@dataclass(frozen=True)
class ResourceRequest:
    """Bundles to place together (a Ray Train worker group, a pool of actors) and how."""
    bundles: tuple
    strategy: str = "PACK"   # placement-group strategy; independent actors: PACK or SPREAD (both soft)
    what: str = ""           # how messages name the request, e.g. "train.resources.num_workers=2"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"placement strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        clean = []
        for b in self.bundles:
            if any(v < 0 for v in b.values()):
                raise ValueError(f"{self.what or 'request'}: negative resource in bundle {dict(b)}")
            clean.append({k: float(v) for k, v in b.items() if v > 0})
        object.__setattr__(self, "bundles", tuple(clean))

    @classmethod
    def uniform(cls, n: int, bundle: Mapping[str, float], strategy: str = "PACK",
                what: str = "") -> "ResourceRequest":
        return cls(tuple(dict(bundle) for _ in range(int(n))), strategy, what)

    def describe(self) -> str:
        shapes = Counter(json.dumps(b, sort_keys=True) for b in self.bundles)
        parts = [f"{n} x {_fmt(json.loads(s))}" for s, n in shapes.items()]
        head = f"{self.what}: " if self.what else ""
        return f"{head}{' + '.join(parts) or 'nothing'} ({self.strategy})"

    def total(self) -> dict:
        return _add_all(self.bundles)


@dataclass(frozen=True)
class NodeType:
    """A node type the autoscaler may add: its resources and how many of it may exist at most."""
    name: str
    resources: dict
    max_count: Optional[int]   # None: unlimited


@dataclass(frozen=True)
class Capacity:
    """What a cluster has now and what it may grow to."""
    totals: tuple                        # total resources of each node that is up
    available: tuple                     # free resources of the same nodes
    node_types: Optional[tuple] = None   # NodeType the autoscaler may add; None: unknown or none
    type_counts: dict = field(default_factory=dict)  # nodes up per node type (count against max_count)
    max_workers: Optional[int] = None    # cap on worker nodes, all types together (None: no cap)
    workers_now: int = 0                 # worker nodes up (count against max_workers)
    autoscaling: bool = False            # nodes may be added beyond ``totals``
    max_resources: Optional[dict] = None  # cap on the cluster's summed resources (GCS cluster config)
    source: str = "the nodes that are up"  # where the maximum came from, for messages


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    message: str


# ---- pure decision ------------------------------------------------------------------------------

def _fmt(res: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def _fmt_schedulable(res: Mapping[str, float]) -> str:
    """Like _fmt without the per-node markers and byte counts that only clutter a message."""
    keep = {k: v for k, v in res.items() if not k.startswith("node:") and k not in NOISY_RESOURCES}
    return _fmt(keep) if keep else "no CPUs or GPUs"


def _add_all(dicts: Iterable[Mapping[str, float]]) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _holds(free: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in bundle.items())


def _copies(res: Mapping[str, float], bundle: Mapping[str, float]) -> float:
    """How many copies of ``bundle`` fit on a node with ``res`` (inf for an empty bundle)."""
    return min((res.get(k, 0.0) + EPS) // v for k, v in bundle.items()) if bundle else float("inf")


def fits(bundles: Sequence[Mapping[str, float]], nodes: Sequence[Mapping[str, float]],
         strategy: str = "PACK", new_types: Sequence[NodeType] = (), type_counts: Optional[Mapping[str, int]] = None,
         max_new: Optional[int] = None) -> bool:
    """Whether ``bundles`` can be placed on ``nodes`` (resources each may give) plus new nodes of
    ``new_types`` (at most ``max_count - type_counts[name]`` each, ``max_new`` in all).

    STRICT_PACK: all bundles on one node; STRICT_SPREAD: each on its own node; PACK / SPREAD are
    soft and fit wherever the bundles fit. First-fit decreasing (see the module docstring)."""
    if strategy == "STRICT_PACK":
        bundles = [_add_all(bundles)]
    left = {t.name: (None if t.max_count is None else t.max_count - (type_counts or {}).get(t.name, 0))
            for t in new_types}
    free = [dict(n) for n in nodes]
    used = [False] * len(free)
    opened = 0
    order = sorted(bundles, key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0), sum(b.values())), reverse=True)
    for b in order:
        slot = next((i for i, f in enumerate(free) if not (strategy == "STRICT_SPREAD" and used[i])
                     and _holds(f, b)), None)
        if slot is None:
            if max_new is not None and opened >= max_new:
                return False
            options = [t for t in new_types if (left[t.name] is None or left[t.name] > 0) and _holds(t.resources, b)]
            if not options:
                return False
            best = max(options, key=lambda t: _copies(t.resources, b))
            if left[best.name] is not None:
                left[best.name] -= 1
            opened += 1
            free.append(dict(best.resources))
            used.append(False)
            slot = len(free) - 1
        for k, v in b.items():
            free[slot][k] = free[slot].get(k, 0.0) - v
        used[slot] = True
    return True


def describe_maximum(cap: Capacity) -> str:
    """One phrase: the nodes up and what the autoscaler may add."""
    up = _fmt_schedulable(_add_all(cap.totals))
    text = f"{len(cap.totals)} node(s) up with {up}"
    if cap.node_types is not None:
        adds = []
        for t in cap.node_types:
            more = None if t.max_count is None else max(0, t.max_count - cap.type_counts.get(t.name, 0))
            adds.append(f"{t.name} {_fmt_schedulable(t.resources)} x{'unlimited' if more is None else more}")
        text += "; may add " + (", ".join(adds) if adds else "nothing")
        if cap.max_workers is not None:
            text += f" (at most {cap.max_workers} worker nodes, {cap.workers_now} up)"
        if cap.max_resources:
            text += f"; capped at {_fmt(cap.max_resources)}"
    elif cap.autoscaling:
        text += "; an autoscaler may add nodes (its maximum is not visible from here)"
    else:
        text += "; no autoscaling"
    return f"{text} [{cap.source}]"


def decide(request: ResourceRequest, cap: Capacity) -> Decision:
    """The verdict for ``request`` on a cluster with capacity ``cap`` (no Ray calls)."""
    req = request.describe()
    if fits(request.bundles, cap.available, request.strategy):
        return Decision(Verdict.NOW, f"{req} fits the free resources now")
    over = {k: v for k, v in request.total().items() if cap.max_resources and k in cap.max_resources
            and v > cap.max_resources[k] + EPS}
    if cap.node_types is None and cap.autoscaling:
        possible = True
    elif cap.node_types is None:
        possible = fits(request.bundles, cap.totals, request.strategy)
    else:
        max_new = None if cap.max_workers is None else max(0, cap.max_workers - cap.workers_now)
        possible = not over and fits(request.bundles, cap.totals, request.strategy, cap.node_types,
                                     cap.type_counts, max_new)
    uniform = len({json.dumps(b, sort_keys=True) for b in request.bundles}) <= 1
    if possible or not uniform:
        return Decision(Verdict.LATER, f"{req} does not fit the free resources now; the cluster: "
                                       f"{describe_maximum(cap)}")
    return Decision(Verdict.NEVER, f"{req} needs {_fmt(request.total())} and can never be scheduled: "
                                   f"the cluster's maximum is {describe_maximum(cap)}")


# ---- what the cluster can provide (Ray) -----------------------------------------------------------

def _monitor_cmdline(gcs_address: str) -> Optional[tuple]:
    """(argv, cwd) of the autoscaler monitor of the cluster whose GCS listens on this port, when it
    runs on this machine and /proc shows it; None otherwise."""
    port = gcs_address.rsplit(":", 1)[-1]
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not any(a.endswith("monitor.py") and "autoscaler" in a for a in argv):
            continue
        gcs = [a.split("=", 1)[1] for a in argv if a.startswith("--gcs-address=")]
        if gcs and gcs[0].rsplit(":", 1)[-1] == port:
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                cwd = "/"
            return argv, cwd
    return None


def _flag(argv: Sequence[str], name: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def node_types_from_config(config: Mapping) -> tuple:
    """(worker NodeTypes, global max_workers) of an autoscaler config, with Ray's defaults: global
    max_workers 2 when absent, a node type's max_workers the global one
    (ray.autoscaler._private.util.fill_node_type_min_max_workers); the head type is never added."""
    max_workers = int(config.get("max_workers", DEFAULT_MAX_WORKERS))
    head = config.get("head_node_type")
    types = []
    for name, t in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        res = {k: float(v) for k, v in (t.get("resources") or {}).items()}
        types.append(NodeType(name, res, int(t.get("max_workers", max_workers))))
    return tuple(types), max_workers


def _gcs_cluster_config() -> Optional[tuple]:
    import ray._private.state as state  # private: the accessor Ray Train V2 uses for the same check

    cfg = state.state.get_cluster_config()
    if cfg is None or not cfg.node_group_configs:
        return None
    types = tuple(NodeType(g.name, dict(g.resources), None if g.max_count == -1 else int(g.max_count))
                  for g in cfg.node_group_configs)
    return types, (dict(cfg.max_resources) or None)


def _autoscaler_status() -> Optional[dict]:
    """The v1 autoscaler's status report in the GCS (what ``ray status`` prints), or None."""
    from ray.experimental.internal_kv import _internal_kv_get  # no public accessor for this key

    raw = _internal_kv_get(AUTOSCALING_STATUS_KEY)
    return json.loads(raw) if raw else None


def _nodes(gcs_address: str) -> tuple:
    """(totals, available, node type names) of the nodes that are up."""
    status = get_cluster_status(gcs_address)
    totals, avail, types = [], [], []
    for n in status.active_nodes + status.idle_nodes:
        tot = {u.resource_name: u.total for u in n.resource_usage.usage}
        totals.append(tot)
        avail.append({u.resource_name: u.total - u.used for u in n.resource_usage.usage})
        types.append(n.ray_node_type_name)
    return totals, avail, types


def discover_capacity(gcs_address: Optional[str] = None) -> Capacity:
    """The ``Capacity`` of the connected cluster (or the one at ``gcs_address``); see the module
    docstring for the order of sources."""
    gcs = gcs_address or ray.get_runtime_context().gcs_address
    totals, avail, node_type_names = _nodes(gcs)
    workers_now = sum(1 for t in totals if "node:__internal_head__" not in t)
    base = dict(totals=tuple(totals), available=tuple(avail), workers_now=workers_now)
    report = (_autoscaler_status() or {}).get("autoscaler_report") or {}
    counts = dict(Counter(report.get("active_nodes") or {}) or Counter(node_type_names))
    gcs_cfg = _gcs_cluster_config()
    if gcs_cfg is not None:
        return Capacity(**base, node_types=gcs_cfg[0], type_counts=counts, max_resources=gcs_cfg[1],
                        autoscaling=True, source="the GCS cluster config")
    unreadable = ""
    monitor = _monitor_cmdline(gcs)
    if monitor is not None:
        path = _flag(monitor[0], "--autoscaling-config")
        if path is None:
            return Capacity(**base, source="fixed cluster: its autoscaler has no config")
        path = os.path.join(monitor[1], os.path.expanduser(path))
        try:
            with open(path) as f:
                types, max_workers = node_types_from_config(yaml.safe_load(f))
            return Capacity(**base, node_types=types, type_counts=counts, max_workers=max_workers,
                            autoscaling=True, source=f"autoscaler config {path}")
        except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as e:
            unreadable = f"; its config {path} is unreadable ({type(e).__name__})"
    reported = set(report.get("active_nodes") or {})
    if reported and all(t.startswith(READONLY_TYPE_PREFIX) for t in reported):
        return Capacity(**base, source="fixed cluster: read-only autoscaler" + unreadable)
    return Capacity(**base, autoscaling=True, source="autoscaler config not visible from this process" + unreadable)


# ---- acting on the verdict ----------------------------------------------------------------------

def autoscaler_activity() -> str:
    """A short phrase on what the autoscaler is doing now (v1 status report, else the v2 SDK)."""
    status = _autoscaler_status()
    if status is not None:
        rep = status.get("autoscaler_report") or {}
        parts = [f"launching {t} x{n}" for t, n in (rep.get("pending_launches") or {}).items()]
        parts += [f"starting {t} ({s})" for _, t, s in rep.get("pending_nodes") or []]
        parts += [f"failed {t}" for _, t in rep.get("failed_nodes") or []]
        demands = (status.get("load_metrics_report") or {}).get("pg_demand") or []
        if demands:
            parts.append(f"{len(demands)} placement group demand(s) pending")
        return "; ".join(parts) or "no node launches"
    st = get_cluster_status(ray.get_runtime_context().gcs_address)
    parts = [f"launching {p.ray_node_type_name} x{p.count}" for p in st.pending_launches]
    parts += [f"starting {p.ray_node_type_name}" for p in st.pending_nodes]
    parts += [f"failed {p.ray_node_type_name}" for p in st.failed_launches]
    return "; ".join(parts) or "no node launches"


def _cluster_now() -> str:
    tot, av = ray.cluster_resources(), ray.available_resources()
    keys = [k for k in ("CPU", "GPU") if k in tot] or ["CPU"]
    return ", ".join(f"{k} {av.get(k, 0.0):g} free of {tot.get(k, 0.0):g}" for k in keys)


def _progress(stream: Optional[IO], text: str) -> None:
    print(f"{PREFIX} {text}", file=stream or sys.stderr, flush=True)


def ensure_resources(request: ResourceRequest, timeout_s: float = 900.0, progress_every_s: float = 10.0,
                     stream: Optional[IO] = None, capacity: Optional[Capacity] = None) -> Decision:
    """Return once the cluster can place ``request``; raise ValueError if it never can and
    ``ResourcesUnavailable`` after ``timeout_s`` (see the module docstring). Needs ``ray.init``."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if not request.bundles:
        return Decision(Verdict.NOW, "empty request")
    cap = capacity or discover_capacity()
    d = decide(request, cap)
    if d.verdict is Verdict.NEVER:
        raise ValueError(d.message)
    if d.verdict is Verdict.NOW:
        return d
    _progress(stream, f"{d.message}; waiting up to {timeout_s:g} s")
    pg = placement_group(list(request.bundles), strategy=request.strategy)
    try:
        _wait_refs([pg.ready()], timeout_s, progress_every_s, stream, request.describe(),
                   lambda: f"the cluster: {describe_maximum(cap)}")
    finally:
        remove_placement_group(pg)
    _progress(stream, f"{request.describe()}: resources are there")
    return d


def _wait_refs(refs: list, timeout_s: float, every: float, stream: Optional[IO], what: str,
               context: Callable[[], str]) -> None:
    """Wait for ``refs`` with a progress line every ``every`` s; ResourcesUnavailable on timeout
    (its message ends with ``context()``, evaluated only then)."""
    t0 = time.monotonic()
    pending = list(refs)
    while pending:
        left = timeout_s - (time.monotonic() - t0)
        if left <= 0:
            raise ResourcesUnavailable(
                f"{what}: {len(pending)} of {len(refs)} not started after {timeout_s:g} s; cluster now "
                f"{_cluster_now()}; autoscaler: {autoscaler_activity()}; {context()}")
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=min(every, left))
        ray.get(done)  # an actor whose constructor failed raises here, not after the timeout
        if pending:
            # an actor whose resources are held is not ready until its constructor returns (loading a
            # model, compiling the score can take a minute on a GPU): say so, or the line reads as a hang
            _progress(stream, f"waiting {time.monotonic() - t0:.0f}/{timeout_s:g} s for {what}: "
                              f"{len(pending)} of {len(refs)} not ready (waiting for resources, or placed and "
                              f"still in their constructor); cluster now {_cluster_now()}; "
                              f"autoscaler: {autoscaler_activity()}")


def wait_scheduled(actors: Sequence = (), placement_group=None, timeout_s: float = 900.0,
                   what: str = "", progress_every_s: float = 10.0, stream: Optional[IO] = None) -> None:
    """Wait until ``actors`` (handles) are alive and ``placement_group`` is placed; progress on
    stderr; ``ResourcesUnavailable`` naming what is pending after ``timeout_s`` (the caller decides
    whether to kill them). An actor whose constructor raised re-raises that error."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    # no retries: a constructor that raised fails the probe once, without Ray's "task will be retried" reports
    refs = [a.__ray_ready__.options(max_task_retries=0).remote() for a in actors]
    if placement_group is not None:
        refs.append(placement_group.ready())
    label = what or (f"{len(actors)} actor(s)" + (" and a placement group" if placement_group else ""))
    _wait_refs(refs, timeout_s, progress_every_s, stream, label,
               lambda: f"the cluster: {describe_maximum(discover_capacity())}")
