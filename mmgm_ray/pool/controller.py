"""The pool controller: ``run_pool`` spreads chain blocks over Ray actors and drives them.

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
reused on resume whatever ``pool.num_actors`` says then.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional

from mmgm_ray.config import RunConfig, to_dict
from mmgm_ray.engine import chain_blocks

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


def check_resume_compatible(recorded: dict, cfg: RunConfig) -> None:
    """Raise ValueError naming the keys that differ between a run's recorded config and ``cfg``
    among those that decide the samples (seed, noise, sampler, oracle, model, store, data, chains)."""
    now = to_dict(cfg)
    diffs = []
    for key in RESUME_KEYS:
        diffs += _diff_keys(recorded.get(key), now.get(key), key)
    for key in RESUME_POOL_KEYS:
        diffs += _diff_keys(recorded.get("pool", {}).get(key), now["pool"].get(key), f"pool.{key}")
    if diffs:
        raise ValueError(f"cannot resume run {cfg.name!r}: the config differs from the recorded one in "
                         f"{diffs}; no existing file was touched")


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


class PoolState:
    """What ``on_progress`` callbacks see (tests use it to kill actors / interrupt the driver)."""

    def __init__(self):
        self.actors: dict[int, Any] = {}        # actor index -> handle
        self.layout: list[list[int]] = []
        self.steps: dict[int, int] = {}          # actor index -> last returned step
        self.results: list[dict] = []            # every advance() result, in arrival order
        self.chunks_done = 0
        self.replacements = 0
        self.restarts_seen = 0
        self.snapshot: dict = {}


def _actor_options(cfg: RunConfig, runtime_env: Optional[dict]) -> dict:
    p = cfg.pool
    opts = {"num_cpus": p.cpus_per_actor, "num_gpus": p.gpus_per_actor, "max_restarts": p.max_restarts,
            "max_task_retries": p.max_restarts, "max_concurrency": 2,
            # spread actors over nodes; several per node only when the cluster is smaller
            "scheduling_strategy": "SPREAD"}
    env = dict(runtime_env or {})
    # credentials for an object store given by env vars reach the actors the same way
    fwd = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_APPLICATION_CREDENTIALS"))}
    if fwd:
        env.setdefault("env_vars", {})
        env["env_vars"] = {**fwd, **env["env_vars"]}
    if env:
        opts["runtime_env"] = env
    return opts


def run_pool(cfg: RunConfig, resume: bool = False, *, storage_options: Optional[dict] = None,
             progress: bool = True, on_progress: Optional[Callable[[PoolState], None]] = None,
             stop_after_chunks: Optional[int] = None, runtime_env: Optional[dict] = None,
             poll_s: float = 0.2, actor_hooks: Optional[dict] = None, stop_timeout_s: float = 300.0) -> dict:
    """Run (or resume) the sampling run ``cfg`` on a pool of Ray chain actors; return a summary.

    The run lives at ``{cfg.output}/{cfg.name}`` (local path or fsspec URL; ``storage_options`` for
    the file system, passed to the actors too). ``resume=False`` refuses an existing run;
    ``resume=True`` needs one and continues it from its block checkpoints (same layout, same
    rows, bitwise). Needs ``ray.init()`` first (connects to a cluster or starts a local one).

    Hooks: ``on_progress(state)`` is called after every wait round (raising KeyboardInterrupt in it
    acts like Ctrl-C); ``stop_after_chunks`` stops like Ctrl-C once that many chunk calls returned;
    ``actor_hooks`` are passed to :class:`ChainActor` (tests, benchmark).

    Returns {run_id, url, status ('done' | 'interrupted'), chains, num_steps, min_step, rows,
    samples, divergences, wall_s, chain_steps_per_s, restarts, replacements, model_hash, ...}.
    Raises ValueError for bad input (missing model artifact, existing run without ``resume``,
    config or schema mismatch on resume), ``StoreNotWritableError`` for an unwritable store; in
    each case before any existing file is modified.
    """
    import ray

    from mmgm_ray.factory import load_sampling_model
    from mmgm_ray.pool.actor import remote_class
    from mmgm_ray.store import create_run, load_manifest, sync_manifest_from_checkpoints, update_manifest

    cfg.validate()
    if not ray.is_initialized():
        raise RuntimeError("call ray.init() before run_pool (it connects to a cluster or starts a local one)")
    # the model is loaded here first: a missing/corrupt artifact fails before anything is written
    _, event_shape, model_hash = load_sampling_model(cfg, "cpu")
    root, run_id = cfg.output.rstrip("/"), cfg.name
    run_url = f"{root}/{run_id}"
    existing = _try_load_manifest(load_manifest, run_url, storage_options)
    blocks = chain_blocks(cfg.pool.num_chains, cfg.sampler.block_size)
    if existing is not None and not resume:
        raise ValueError(f"run {run_url} already exists; resume it (--resume / resume=True) or pick a new name")
    if existing is None and resume:
        raise ValueError(f"cannot resume {run_url}: there is no run manifest there")
    if existing is not None:
        check_resume_compatible(existing.get("config") or {}, cfg)
        if existing.get("model_hash") != model_hash:
            raise ValueError(f"cannot resume {run_url}: model hash {model_hash} differs from the recorded "
                             f"{existing.get('model_hash')}; no existing file was touched")
        layout = [list(map(int, g)) for g in existing.get("extra", {}).get("layout", [])]
        if sorted(b for g in layout for b in g) != blocks:
            raise ValueError(f"cannot resume {run_url}: recorded layout does not cover blocks 0..{len(blocks) - 1}")
    else:
        layout = split_layout(len(blocks), cfg.pool.num_actors)
    seeds = {"run_seed": cfg.seed, "rng": "philox4x32-10(key=run_seed, counter=(draw // 4, step, chain_id, stream))",
             "block_size": cfg.sampler.block_size}
    # create_run checks writability and (on resume) schema / shape / dtype before touching anything
    store = create_run(root, run_id, event_shape=event_shape, config=cfg, model_hash=model_hash, seeds=seeds,
                       storage_options=storage_options, extra={"layout": layout, "kind": "sample"})
    # on resume the resolved config of this session is recorded (e.g. a longer pool.num_steps)
    update_manifest(store, status="running", pool_progress={}, config=to_dict(cfg), divergence_events=(
        existing.get("divergence_events", []) if existing else []))

    state = PoolState()
    state.layout = layout
    n_chunk = chunk_steps(cfg)
    actor_cls = remote_class()
    opts = _actor_options(cfg, runtime_env)
    cfg_dict = to_dict(cfg)
    bs = cfg.sampler.block_size
    chains_of = {i: len(g) * bs for i, g in enumerate(layout)}
    total = sum(chains_of.values()) * cfg.pool.num_steps

    def start_actor(i: int):
        return actor_cls.options(**opts).remote(cfg_dict, root, run_id, layout[i], storage_options, actor_hooks)

    entries: dict[int, dict] = {}
    div_events: dict[tuple, dict] = {(d["chain_id"], d["step"]): d for d in
                                     (existing.get("divergence_events", []) if existing else [])}
    prog = _Progress(total, cfg.pool.num_chains, cfg.pool.num_steps, progress)
    t_start = time.perf_counter()
    pending: dict[Any, int] = {}
    stopping = False
    interrupted_hard = False
    stop_deadline = None
    max_replacements = len(layout) * (cfg.pool.max_restarts + 1)
    last_manifest = 0.0
    status = "running"
    error: Optional[BaseException] = None

    def request_stop():
        nonlocal stopping, stop_deadline
        if not stopping:
            stopping = True
            stop_deadline = time.perf_counter() + stop_timeout_s
            for a in state.actors.values():
                try:
                    a.request_stop.remote()
                except Exception:  # a dead actor has nothing to stop
                    pass

    def fold(res: dict) -> None:
        for b, e in res["blocks"].items():
            entries[int(b)] = e
        for d in res["divergence_events"]:
            div_events[(d["chain_id"], d["step"])] = d

    def snapshot() -> dict:
        done = sum(chains_of[i] * min(state.steps.get(i, 0), cfg.pool.num_steps) for i in chains_of)
        samples = sum(int(e.get("rows", 0)) - int(e.get("divergences", 0)) for e in entries.values())
        min_step = min((state.steps.get(i, 0) for i in chains_of), default=0)
        last = _last_per_actor(state.results)
        busy = sum(r["chain_steps_total"] / r["busy_s"] for r in last if r["busy_s"] > 0)
        return prog.snapshot(done, samples, min_step, busy)

    def write_manifest_now(final_status: Optional[str] = None) -> None:
        nonlocal last_manifest
        fields = {"pool_progress": state.snapshot,
                  "divergence_events": sorted(div_events.values(), key=lambda d: (d["chain_id"], d["step"]))}
        if final_status:
            fields["status"] = final_status
        update_manifest(store, blocks=dict(entries), **fields)
        last_manifest = time.perf_counter()

    try:
        for i in range(len(layout)):
            state.actors[i] = start_actor(i)
            state.steps[i] = 0
            pending[state.actors[i].advance.remote(n_chunk)] = i
        while pending:
            try:
                if stopping and time.perf_counter() > stop_deadline:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
                for ref in ready:
                    i = pending.pop(ref)
                    try:
                        res = ray.get(ref)
                    except ray.exceptions.ActorUnavailableError:
                        # restarting right now: the call can be issued again (advance is idempotent)
                        pending[state.actors[i].advance.remote(n_chunk)] = i
                        continue
                    except ray.exceptions.RayActorError as e:
                        if getattr(e, "actor_init_failed", False) or state.replacements >= max_replacements:
                            raise RuntimeError(f"chain actor {i} (blocks {layout[i][0]}..{layout[i][-1]}) "
                                               f"cannot be kept alive: {e}") from e
                        # dead for good: same blocks, same order -> same rows
                        state.replacements += 1
                        state.actors[i] = start_actor(i)
                        if stopping:
                            state.actors[i].request_stop.remote()
                        pending[state.actors[i].advance.remote(n_chunk)] = i
                        continue
                    state.results.append(res)
                    state.chunks_done += 1
                    # an actor Ray restarted reports it; count each restarted process once
                    state.restarts_seen = len({r["pid"] for r in state.results if r["restarted"]})
                    state.steps[i] = res["step"]
                    fold(res)
                    if stop_after_chunks is not None and state.chunks_done >= stop_after_chunks:
                        request_stop()
                    if not res["done"] and not stopping:
                        pending[state.actors[i].advance.remote(n_chunk)] = i
                state.snapshot = snapshot()
                prog.show(state.snapshot)
                if ready and time.perf_counter() - last_manifest > 2.0:
                    write_manifest_now()
                if on_progress is not None:
                    on_progress(state)
            except KeyboardInterrupt:
                if stopping:  # second Ctrl-C: stop waiting; checkpoints are consistent anyway
                    interrupted_hard = True
                    break
                request_stop()
        if not interrupted_hard:
            # a chunk's last checkpoint commits in the background: let every actor finish it
            # before the actors go away, so the run is left at a clean commit point
            commits = {state.actors[i].commit.remote(): i for i in state.actors}
            done_refs, _ = ray.wait(list(commits), num_returns=len(commits), timeout=stop_timeout_s)
            for ref in done_refs:
                try:
                    fold({"blocks": ray.get(ref)["blocks"], "divergence_events": []})
                except ray.exceptions.RayActorError:
                    pass  # died meanwhile: its blocks restore from their checkpoints on resume
        finished = all(state.steps.get(i, 0) >= cfg.pool.num_steps for i in chains_of)
        status = "done" if finished else "interrupted"
    except BaseException as e:
        error = e
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
    finally:
        for a in state.actors.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
    state.snapshot = snapshot()
    prog.show(state.snapshot, final=True)
    try:
        # the committed view from the block checkpoints themselves (covers results lost to Ctrl-C)
        sync_manifest_from_checkpoints(store, blocks)
        update_manifest(store, status=status, pool_progress=state.snapshot,
                        divergence_events=sorted(div_events.values(), key=lambda d: (d["chain_id"], d["step"])),
                        error=(f"{type(error).__name__}: {error}" if error is not None else None))
    except Exception as e:  # the original error matters more than a failed status update
        if error is None:
            error = e
    if error is not None:
        raise error
    man = load_manifest(store)
    wall = time.perf_counter() - t_start
    summary = {
        "run_id": run_id, "url": run_url, "status": status, "chains": cfg.pool.num_chains,
        "num_steps": cfg.pool.num_steps, "min_step": state.snapshot["min_step"],
        "rows": man["progress"]["rows"], "samples": man["progress"]["samples"],
        "divergences": man["divergences"]["count"], "divergence_events": man["divergence_events"],
        "wall_s": wall, "chain_steps_per_s": state.snapshot["chain_steps_per_s"],
        "chain_steps": state.snapshot["chain_steps_done"], "actors": len(layout), "layout": layout,
        "replacements": state.replacements, "restarts": state.restarts_seen,
        "hard_interrupt": interrupted_hard, "model_hash": model_hash, "resumes": man.get("resumes", 0),
        "queue_wait_s": sum(r["queue_wait_s"] for r in _last_per_actor(state.results)),
        # CPU seconds the actors spent (engine + writer threads) per chain-step: robust to a busy machine
        "cpu_s": sum(r["cpu_s"] for r in _last_per_actor(state.results)),
        "chain_steps_actors": sum(r["chain_steps_total"] for r in _last_per_actor(state.results)),
    }
    return summary


def _last_per_actor(results: list[dict]) -> list[dict]:
    last: dict[tuple, dict] = {}
    for r in results:
        last[tuple(r["block_ids"])] = r
    return list(last.values())


def _try_load_manifest(load_manifest, run_url: str, storage_options: Optional[dict]) -> Optional[dict]:
    try:
        return load_manifest(run_url, storage_options)
    except FileNotFoundError:
        return None


def run_bytes(run_url: str, storage_options: Optional[dict] = None) -> int:
    """Total bytes of a run's sample parts (for throughput reports)."""
    from mmgm_ray.store import fsutil
    fs, path = fsutil.resolve(run_url.rstrip("/"), storage_options)
    try:
        return int(fs.du(f"{path}/samples", total=True))
    except FileNotFoundError:
        return 0


__all__ = ["run_pool", "split_layout", "chunk_steps", "check_resume_compatible", "PoolState", "run_bytes"]
