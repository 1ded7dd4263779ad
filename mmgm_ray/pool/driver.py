"""The pool driver: ``run_pool`` spreads chain blocks over Ray actors and drives them to the end.

Driving: each actor has at most one ``advance(chunk_steps)`` call in flight; the driver waits on
all of them with ``ray.wait`` (not ``ActorPool``, which can hang on a persistently failing actor),
issues the next chunk as each returns, and folds the returned committed block entries into the run
manifest (the driver is the manifest's only writer). Faults:

* an actor that dies is restarted by Ray (``max_restarts``); its constructor restores from the
  block checkpoints and the pending call is retried (``max_task_retries``);
* an actor that is dead for good (restarts exhausted, ``ray.kill(no_restart=True)``, node gone) is
  replaced by a new actor holding the SAME blocks in the SAME order (layout), so round-off and
  draws do not change;
* Ctrl-C (KeyboardInterrupt): stop issuing chunks, ask every actor to return at its next
  checkpoint, wait for them, mark the run ``interrupted`` (resume with ``resume=True``); a second
  Ctrl-C stops waiting (the block checkpoints are consistent at any instant anyway).

The layout (which actor holds which blocks) is recorded in the manifest (``extra.layout``) and
reused on resume whatever ``pool.num_actors`` says then. So are the hardware every actor ran on
(``hardware``: ``mmgm_ray.hardware.describe`` per actor) and its memory plan (``memory_plans``): a
resume on another device class (CPU vs CUDA, another GPU model) is refused with one line unless
``allow_device_change``, since the rows would differ from an uninterrupted run; allowed changes are
listed in ``device_changes``.

Structure: :func:`open_sampling_run` makes the open-or-resume decision (every check before any file
is touched); :class:`PoolDriver` holds the run's actors, pending calls, committed entries,
divergences and stop state, with one method per event; :func:`run_pool` ties the two.
"""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import ray

from mmgm_ray import faults
from mmgm_ray.cluster import require_ray
from mmgm_ray.config import RunConfig, to_dict
from mmgm_ray.engine import chain_blocks
from mmgm_ray.factory import load_sampling_model
from mmgm_ray.hardware import DeviceChangeError, check_device_class
from mmgm_ray.pool.actor import RemoteChainActor
from mmgm_ray.store import (SampleStore, create_run, fsutil, load_manifest, sync_manifest_from_checkpoints,
                            update_manifest)

#: config sections that must be identical when a run is resumed (they decide every draw and row)
RESUME_KEYS = ("seed", "noise", "sampler", "oracle", "model_path", "store", "data")
RESUME_POOL_KEYS = ("num_chains",)


def split_layout(num_blocks: int, num_actors: int) -> list[list[int]]:
    """Contiguous, balanced groups of block ids, one per actor (never an empty group)."""
    n = max(1, min(int(num_actors), int(num_blocks)))
    base, extra = divmod(num_blocks, n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def chunk_steps(cfg: RunConfig) -> int:
    """Walk steps per ``advance`` call: ``pool.chunk_steps`` or one checkpoint interval."""
    return int(cfg.pool.chunk_steps or cfg.pool.checkpoint_every)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix]


def _with_defaults(recorded: Any, default: Any) -> Any:
    """``recorded`` with the fields it lacks (added to the config since it was recorded) at their defaults."""
    if isinstance(recorded, dict) and isinstance(default, dict):
        return {**default, **{k: _with_defaults(v, default.get(k)) for k, v in recorded.items()}}
    return recorded


def check_resume_compatible(recorded: dict, cfg: RunConfig) -> None:
    """Raise ValueError naming the keys that differ between a run's recorded config and ``cfg``
    among those that decide the samples (seed, noise, sampler, oracle, model, store, data, chains).
    A field the recorded config lacks (added since) counts as its default."""
    now, defaults = to_dict(cfg), to_dict(RunConfig())
    diffs = []
    for key in RESUME_KEYS:
        diffs += _diff_keys(_with_defaults(recorded.get(key), defaults.get(key)), now.get(key), key)
    for key in RESUME_POOL_KEYS:
        diffs += _diff_keys(recorded.get("pool", {}).get(key), now["pool"].get(key), f"pool.{key}")
    if diffs:
        raise ValueError(f"cannot resume run {cfg.name!r}: the config differs from the recorded one in "
                         f"{diffs}; no existing file was touched")


