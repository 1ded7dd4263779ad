"""The chain actor: many chain blocks of one ``WalkJumpEngine`` batch, a background writer, block
checkpoints (THEORY sections 4-5; exactly-once contract in ``mmgm_ray.store.store``).

``ChainActor`` is a plain class (usable in-process, e.g. by tests and the benchmark);
:func:`remote_class` wraps it with ``ray.remote``. One actor holds a fixed list of blocks (its
*layout*) for the whole run: the same blocks in the same batch order give bitwise the same draws
AND the same floating-point round-off, so a restarted or replacement actor must get the same list.

Data path: the engine loop (device) -> bounded ``queue.Queue(queue_size)`` -> writer thread (host):
splitting per block, Arrow conversion, Parquet writes and checkpoints never stall the device unless
the queue is full (back-pressure). On CUDA the jumps are copied into pinned host buffers with
``non_blocking=True`` and a CUDA event; the writer thread waits on the event, so the copy overlaps
with the next steps.

Block checkpoints hold the state at the latest checkpoint step t AND at the previous one (t - k):
the actor writes its blocks' checkpoints one by one, so a crash in the middle of that loop leaves
some blocks at t and the others at t - k. On restart every block is rolled back to the oldest
common step (the writer restores the matching older writer state, deleting the newer parts, which
are rewritten with identical bytes).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Optional, Sequence

import numpy as np
import torch

from mmgm_ray.config import RunConfig, from_dict
from mmgm_ray.engine import WalkJumpEngine
from mmgm_ray.jumps import JumpBatch

_GATHER_ROWS = 1 << 18  # host rows gathered before conversion (bounds the writer's memory)
_ENGINE_HEADER = ("version", "run_seed", "block_size", "walk", "M", "event_shape")


def resolve_device(pool_device: str, gpus_per_actor: float) -> torch.device:
    """``auto`` -> cuda when a GPU share was asked for and CUDA is visible, else cpu."""
    if pool_device == "auto":
        return torch.device("cuda" if gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
    if pool_device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"pool.device={pool_device!r} but CUDA is not available on this worker")
    return torch.device(pool_device)


class _Writer(threading.Thread):
    """Consumes ('jumps' | 'div' | 'ckpt', ...) items in order; owns the block writers.

    The first exception stops all further work (items are still taken off the queue so the
    producer never blocks forever) and is re-raised in the engine thread by ``check()``/``drain()``.
    """

    def __init__(self, actor: "ChainActor", queue_size: int):
        super().__init__(daemon=True, name="mmgm-writer")
        self.actor = actor
        self.q: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self.error: Optional[BaseException] = None
        self.wait_s = 0.0  # time the engine thread spent blocked on a full queue

    def put(self, item: tuple) -> None:
        self.check()
        t = time.perf_counter()
        self.q.put(item)
        self.wait_s += time.perf_counter() - t

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"sample writer failed: {type(self.error).__name__}: {self.error}") from self.error

    def drain(self) -> None:
        """Block until every queued item is handled; re-raise a writer error."""
        self.q.join()
        self.check()

    def run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    self.actor._handle(item)
            except BaseException as e:  # noqa: BLE001 - reported to the engine thread
                self.error = e
            finally:
                self.q.task_done()


class ChainActor:
    """Runs the chains of ``block_ids`` and writes their jumps to the run's sample store.

    Args:
        cfg: the resolved run config (a ``RunConfig`` or its dict).
        store_root, run_id: where the run lives (``{store_root}/{run_id}``; local path or URL).
        block_ids: this actor's blocks, in batch order (its layout; never change it within a run).
        storage_options: fsspec options for the store (endpoint, credentials); never ``memory://``
            across processes.
        hooks: test / benchmark knobs: ``step_sleep`` (seconds slept per step, to make kills land
            mid-chunk), ``store`` (False: run the chains without writing anything, for the bench).

    The constructor restores from the blocks' latest checkpoints, so Ray's ``max_restarts`` (which
    reruns ``__init__``) resumes exactly where the blocks were last committed.
    """

    def __init__(self, cfg: RunConfig | dict, store_root: str, run_id: str, block_ids: Sequence[int],
                 storage_options: Optional[dict] = None, hooks: Optional[dict] = None):
        from mmgm_ray.factory import load_sampling_model
        from mmgm_ray.store import SampleStore

        self.cfg = cfg if isinstance(cfg, RunConfig) else from_dict(RunConfig, cfg)
        pool = self.cfg.pool
        self.hooks = dict(hooks or {})
        self.block_ids = [int(b) for b in block_ids]
        self.num_steps = int(pool.num_steps)
        self.checkpoint_every = int(pool.checkpoint_every)
        if pool.cpus_per_actor >= 1:
            # one intra-op thread per CPU the actor was given: actors must not oversubscribe cores
            torch.set_num_threads(max(1, int(pool.cpus_per_actor)))
        self.device = resolve_device(pool.device, pool.gpus_per_actor)
        self.model, self.event_shape, self.model_hash = load_sampling_model(self.cfg, self.device)
        self.engine = WalkJumpEngine(self.model, self.cfg.sampler, self.event_shape, self.cfg.seed,
                                     self.block_ids, self.device, num_chains=pool.num_chains)
        self.bs = self.cfg.sampler.block_size
        self.write = bool(self.hooks.get("store", True))
        self.store = (SampleStore(store_root, run_id, event_shape=self.event_shape, config=self.cfg.store,
                                  storage_options=storage_options, check_writable=False)
                      if self.write else None)
        self.writers = {b: self.store.writer(b) for b in self.block_ids} if self.write else {}
        self._prev: dict[int, tuple[dict, dict, int]] = {}  # block -> (tensors, writer state, step)
        self._pending: list[JumpBatch] = []                   # host jump batches not yet handed to writers
        self._pending_rows = 0
        self.entries: dict[int, dict] = {}                    # block -> committed manifest entry
        self.new_divergences: list[dict] = []
        self.start_step = self._restore()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one advance() at a time even with max_concurrency > 1
        self.compute_s = 0.0
        self.cpu_s = 0.0
        self.restarted = self._was_reconstructed()
        self.writer = _Writer(self, pool.queue_size)
        self.writer.start()

    # ---- restore ---------------------------------------------------------------------------------

    @staticmethod
    def _was_reconstructed() -> bool:
        import warnings
        try:
            import ray
            with warnings.catch_warnings():  # the property reads a deprecated field internally
                warnings.simplefilter("ignore")
                return bool(ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:  # not inside a Ray actor
            return False

    def _init_data(self) -> Optional[torch.Tensor]:
        if self.cfg.sampler.init != "data":
            return None
        from mmgm_ray.data import load_dataset
        return load_dataset(self.cfg.data).x

    def _remove_stale_checkpoint_temps(self) -> None:
        # a process killed while saving a block checkpoint leaves its hidden temp file behind
        # (the writer's restore cleans the sample folders, not the checkpoint folders)
        import posixpath

        from mmgm_ray.store import fsutil
        for b in self.block_ids:
            folder = posixpath.dirname(self.store.checkpoint_path(b))
            for name in fsutil.list_names(self.store.fs, folder):
                if name.startswith(".") and name.endswith(".tmp"):
                    try:
                        self.store.fs.rm(posixpath.join(folder, name))
                    except FileNotFoundError:
                        pass

    def _restore(self) -> int:
        """Bring engine and writers to the oldest step every block has committed; return it."""
        if not self.write:
            self.engine.initialize(self._init_data())
            return 0
        cks = {b: self.writers[b].resume() for b in self.block_ids}
        self._remove_stale_checkpoint_temps()
        steps = {b: (int(ck[1]["step"]) if ck is not None else 0) for b, ck in cks.items()}
        for b, ck in cks.items():
            if ck is not None and list(ck[1].get("layout", self.block_ids)) != self.block_ids:
                raise ValueError(f"block {b} was checkpointed by an actor holding blocks {ck[1]['layout']}, "
                                 f"this actor holds {self.block_ids}: resume with the run's recorded layout")
        m = min(steps.values())
        source: dict[int, Optional[dict]] = {}
        for b, ck in cks.items():
            if ck is None:
                source[b] = None
                continue
            tensors, meta = ck
            if steps[b] == m:
                source[b] = {k: tensors[k] for k in ("y", "v", "alive")}
                continue
            # this block got one checkpoint further before the crash: roll it back to step m
            if int(meta.get("prev_step", -1)) != m:
                raise RuntimeError(f"block {b} is at step {steps[b]} (previous {meta.get('prev_step')}), other "
                                   f"blocks of the actor at {m}: checkpoints are inconsistent")
            self.writers[b].restore(meta["prev_writer"])
            source[b] = ({k: tensors["prev_" + k] for k in ("y", "v", "alive")} if m > 0 else None)
        if m == 0:
            self.engine.initialize(self._init_data())
        else:
            meta0 = next(ck[1] for ck in cks.values() if ck is not None)
            sd = {**meta0["engine"], "step": m, "block_ids": self.block_ids}
            for k in ("y", "v", "alive"):
                sd[k] = torch.cat([source[b][k] for b in self.block_ids])
            self.engine.load_state_dict(sd)
        for b in self.block_ids:
            sd_b = self.engine.state_dict([b])
            self._prev[b] = ({k: sd_b[k] for k in ("y", "v", "alive")}, self.writers[b].state(), m)
            self.entries[b] = self.writers[b].manifest_entry("done" if m >= self.num_steps else "running")
        return m

    # ---- writer-thread side ------------------------------------------------------------------------

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "jumps":
            _, jb, event = item
            if event is not None:
                event.synchronize()  # the non_blocking device-to-host copy has landed
            # batches are gathered and converted once per block per interval: Arrow conversion per
            # (block, jump) costs more CPU than the oracle's walk steps
            self._pending.append(jb)
            self._pending_rows += len(jb)
            if self._pending_rows >= _GATHER_ROWS:
                self._flush_pending()
            return
        self._flush_pending()  # keeps every block's rows in engine order
        if kind == "div":
            _, events = item
            by_block: dict[int, list] = {}
            for e in events:
                by_block.setdefault(int(e.block_id), []).append(e)
            for b, evs in by_block.items():
                self.writers[b].add_divergences(evs)
        elif kind == "ckpt":
            _, step, states, status = item
            self._checkpoint(step, states, status)
        else:
            raise ValueError(f"unknown writer item {kind!r}")

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        many = len(self._pending) > 1
        jb = JumpBatch.cat(self._pending) if many else self._pending[0]
        self._pending, self._pending_rows = [], 0
        if many:
            # stable: within a block the rows stay in (step, chain) order
            order = torch.argsort(jb.block_id, stable=True)
            jb = JumpBatch(*(t[order] for t in jb))
        self._write_jumps(jb)

    def _write_jumps(self, jb: JumpBatch) -> None:
        # rows are grouped by block, so each block's rows are one contiguous run
        blocks = jb.block_id.numpy()
        cuts = [0, *(np.flatnonzero(np.diff(blocks)) + 1).tolist(), len(blocks)]
        for s, e in zip(cuts[:-1], cuts[1:]):
            self.writers[int(blocks[s])].add(JumpBatch(*(t[s:e] for t in jb)))

    def _checkpoint(self, step: int, states: dict[int, dict], status: str) -> None:
        for b in self.block_ids:
            prev_t, prev_w, prev_step = self._prev[b]
            cur = states[b]
            tensors = {**cur, **{"prev_" + k: v for k, v in prev_t.items()}}
            meta = {"step": step, "prev_step": prev_step, "prev_writer": prev_w, "status": status,
                    "layout": self.block_ids, "engine": self._engine_header}
            st = self.writers[b].checkpoint(tensors, meta)   # flush + ONE atomic file
            self._prev[b] = (cur, st, step)
            self.entries[b] = self.writers[b].manifest_entry(status)

    # ---- engine-thread side ------------------------------------------------------------------------

    def _to_host(self, jb: JumpBatch):
        if self.device.type != "cuda":
            return jb, None
        host = JumpBatch(*(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                           for t in jb))
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _submit_checkpoint(self, status: str) -> None:
        sd = self.engine.state_dict()
        self._engine_header = {k: sd[k] for k in _ENGINE_HEADER}
        states, n = {}, self.bs
        for i, b in enumerate(self.block_ids):
            states[b] = {k: sd[k][i * n:(i + 1) * n].clone() for k in ("y", "v", "alive")}
        self.writer.put(("ckpt", self.engine.step, states, status))

    def _drain_divergences(self) -> None:
        evs = self.engine.divergences      # the engine's own list; emptied here
        if not evs:
            return
        events = list(evs)
        evs.clear()
        self.new_divergences += [ev._asdict() for ev in events]
        if self.write:
            self.writer.put(("div", events))

    def _is_boundary(self, step: int, target: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.num_steps or step == target

    def request_stop(self) -> bool:
        """Ask a running ``advance`` to return at its next checkpoint (Ctrl-C of the driver)."""
        self._stop.set()
        return True

    def advance(self, chunk_steps: int) -> dict:
        """Run to the next multiple of ``chunk_steps`` (or ``num_steps``), checkpointing every
        ``checkpoint_every`` steps and at the end; return progress and committed manifest entries.

        The last checkpoint of a chunk is committed in the background (the device keeps going);
        when the run is done or a stop was requested, the call returns only after it is committed.

        Idempotent under Ray task retries: a restarted actor restored from a checkpoint inside the
        chunk runs to the same target. Returns early (after a checkpoint) once ``request_stop``.
        """
        with self._lock:
            return self._advance(int(chunk_steps))

    def _advance(self, chunk: int) -> dict:
        e = self.engine
        start = e.step
        target = min((e.step // chunk + 1) * chunk, self.num_steps)
        sleep = float(self.hooks.get("step_sleep", 0.0))
        t0, c0 = time.perf_counter(), time.process_time()
        while e.step < target and not self._stop.is_set():
            while e.step < target:
                jb = e.step_once()
                boundary = self._is_boundary(e.step, target)
                if jb is not None or boundary:
                    # only where the engine syncs with the host anyway (jump steps) or before a
                    # checkpoint: the events then land at the same place in the rows in every run
                    self._drain_divergences()
                if jb is not None and len(jb) and self.write:
                    self.writer.put(("jumps", *self._to_host(jb)))
                if sleep:
                    time.sleep(sleep)
                if boundary:
                    break
            if self.write:
                self._submit_checkpoint("done" if e.step >= self.num_steps else "running")
        if self.write:
            if e.step >= self.num_steps or self._stop.is_set():
                self.writer.drain()   # everything up to the last checkpoint is committed
            else:
                # the writer commits this chunk's checkpoint while the next chunk computes; the
                # entries returned are those committed so far (at most one checkpoint behind)
                self.writer.check()
        self.compute_s += time.perf_counter() - t0
        self.cpu_s += time.process_time() - c0   # whole process: engine + writer thread
        divs, self.new_divergences = self.new_divergences, []
        return {"pid": os.getpid(), "block_ids": self.block_ids, "step": e.step, "start_step": start,
                "chains": e.n_chains, "chain_steps": e.n_chains * (e.step - start),
                "chain_steps_total": e.n_chains * (e.step - self.start_step),
                "done": e.step >= self.num_steps, "stopped": self._stop.is_set(),
                "restarted": self.restarted, "restored_step": self.start_step,
                "blocks": {int(b): dict(v) for b, v in self.entries.items()},
                "divergence_events": divs, "queue_wait_s": self.writer.wait_s, "busy_s": self.compute_s,
                "cpu_s": self.cpu_s}

    def commit(self) -> dict:
        """Wait until every submitted checkpoint is written; return the committed block entries."""
        with self._lock:
            if self.write:
                self.writer.drain()
            return {"step": self.engine.step, "blocks": {int(b): dict(v) for b, v in self.entries.items()}}

    def status(self) -> dict:
        """Current step and layout (cheap; for the controller and tests)."""
        return {"pid": os.getpid(), "step": self.engine.step, "block_ids": self.block_ids,
                "restored_step": self.start_step, "restarted": self.restarted}

    def close(self) -> None:
        """Stop the writer thread (after draining it)."""
        self.writer.drain()
        self.writer.q.put(None)
        self.writer.join(timeout=30)


def remote_class():
    """``ray.remote(ChainActor)`` (built lazily so importing this module does not import Ray)."""
    import ray
    return ray.remote(ChainActor)