# ---- open or resume ----------------------------------------------------------------------------------

@dataclass
class SamplingRun:
    """A sampling run opened for writing: its store, actor layout and what was recorded before."""
    cfg: RunConfig
    store: SampleStore
    layout: list[list[int]]                 # block ids of each actor, in batch order
    model_hash: str
    divergence_events: list[dict]           # recorded by earlier sessions (resume)
    hardware: dict                          # recorded by earlier sessions: {device_class, device_type, actors}
    allow_device_change: bool = False


#: the exception line of a ValueError raised in an actor's constructor, in Ray's error text
_BAD_INPUT = re.compile(r"^(?:[\w.]+\.)?(DeviceChangeError|ValueError): (.+)$", re.MULTILINE)


def open_sampling_run(cfg: RunConfig, resume: bool, storage_options: Optional[dict] = None,
                      allow_device_change: bool = False) -> SamplingRun:
    """Create the run ``{cfg.output}/{cfg.name}`` or reopen it to resume; every check (model
    artifact, existing run, config and model hash on resume, device type, layout, writability,
    schema) runs before any existing file is modified, raising ValueError / ``StoreNotWritableError``.
    Each actor checks its device class (e.g. the GPU model) against the one recorded for its blocks."""
    cfg.validate()
    _, event_shape, model_hash = load_sampling_model(cfg, "cpu")  # a bad artifact fails here first
    blocks = chain_blocks(cfg.pool.num_chains, cfg.sampler.block_size)
    existing = load_manifest(cfg.run_dir, storage_options)
    if existing is not None and not resume:
        raise ValueError(f"run {cfg.run_dir} already exists; resume it (--resume / resume=True) or pick a new name")
    if existing is None and resume:
        raise ValueError(f"cannot resume {cfg.run_dir}: there is no run manifest there")
    if existing is not None:
        check_resume_compatible(existing.get("config") or {}, cfg)
        if existing.get("model_hash") != model_hash:
            raise ValueError(f"cannot resume {cfg.run_dir}: model hash {model_hash} differs from the recorded "
                             f"{existing.get('model_hash')}; no existing file was touched")
        recorded_type = (existing.get("hardware") or {}).get("device_type")
        note = check_device_class({"device_class": recorded_type} if recorded_type else None,
                                  {"device_class": cfg.pool.device_type()}, cfg.run_dir, allow_device_change)
        if note:
            print(f"[mmgm pool] {note}", file=sys.stderr, flush=True)
        layout = [list(map(int, g)) for g in existing.get("extra", {}).get("layout", [])]
        if sorted(b for g in layout for b in g) != blocks:
            raise ValueError(f"cannot resume {cfg.run_dir}: recorded layout does not cover blocks "
                             f"0..{len(blocks) - 1}")
    else:
        layout = split_layout(len(blocks), cfg.pool.num_actors)
    seeds = {"run_seed": cfg.seed, "rng": "philox4x32-10(key=run_seed, counter=(draw // 4, step, chain_id, stream))",
             "block_size": cfg.sampler.block_size}
    # create_run checks writability and (on resume) schema / shape / dtype before touching anything
    store = create_run(cfg.output.rstrip("/"), cfg.name, event_shape=event_shape, config=cfg,
                       model_hash=model_hash, seeds=seeds, storage_options=storage_options,
                       extra={"layout": layout, "kind": "sample"})
    recorded = existing.get("divergence_events", []) if existing else []
    # on resume the resolved config of this session is recorded (e.g. a longer pool.num_steps)
    update_manifest(store, status="running", pool_progress={}, config=to_dict(cfg), divergence_events=recorded)
    hardware = (existing.get("hardware") if existing else None) or {}
    return SamplingRun(cfg, store, layout, model_hash, recorded, hardware, allow_device_change)


# ---- progress line -------------------------------------------------------------------------------------

class _Progress:
    """Progress line on stderr (a bar on a terminal, a line every few seconds otherwise)."""

    def __init__(self, total_chain_steps: int, num_chains: int, num_steps: int, enabled: bool,
                 stream=None):
        self.total = total_chain_steps
        self.num_chains, self.num_steps = num_chains, num_steps
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last_print = 0.0
        self.start_done: Optional[int] = None
        self.t_first: Optional[float] = None

    def snapshot(self, done_chain_steps: int, samples: int, min_step: int, busy_rate: float = 0.0) -> dict:
        now = time.perf_counter()
        if self.start_done is None or self.t_first is None:
            self.start_done = done_chain_steps
            self.t_first = now if done_chain_steps > 0 else None
        elapsed = now - self.t0
        since = now - self.t_first if self.t_first is not None else 0.0
        # wall rate once results flow (excludes actor start-up); before that the actors' own rate
        rate = (done_chain_steps - self.start_done) / since if since > 1.0 else busy_rate
        remaining = self.total - done_chain_steps
        eta = remaining / rate if rate > 0 else None
        return {"chains": self.num_chains, "num_steps": self.num_steps, "min_step": min_step,
                "chain_steps_done": done_chain_steps, "chain_steps_total": self.total,
                "fraction": done_chain_steps / max(self.total, 1), "chain_steps_per_s": rate,
                "samples_written": samples, "elapsed_s": elapsed, "eta_s": eta}

    def show(self, snap: dict, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last_print < (0.5 if self.tty else 5.0):
            return
        self.last_print = now
        frac = snap["fraction"]
        eta = "?" if snap["eta_s"] is None else f"{snap['eta_s']:.0f}s"
        bar = ""
        if self.tty:
            width = 24
            fill = int(round(frac * width))
            bar = "[" + "#" * fill + "." * (width - fill) + "] "
        line = (f"mmgm pool {bar}{100 * frac:5.1f}% | chains {snap['chains']} | step "
                f"{snap['min_step']}/{snap['num_steps']} | {snap['chain_steps_per_s']:.3g} chain-steps/s | "
                f"samples {snap['samples_written']} | ETA {eta}")
        end = "\n" if (final or not self.tty) else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


# ---- the driver ------------------------------------------------------------------------------------------

def _actor_options(cfg: RunConfig, runtime_env: Optional[dict]) -> dict:
    p = cfg.pool
    opts = {"num_cpus": p.cpus_per_actor, "num_gpus": p.gpus_per_actor, "max_restarts": p.max_restarts,
            "max_task_retries": p.max_restarts, "max_concurrency": 2,
            # spread actors over nodes; several per node only when the cluster is smaller
            "scheduling_strategy": "SPREAD"}
    env = dict(runtime_env or {})
    # credentials for an object store given by env vars reach the actors the same way
    fwd = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_APPLICATION_CREDENTIALS"))}
    fwd.update(faults.env_vars())
    if fwd:
        env["env_vars"] = {**fwd, **env.get("env_vars", {})}
    if env:
        opts["runtime_env"] = env
    return opts


class PoolDriver:
    """One sampling run's actors and what they have committed, advanced by events.

    ``on_progress(driver)`` callbacks (tests, dashboards) see ``actors`` (actor index -> handle),
    ``layout``, ``steps`` (actor index -> last returned step), ``results`` (every ``advance`` result
    in arrival order), ``chunks_done``, ``replacements``, ``restarts_seen`` and ``snapshot``.
    """

    def __init__(self, run: SamplingRun, *, storage_options: Optional[dict] = None,
                 runtime_env: Optional[dict] = None, progress: bool = True, stop_timeout_s: float = 300.0):
        cfg = run.cfg
        self.run, self.cfg, self.layout = run, cfg, run.layout
        self.storage_options = storage_options
        self.chunk = chunk_steps(cfg)
        self.options = _actor_options(cfg, runtime_env)
        self.stop_timeout_s = stop_timeout_s
        self.max_replacements = len(self.layout) * (cfg.pool.max_restarts + 1)
        self.chains_of = {i: len(g) * cfg.sampler.block_size for i, g in enumerate(self.layout)}
        self.progress = _Progress(sum(self.chains_of.values()) * cfg.pool.num_steps, cfg.pool.num_chains,
                                  cfg.pool.num_steps, progress)
        self.actors: dict[int, Any] = {}
        self.steps: dict[int, int] = {i: 0 for i in self.chains_of}
        self.results: list[dict] = []
        self.pending: dict[Any, int] = {}         # in-flight advance() -> actor index
        self.entries: dict[int, dict] = {}        # block -> committed manifest entry
        self.divergences = {(d["chain_id"], d["step"]): d for d in run.divergence_events}
        self.hardware: dict[str, dict] = dict(run.hardware.get("actors") or {})   # actor index -> describe()
        self.memory_plans: dict[str, dict] = {}
        self.device_changes: list[dict] = list(run.hardware.get("changes") or [])
        self.chunks_done = self.replacements = self.restarts_seen = 0
        self.stopping, self.stop_deadline = False, float("inf")
        self.snapshot: dict = {}
        self._last_manifest = 0.0
        self.t_start = time.perf_counter()

    # ---- events --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create one actor per block group and give each its first chunk."""
        for i in range(len(self.layout)):
            self._start_actor(i)

    def on_result(self, i: int, res: dict) -> None:
        """Actor ``i`` returned a chunk: fold its commits in and give it the next chunk."""
        self.results.append(res)
        self.chunks_done += 1
        # an actor Ray restarted reports it; count each restarted process once
        self.restarts_seen = len({r["pid"] for r in self.results if r["restarted"]})
        self.steps[i] = res["step"]
        self._note_hardware(i, res)
        self._fold(res["blocks"], res["divergence_events"])
        if not res["done"] and not self.stopping:
            self._advance(i)

    def on_actor_error(self, i: int, err: BaseException) -> None:
        """Actor ``i``'s call failed: retry a restarting actor, replace one dead for good."""
        if isinstance(err, ray.exceptions.ActorUnavailableError):
            self._advance(i)   # restarting right now: advance() is idempotent
            return
        bad = _BAD_INPUT.search(str(err)) if getattr(err, "actor_init_failed", False) else None
        if bad:  # the actor refused its input (another device class, chains that do not fit): one line
            raise (DeviceChangeError if bad.group(1) == "DeviceChangeError" else ValueError)(bad.group(2)) from None
        if getattr(err, "actor_init_failed", False) or self.replacements >= self.max_replacements:
            g = self.layout[i]
            raise RuntimeError(f"chain actor {i} (blocks {g[0]}..{g[-1]}) cannot be kept alive: {err}") from err
        self.replacements += 1  # same blocks, same order -> same rows
        self._start_actor(i)

    def request_stop(self) -> None:
        """Ctrl-C: every actor returns at its next checkpoint; no new chunks."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.perf_counter() + self.stop_timeout_s
        for a in self.actors.values():
            a.request_stop.remote()

    def commit(self) -> None:
        """Let every actor finish committing its last checkpoint (it runs in the background)."""
        commits = {a.commit.remote(): i for i, a in self.actors.items()}
        done, _ = ray.wait(list(commits), num_returns=len(commits), timeout=self.stop_timeout_s)
        for ref in done:
            try:
                self._fold(ray.get(ref)["blocks"], [])
            except ray.exceptions.RayActorError:
                pass  # died meanwhile: its blocks restore from their checkpoints on resume

    @property
    def finished(self) -> bool:
        return all(self.steps[i] >= self.cfg.pool.num_steps for i in self.chains_of)

    # ---- the loop ------------------------------------------------------------------------------------

    def drive(self, on_progress: Optional[Callable[["PoolDriver"], None]] = None, poll_s: float = 0.2) -> bool:
        """Dispatch results until no call is pending; return True after a second Ctrl-C."""
        while self.pending:
            try:
                if time.perf_counter() > self.stop_deadline:
                    return False
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=poll_s)
                for ref in ready:
                    self._collect(ref)
                self._refresh(bool(ready))
                if on_progress is not None:
                    on_progress(self)
            except KeyboardInterrupt:
                if self.stopping:  # second Ctrl-C: stop waiting; checkpoints are consistent anyway
                    return True
                self.request_stop()
        return False

    def _collect(self, ref) -> None:
        i = self.pending.pop(ref)
        try:
            res = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self.on_actor_error(i, e)
            return
        self.on_result(i, res)

    def _start_actor(self, i: int) -> None:
        rec = self.run.hardware
        recorded = (rec.get("actors") or {}).get(str(i)) or (rec if rec.get("device_class") else None)
        self.actors[i] = RemoteChainActor.options(**self.options).remote(
            to_dict(self.cfg), self.cfg.output.rstrip("/"), self.cfg.name, self.layout[i], self.storage_options,
            recorded_hardware=recorded, allow_device_change=self.run.allow_device_change)
        if self.stopping:
            self.actors[i].request_stop.remote()
        self._advance(i)

    def _advance(self, i: int) -> None:
        self.pending[self.actors[i].advance.remote(self.chunk)] = i

    def _note_hardware(self, i: int, res: dict) -> None:
        """Record actor ``i``'s hardware and memory plan; report an allowed change of device class once."""
        before = self.hardware.get(str(i), {}).get("device_class")
        self.hardware[str(i)] = res["hardware"]
        self.memory_plans[str(i)] = {**res["memory_plan"], "micro_batch_used": res["micro_batch"]}
        if res["device_note"] and before != res["hardware"]["device_class"]:
            print(f"[mmgm pool] actor {i}: {res['device_note']}", file=sys.stderr, flush=True)
            self.device_changes.append({"actor": i, "from": before, "to": res["hardware"]["device_class"]})

    def _hardware_record(self) -> dict:
        first = self.hardware.get("0") or next(iter(self.hardware.values()), {})
        return {"device_class": first.get("device_class"), "device_type": first.get("device_type"),
                "actors": dict(self.hardware), "changes": self.device_changes}

    def _fold(self, blocks: dict, divergence_events: list[dict]) -> None:
        for b, e in blocks.items():
            self.entries[int(b)] = e
        for d in divergence_events:
            self.divergences[(d["chain_id"], d["step"])] = d

    def _refresh(self, new_results: bool) -> None:
        self.snapshot = self._snapshot()
        self.progress.show(self.snapshot)
        if new_results and time.perf_counter() - self._last_manifest > 2.0:
            update_manifest(self.run.store, blocks=dict(self.entries), pool_progress=self.snapshot,
                            divergence_events=self._divergence_list(), hardware=self._hardware_record(),
                            memory_plans=self.memory_plans)
            self._last_manifest = time.perf_counter()

    def _snapshot(self) -> dict:
        done = sum(self.chains_of[i] * min(self.steps[i], self.cfg.pool.num_steps) for i in self.chains_of)
        samples = sum(int(e.get("rows", 0)) - int(e.get("divergences", 0)) for e in self.entries.values())
        busy = sum(r["chain_steps_total"] / r["busy_s"] for r in self._last_results() if r["busy_s"] > 0)
        return self.progress.snapshot(done, samples, min(self.steps.values(), default=0), busy)

    def _last_results(self) -> list[dict]:
        last: dict[tuple, dict] = {}
        for r in self.results:
            last[tuple(r["block_ids"])] = r
        return list(last.values())

    def _divergence_list(self) -> list[dict]:
        return sorted(self.divergences.values(), key=lambda d: (d["chain_id"], d["step"]))

    # ---- the end -------------------------------------------------------------------------------------

    def kill_actors(self) -> None:
        for a in self.actors.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort: the actor may be gone with its node
                pass

    def finalize(self, status: str, error: Optional[str]) -> dict:
        """Record the committed view from the block checkpoints themselves (covers results lost to a
        Ctrl-C) and the final status; return the manifest."""
        self.snapshot = self._snapshot()
        self.progress.show(self.snapshot, final=True)
        sync_manifest_from_checkpoints(self.run.store, [b for g in self.layout for b in g])
        return update_manifest(self.run.store, status=status, pool_progress=self.snapshot,
                               divergence_events=self._divergence_list(), error=error,
                               hardware=self._hardware_record(), memory_plans=self.memory_plans)

    def summary(self, status: str, man: dict, hard_interrupt: bool) -> dict:
        last = self._last_results()
        return {
            "run_id": self.cfg.name, "url": self.cfg.run_dir, "status": status, "chains": self.cfg.pool.num_chains,
            "num_steps": self.cfg.pool.num_steps, "min_step": self.snapshot["min_step"],
            "rows": man["progress"]["rows"], "samples": man["progress"]["samples"],
            "divergences": man["divergences"]["count"], "divergence_events": man["divergence_events"],
            "wall_s": time.perf_counter() - self.t_start, "chain_steps_per_s": self.snapshot["chain_steps_per_s"],
            "chain_steps": self.snapshot["chain_steps_done"], "actors": len(self.layout), "layout": self.layout,
            "replacements": self.replacements, "restarts": self.restarts_seen, "hard_interrupt": hard_interrupt,
            "model_hash": self.run.model_hash, "resumes": man.get("resumes", 0),
            "queue_wait_s": sum(r["queue_wait_s"] for r in last),
            # CPU seconds the actors spent (engine + writer threads) per chain-step: robust to a busy machine
            "cpu_s": sum(r["cpu_s"] for r in last),
            "chain_steps_actors": sum(r["chain_steps_total"] for r in last),
        }


def run_pool(cfg: RunConfig, resume: bool = False, *, storage_options: Optional[dict] = None,
             progress: bool = True, on_progress: Optional[Callable[[PoolDriver], None]] = None,
             runtime_env: Optional[dict] = None, poll_s: float = 0.2, stop_timeout_s: float = 300.0,
             allow_device_change: bool = False) -> dict:
    """Run (or resume) the sampling run ``cfg`` on a pool of Ray chain actors; return a summary.

    The run lives at ``cfg.run_dir`` (local path or fsspec URL; ``storage_options`` for the file
    system, passed to the actors too). ``resume=False`` refuses an existing run; ``resume=True``
    needs one and continues it from its block checkpoints (same layout, same rows, bitwise). Needs
    Ray started (``mmgm_ray.cluster.ensure_ray``). ``on_progress(driver)`` is called after every
    wait round; raising KeyboardInterrupt in it acts like Ctrl-C. A resume on another device class
    than the run recorded raises ``hardware.DeviceChangeError`` (a ValueError) unless
    ``allow_device_change`` (then the rows differ from an uninterrupted run from there on).

    Returns {run_id, url, status ('done' | 'interrupted'), chains, num_steps, min_step, rows,
    samples, divergences, wall_s, chain_steps_per_s, restarts, replacements, model_hash, ...}.
    Raises ValueError for bad input (missing model artifact, existing run without ``resume``,
    config or schema mismatch on resume), ``StoreNotWritableError`` for an unwritable store; in
    each case before any existing file is modified.
    """
    require_ray("run_pool")
    driver = PoolDriver(open_sampling_run(cfg, resume, storage_options, allow_device_change),
                        storage_options=storage_options,
                        runtime_env=runtime_env, progress=progress, stop_timeout_s=stop_timeout_s)
    status, error, hard = "running", None, False
    try:
        driver.start()
        hard = driver.drive(on_progress, poll_s)
        if not hard:
            driver.commit()
        status = "done" if driver.finished else "interrupted"
    except BaseException as e:
        error = e
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
    finally:
        driver.kill_actors()
    try:
        man = driver.finalize(status, f"{type(error).__name__}: {error}" if error is not None else None)
    except Exception as e:  # the original error matters more than a failed status update
        error = error or e
    if error is not None:
        raise error
    return driver.summary(status, man, hard)


def run_bytes(run_url: str, storage_options: Optional[dict] = None) -> int:
    """Total bytes of a run's sample parts (for throughput reports)."""
    fs, path = fsutil.resolve(run_url.rstrip("/"), storage_options)
    try:
        return int(fs.du(f"{path}/samples", total=True))
    except FileNotFoundError:
        return 0
