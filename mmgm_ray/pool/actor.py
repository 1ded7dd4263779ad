"""The chain actor: many chain blocks in one ``WalkJumpEngine`` batch, a background writer, block
checkpoints (THEORY sections 4-5; exactly-once contract in ``mmgm_ray.store.store``).

``ChainActor`` is a plain class (usable in-process, e.g. by tests and the benchmark);
``RemoteChainActor`` is its Ray version. One actor holds a fixed list of blocks (its *layout*) for
the whole run: the same blocks in the same batch order give bitwise the same draws AND the same
floating-point round-off, so a restarted or replacement actor must get the same list.

Two threads, one direction of data:

    engine thread: engine.step_once() -> Jumps / Divergences / Checkpoint messages
        -> bounded queue.Queue(queue_size) (back-pressure) ->
    writer thread: BlockSink (the block writers: gather, split per block, Parquet, checkpoints)

The engine thread only talks to the engine through ``step_once``, ``drain_divergences`` and
``state_dict([block])``; the sink is touched by the writer thread only, once the actor runs, and
publishes what it has committed through ``committed()`` (under a lock). On CUDA the jumps are
copied into pinned host buffers with ``non_blocking=True`` and an event recorded on the stream the
copies were queued on (the current stream of the jumps' device); the writer waits on the event, so
the copy overlaps with the next steps.

At start the actor sets its numerics flags (``sampler.allow_tf32``, deterministic cuDNN without
autotuning), describes its hardware (``mmgm_ray.hardware``), refuses to continue a run recorded on
another device class unless allowed, and plans its memory (``mmgm_ray.planner``: the micro-batch
of the network calls and the writer's gather rows), printing the plan on stderr; both records
come back with every ``advance`` result for the driver to put in the manifest.

Block checkpoints hold the engine state at the latest checkpoint step t AND at the previous one
(t - k): the sink writes its blocks' checkpoints one by one, so a crash in the middle of that loop
leaves some blocks at t and the others at t - k. On restart every block is rolled back to the
oldest common step (the writer restores the matching older writer state, deleting the newer parts,
which are rewritten with identical bytes). The same roll-back re-creates a committed part that is
missing or damaged on storage (``BlockWriter.damaged``: size, CRC-32 on request) when it was written
after the previous checkpoint; an older damaged part raises ``DamagedPartError`` naming it.

Every checkpoint also carries the run's resolved config, model hash and event shape (``meta["run"]``),
so a run whose manifest was lost can be rebuilt from its checkpoints alone (``store.rebuild_manifest``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import queue
import socket
import sys
import threading
import time
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np
import ray
import torch

from mmgm_ray import fastpath, faults
from mmgm_ray.config import PoolConfig, RunConfig, from_dict, to_dict
from mmgm_ray.data import load_dataset
from mmgm_ray.engine import WalkJumpEngine
from mmgm_ray.factory import load_sampling_model
from mmgm_ray.hardware import Precision, apply_precision, check_device_class, describe
from mmgm_ray.jumps import DivergenceEvent, JumpBatch
from mmgm_ray.planner import (MAX_GATHER_ROWS, MemoryPlan, available_host_memory, free_device_memory,
                              measure_score_bytes, module_bytes, plan_memory)
from mmgm_ray.store import SampleStore, acquire_lease
from mmgm_ray.store.store import DamagedPartError


def resolve_device(pool: PoolConfig) -> torch.device:
    """The actor's device (``PoolConfig.device_type``; Ray shows a reserved GPU as cuda:0).

    A reserved GPU that CUDA cannot see is a ValueError: a GPU actor never falls back to the CPU.
    """
    want = pool.device_type()
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"pool.device={pool.device!r} with pool.gpus_per_actor={pool.gpus_per_actor} but CUDA "
                         f"is not available on this worker")
    return torch.device(want)


# ---- messages from the engine thread to the writer thread -----------------------------------------

class Jumps(NamedTuple):
    """Jumps of one engine step, on the host (or being copied there until ``copied`` fires)."""
    batch: JumpBatch
    copied: Optional[torch.cuda.Event]


class Divergences(NamedTuple):
    """Chains that diverged since the previous message, in detection order."""
    events: list[DivergenceEvent]


class Checkpoint(NamedTuple):
    """Commit point: every row up to ``step`` is in the queue before this message."""
    states: dict[int, dict]   # block -> engine.state_dict([block]) at ``step`` (CPU)
    step: int
    status: str               # "running" | "done"


def pinned_buffer(t: torch.Tensor) -> torch.Tensor:
    """A page-locked host tensor shaped like ``t``: a non_blocking copy into it runs asynchronously."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)


def copy_to_pinned(jb: JumpBatch) -> Jumps:
    """Queue the device-to-host copies of ``jb`` into pinned buffers; ``copied`` fires once they landed.

    A device-to-host copy runs on the current stream of the SOURCE tensor's device (whatever the
    current device is), so the event is recorded on that stream.
    """
    host = JumpBatch(*(pinned_buffer(t).copy_(t, non_blocking=True) for t in jb))
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(jb.xhat.device))
    return Jumps(host, event)


def _split(sd: dict, prefix: str) -> tuple[dict, dict]:
    """Tensors (renamed ``prefix + key``) and JSON fields of a state dict: checkpoints keep them apart."""
    tensors = {prefix + k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}


def _join(tensors: dict, fields: dict, prefix: str) -> dict:
    return {**fields, **{k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}}


class BlockSink:
    """The writer-thread side of an actor: its blocks' writers, rows gathered before conversion,
    and the previous checkpoint of every block (for the roll-back described in the module doc)."""

    def __init__(self, store: SampleStore, block_ids: Sequence[int], gather_rows: int = MAX_GATHER_ROWS,
                 run_meta: Optional[dict] = None, checksums: bool = False):
        self.block_ids = list(block_ids)
        self.gather_rows = int(gather_rows)   # host rows gathered before conversion (the memory plan)
        self.run_meta = dict(run_meta or {})   # config, model hash, event shape: recorded in every checkpoint
        self.checksums = checksums
        self.repaired: dict[str, str] = {}     # part -> what was wrong, re-created by rolling back
        self.writers = {b: store.writer(b) for b in self.block_ids}
        for b, w in self.writers.items():
            # a new epoch per (re)start: a writer of an older epoch that still runs is fenced off
            w.fence(acquire_lease(store, b, holder=f"{socket.gethostname()}:{os.getpid()}"))
        self._pending: list[JumpBatch] = []
        self._pending_rows = 0
        self._prev: dict[int, tuple[dict, dict]] = {}   # block -> (engine state dict, writer state)
        self._entries: dict[int, dict] = {}             # block -> committed manifest entry
        self._lock = threading.Lock()

    # ---- before the writer thread starts ---------------------------------------------------------

    def resume(self) -> tuple[int, Optional[list[dict]]]:
        """Bring every writer to the latest step that all blocks can restore intact; return that step
        and the blocks' engine states there (None for step 0: the chains start afresh).

        Each block offers its latest checkpoint and the previous one (both in the same file); a
        block whose latest state lists a missing or damaged part offers only the previous one."""
        options = {b: self._restorable(b) for b in self.block_ids}
        m = min(max(o) for o in options.values())
        states = []
        for b in self.block_ids:
            if m not in options[b]:
                raise RuntimeError(f"block {b} can restore steps {sorted(options[b])}, the other blocks of the "
                                   f"actor step {m}: checkpoints are inconsistent")
            writer_state, engine, tensors, prefix = options[b][m]
            self.writers[b].restore(writer_state)   # verified above; deletes the parts written after it
            if engine is not None:
                states.append(_join(tensors, engine, prefix))
        return m, (states if m > 0 else None)

    def _restorable(self, b: int) -> dict[int, tuple]:
        """{step: (writer state, engine fields, tensors, tensor prefix)} block ``b`` can restore."""
        w = self.writers[b]
        ck = w.load()
        if ck is None:   # a fresh block: then every block of the actor starts afresh
            return {0: (w.initial_state(), None, None, None)}
        tensors, meta = ck
        if list(meta["layout"]) != self.block_ids:
            raise ValueError(f"block {b} was checkpointed by an actor holding blocks {meta['layout']}, "
                             f"this actor holds {self.block_ids}: resume with the run's recorded layout")
        prev = meta["prev_writer"]
        bad = w.damaged(meta["writer"], checksums=self.checksums)
        lost = {f: why for f, why in bad.items() if f in prev["files"]}
        if lost:
            raise DamagedPartError(w.store.url, b, lost)
        self.repaired.update(bad)
        out = {int(meta["prev_engine"]["step"]): (prev, meta["prev_engine"], tensors, "prev.")}
        if not bad:
            out[int(meta["engine"]["step"])] = (meta["writer"], meta["engine"], tensors, "cur.")
        return out

    def remember(self, states: dict[int, dict], status: str) -> None:
        """Record the restored (or initial) state of every block as its previous checkpoint."""
        for b in self.block_ids:
            self._prev[b] = (states[b], self.writers[b].state())
            self._publish(b, status)

    # ---- on the writer thread ---------------------------------------------------------------------

    def handle(self, msg) -> None:
        if isinstance(msg, Jumps):
            self._gather(msg)
            return
        self._flush_pending()  # keeps every block's rows in engine order
        if isinstance(msg, Divergences):
            self._divergences(msg.events)
        elif isinstance(msg, Checkpoint):
            self._checkpoint(msg)
        else:
            raise TypeError(f"unknown writer message {type(msg).__name__}")

    def committed(self) -> dict[int, dict]:
        """The manifest entry of every block as last committed (any thread)."""
        with self._lock:
            return {b: dict(e) for b, e in self._entries.items()}

    def _publish(self, b: int, status: str) -> None:
        entry = self.writers[b].manifest_entry(status)
        with self._lock:
            self._entries[b] = entry

    def _gather(self, msg: Jumps) -> None:
        if msg.copied is not None:
            msg.copied.synchronize()  # the non_blocking device-to-host copy has landed
        # batches are gathered and converted once per block per interval: Arrow conversion per
        # (block, jump) costs more CPU than a cheap oracle's walk steps
        self._pending.append(msg.batch)
        self._pending_rows += len(msg.batch)
        if self._pending_rows >= self.gather_rows:
            self._flush_pending()

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        batches, self._pending, self._pending_rows = self._pending, [], 0
        jb = JumpBatch.cat(batches) if len(batches) > 1 else batches[0]
        steps = _same_rows_every_step(batches)
        if steps is not None:
            # every step's batch holds the same chains, each block in one run: a block's rows are
            # one column of the (step, chain) grid, already in (step, chain) order; no sort needed
            grid = JumpBatch(*(t.reshape(len(batches), -1, *t.shape[1:]) for t in jb))
            for b, s, e in steps:
                self.writers[b].add(JumpBatch(*(t[:, s:e].reshape(-1, *t.shape[2:]) for t in grid)))
            return
        # stable: within a block the rows stay in (step, chain) order
        order = torch.argsort(jb.block_id, stable=True)
        jb = JumpBatch(*(t[order] for t in jb))
        for b, s, e in _runs(jb.block_id):
            self.writers[b].add(JumpBatch(*(t[s:e] for t in jb)))

    def _divergences(self, events: list[DivergenceEvent]) -> None:
        for b in sorted({int(e.block_id) for e in events}):
            self.writers[b].add_divergences([e for e in events if int(e.block_id) == b])

    def _checkpoint(self, msg: Checkpoint) -> None:
        for b in self.block_ids:
            prev_sd, prev_writer = self._prev[b]
            cur_t, cur_f = _split(msg.states[b], "cur.")
            prev_t, prev_f = _split(prev_sd, "prev.")
            meta = {"engine": cur_f, "prev_engine": prev_f, "prev_writer": prev_writer,
                    "status": msg.status, "layout": self.block_ids, "run": self.run_meta}
            # flush + ONE atomic file; refused (FencedError) once a newer actor holds the block
            writer_state = self.writers[b].checkpoint({**cur_t, **prev_t}, meta, step=msg.step)
            self._prev[b] = (msg.states[b], writer_state)
            self._publish(b, msg.status)


def _runs(block_id: torch.Tensor) -> list[tuple[int, int, int]]:
    """(block, start, end) of each run of equal block ids."""
    ids = block_id.numpy()
    cuts = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), len(ids)]
    return [(int(ids[s]), s, e) for s, e in zip(cuts[:-1], cuts[1:])]


def _same_rows_every_step(batches: list[JumpBatch]) -> Optional[list[tuple[int, int, int]]]:
    """The block runs shared by every batch (one engine step each), when every batch holds the same
    block ids in the same order with each block in one run (no chain died in between); else None."""
    first = batches[0].block_id
    if any(len(b) != len(first) or not torch.equal(b.block_id, first) for b in batches[1:]):
        return None
    runs = _runs(first)
    return runs if len({b for b, _, _ in runs}) == len(runs) else None


class NullSink:
    """A sink that keeps nothing (the benchmark's pool-without-store baseline, ``faults.skip_store``)."""

    def resume(self) -> tuple[int, None]:
        return 0, None

    def remember(self, states: dict[int, dict], status: str) -> None:
        pass

    def handle(self, msg) -> None:
        if isinstance(msg, Jumps) and msg.copied is not None:
            msg.copied.synchronize()

    def committed(self) -> dict[int, dict]:
        return {}


class _WriterThread(threading.Thread):
    """Hands queued messages to the sink in order.

    The first exception stops all further work (messages are still taken off the queue so the
    engine thread never blocks forever) and is re-raised in the engine thread by ``check`` / ``drain``.
    """

    def __init__(self, sink, queue_size: int):
        super().__init__(daemon=True, name="mmgm-writer")
        self.sink = sink
        self.q: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self.error: Optional[BaseException] = None
        self.wait_s = 0.0  # time the engine thread spent blocked on a full queue

    def put(self, msg) -> None:
        self.check()
        t = time.perf_counter()
        self.q.put(msg)
        self.wait_s += time.perf_counter() - t

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"sample writer failed: {type(self.error).__name__}: {self.error}") from self.error

    def drain(self) -> None:
        """Block until every queued message is handled; re-raise a writer error."""
        self.q.join()
        self.check()

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the thread after the queued messages (errors are not re-raised here)."""
        self.q.put(None)
        self.join(timeout=timeout_s)

    def run(self) -> None:
        while True:
            msg = self.q.get()
            try:
                if msg is None:
                    return
                if self.error is None:
                    self.sink.handle(msg)
            except BaseException as e:  # noqa: BLE001 - reported to the engine thread
                self.error = e
            finally:
                self.q.task_done()


def _was_reconstructed() -> bool:
    """True in an actor process that Ray restarted (``max_restarts``)."""
    if not ray.is_initialized():
        return False
    ctx = ray.get_runtime_context()
    if ctx.get_actor_id() is None:  # an in-process ChainActor (tests, benchmarks)
        return False
    with warnings.catch_warnings():  # the property reads a deprecated field internally
        warnings.simplefilter("ignore")
        return bool(ctx.was_current_actor_reconstructed)


class ChainActor:
    """Runs the chains of ``block_ids`` and writes their jumps to the run's sample store.

    Args:
        cfg: the resolved run config (a ``RunConfig`` or its dict).
        store_root, run_id: where the run lives (``{store_root}/{run_id}``; local path or URL).
        block_ids: this actor's blocks, in batch order (its layout; never change it within a run).
        storage_options: fsspec options for the store (endpoint, credentials); never ``memory://``
            across processes.
        recorded_hardware: the hardware the run recorded (manifest ``hardware``; None for a new run).
        allow_device_change: continue a run recorded on another device class (else
            ``hardware.DeviceChangeError``, raised before the store is touched).
        credentials_env: environment variables (credentials) set in this process before the store is
            opened; only when the user opted in to forwarding them.

    The constructor restores from the blocks' latest checkpoints, so Ray's ``max_restarts`` (which
    reruns ``__init__``) resumes exactly where the blocks were last committed, with the fast-path
    options recorded there (``mmgm_ray.fastpath``: they decide the round-off); a fresh start
    resolves them (``sampler.fast``: without timing by default) and records them with the first checkpoint.
    """

    def __init__(self, cfg: RunConfig | dict, store_root: str, run_id: str, block_ids: Sequence[int],
                 storage_options: Optional[dict] = None, *, recorded_hardware: Optional[dict] = None,
                 allow_device_change: bool = False, credentials_env: Optional[dict] = None):
        # credentials the user chose to forward (run_pool(forward_credentials=True)): an argument of
        # this constructor, never the runtime env, which `ray list actors --detail` shows in clear
        os.environ.update(credentials_env or {})
        self.cfg = cfg if isinstance(cfg, RunConfig) else from_dict(RunConfig, cfg)
        pool = self.cfg.pool
        self.block_ids = [int(b) for b in block_ids]
        self.num_steps = int(pool.num_steps)
        self.checkpoint_every = int(pool.checkpoint_every)
        if pool.cpus_per_actor >= 1:
            # one intra-op thread per CPU the actor was given: actors must not oversubscribe cores
            torch.set_num_threads(max(1, int(pool.cpus_per_actor)))
        self.device = resolve_device(pool)
        apply_precision(Precision(allow_tf32=self.cfg.sampler.allow_tf32))
        self.hardware = describe(self.device)
        self.device_note = check_device_class(recorded_hardware, self.hardware, f"run {run_id!r}",
                                              allow_device_change)
        model, event_shape, self.model_hash = load_sampling_model(self.cfg, self.device)
        self.engine = WalkJumpEngine(model, self.cfg.sampler, event_shape, self.cfg.seed, self.block_ids,
                                     self.device, num_chains=pool.num_chains)
        self.memory_plan = self._plan_memory(model)
        print(f"[mmgm pool] blocks {self.block_ids[0]}..{self.block_ids[-1]} on {self.hardware['device_class']}: "
              f"{self.memory_plan.summary()}", file=sys.stderr, flush=True)
        run_meta = {"config": to_dict(self.cfg), "model_hash": self.model_hash, "event_shape": list(event_shape)}
        self.sink = NullSink() if faults.skip_store() else BlockSink(
            SampleStore(store_root, run_id, event_shape=event_shape, config=self.cfg.store,
                        storage_options=storage_options, check_writable=False), self.block_ids,
            gather_rows=self.memory_plan.gather_rows, run_meta=run_meta, checksums=pool.verify_checksums)
        step, states = self.sink.resume()
        self._use_fast_path(model, step, states)
        self.start_step = self._restore(step, states)
        self.min_interval_s = float(pool.checkpoint_min_interval_s)
        self._commit_step = self.start_step   # step of the latest checkpoint submitted (or restored)
        self._walk_s = 0.0                    # walk seconds since then
        self.restarted = _was_reconstructed()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one advance() at a time even with max_concurrency > 1
        self.compute_s = 0.0
        self.cpu_s = 0.0
        self.new_divergences: list[dict] = []
        self.writer = _WriterThread(self.sink, pool.queue_size)
        self.writer.start()

    def _plan_memory(self, model: torch.nn.Module) -> MemoryPlan:
        """Plan this actor's memory (``mmgm_ray.planner``) and set the engine's micro-batch from it
        (``pool.micro_batch`` when set; a restored checkpoint's micro-batch wins over both)."""
        pool, e = self.cfg.pool, self.engine
        chain_shape = e.event_shape if e.reduced else (e.M, *e.event_shape)
        probe_n = min(e.n_chains, e.bs if self.device.type == "cuda" else 4)
        probe = torch.zeros(probe_n, *chain_shape, device=self.device)
        score_fn = model.reduced_score if e.reduced else model.score
        cpu_share = min(1.0, max(pool.cpus_per_actor, 1.0) / (os.cpu_count() or 1))
        gpu = self.device.type == "cuda"
        plan = plan_memory(
            chains=e.n_chains, block_size=e.bs, state_numel=math.prod(chain_shape),
            event_numel=math.prod(e.event_shape), noise_draws=e.n_draws,
            score_bytes=measure_score_bytes(model, score_fn, probe), weights_bytes=module_bytes(model),
            device=self.device.type, device_free=free_device_memory(self.device), host_free=available_host_memory(),
            queue_size=pool.queue_size, jumps_per_checkpoint=-(-pool.checkpoint_every // self.cfg.sampler.jump_every),
            fraction=pool.memory_fraction,
            # a GPU actor plans with its share of the GPU; on a CPU the chains and the writer
            # split the actor's share of the host memory
            device_share=min(1.0, pool.gpus_per_actor) if gpu else cpu_share / 2,
            host_share=cpu_share if gpu else cpu_share / 2)
        micro = pool.micro_batch or plan.micro_batch
        if micro >= e.bs:
            micro -= micro % e.bs   # whole blocks: see WalkJumpEngine's micro_batch
        e.micro_batch = micro if micro < e.n_chains else None
        return plan

    def _use_fast_path(self, model: torch.nn.Module, step: int, states: Optional[list[dict]]) -> None:
        """Give the engine the fast-path options (``mmgm_ray.fastpath``) the blocks were computed with
        (a resume: their checkpoints' header; the engine adopts their micro-batch when it restores),
        else the options resolved for this device (``fast="on"``: the micro-batch measured within the
        memory plan's; otherwise the memory plan's)."""
        e = self.engine
        if states:
            e.use_fast(fastpath.FastOptions.from_dict(states[0].get("fast", {})))
            return
        shape = fastpath.chain_shape(model, self.cfg.sampler.walk, e.event_shape)
        fast = fastpath.resolve_options(self.cfg.sampler, model, self.device, shape, e.n_chains,
                                        e.n_chains * (self.num_steps - step), max_micro_batch=e.micro_batch,
                                        micro_batch=self.cfg.pool.micro_batch, same_thread=False)
        micro = fast.micro_batch or e.n_chains
        if micro >= e.bs:
            micro -= micro % e.bs   # whole blocks, as the memory plan cuts
        e.use_fast(dataclasses.replace(fast, micro_batch=micro if micro < e.n_chains else 0))

    def _restore(self, step: int, states: Optional[list[dict]]) -> int:
        """Bring the engine to the oldest step every block has committed (``sink.resume()``); return it."""
        if states is None:
            data = load_dataset(self.cfg.data).x if self.cfg.sampler.init == "data" else None
            self.engine.initialize(data)
        else:
            self.engine.load_state_dict(states)
        status = "done" if step >= self.num_steps else "running"
        self.sink.remember({b: self.engine.state_dict([b]) for b in self.block_ids}, status)
        return step

    # ---- engine thread ---------------------------------------------------------------------------

    def _to_host(self, jb: JumpBatch) -> Jumps:
        return copy_to_pinned(jb) if self.device.type == "cuda" else Jumps(jb, None)

    def _send_divergences(self) -> None:
        events = self.engine.drain_divergences()
        if events:
            self.new_divergences += [ev._asdict() for ev in events]
            self.writer.put(Divergences(events))

    def _is_boundary(self, step: int, target: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.num_steps or step == target

    def _walk_to_boundary(self, target: int) -> None:
        """Step until the next checkpoint boundary, sending jumps and divergences to the writer."""
        e = self.engine
        while e.step < target:
            jb = e.step_once()
            boundary = self._is_boundary(e.step, target)
            if jb is not None or boundary:
                # only where the engine syncs with the host anyway (jump steps) or before a
                # checkpoint: the events then land at the same place in the rows in every run
                self._send_divergences()
            if jb is not None and len(jb):
                self.writer.put(self._to_host(jb))
            faults.after_walk_step(e.step)
            if boundary:
                return

    def _commit_due(self) -> bool:
        """At a boundary: checkpoint now, or walk on (``pool.checkpoint_min_interval_s``)? Now at the
        end of the run, after a stop request, once the walk since the last checkpoint took the minimum
        interval, or once the writers hold as many intervals of uncommitted rows as the memory plan
        allows (``MemoryPlan.checkpoint_stretch``)."""
        e = self.engine
        if e.step >= self.num_steps or self._stop.is_set() or self._walk_s >= self.min_interval_s:
            return True
        intervals = -(-(e.step - self._commit_step) // self.checkpoint_every)
        return intervals >= self.memory_plan.checkpoint_stretch

    def _submit_checkpoint(self) -> None:
        status = "done" if self.engine.step >= self.num_steps else "running"
        states = {b: self.engine.state_dict([b]) for b in self.block_ids}
        self.writer.put(Checkpoint(states, self.engine.step, status))
        self._commit_step, self._walk_s = self.engine.step, 0.0

    # ---- remote methods --------------------------------------------------------------------------

    def request_stop(self) -> bool:
        """Ask a running ``advance`` to return at its next checkpoint (Ctrl-C of the driver)."""
        self._stop.set()
        return True

    def advance(self, chunk_steps: int) -> dict:
        """Run to the next multiple of ``chunk_steps`` (or ``num_steps``), checkpointing every
        ``checkpoint_every`` steps and at the end; return progress and committed manifest entries.
        A boundary reached within ``checkpoint_min_interval_s`` of walking is passed by (``_commit_due``);
        a chunk whose end is passed by runs on to the next multiple, so every call returns right
        after a checkpoint.

        The last checkpoint of a chunk is committed in the background (the device keeps going);
        when the run is done or a stop was requested, the call returns only after it is committed.

        Idempotent under Ray task retries: a restarted actor restored from a checkpoint inside the
        chunk runs to the same target. Returns early (after a checkpoint) once ``request_stop``.
        """
        with self._lock:
            e = self.engine
            start = e.step
            target = self._chunk_end(chunk_steps)
            t0, c0 = time.perf_counter(), time.process_time()
            while e.step < target and not self._stop.is_set():
                t = time.perf_counter()
                self._walk_to_boundary(target)
                self._walk_s += time.perf_counter() - t
                if self._commit_due():
                    self._submit_checkpoint()
                elif e.step == target:
                    target = self._chunk_end(chunk_steps)
            if e.step >= self.num_steps or self._stop.is_set():
                self.writer.drain()   # everything up to the last checkpoint is committed
            else:
                # the writer commits this chunk's checkpoint while the next chunk computes; the
                # entries returned are those committed so far (at most one checkpoint behind)
                self.writer.check()
            self.compute_s += time.perf_counter() - t0
            self.cpu_s += time.process_time() - c0   # whole process: engine + writer thread
            return self._progress(start)

    def _chunk_end(self, chunk_steps: int) -> int:
        return min((self.engine.step // int(chunk_steps) + 1) * int(chunk_steps), self.num_steps)

    def _progress(self, start: int) -> dict:
        e = self.engine
        divs, self.new_divergences = self.new_divergences, []
        return {"pid": os.getpid(), "block_ids": self.block_ids, "step": e.step, "start_step": start,
                "chains": e.n_chains, "chain_steps": e.n_chains * (e.step - start),
                "chain_steps_total": e.n_chains * (e.step - self.start_step),
                "done": e.step >= self.num_steps, "stopped": self._stop.is_set(),
                "restarted": self.restarted, "restored_step": self.start_step,
                "repaired": dict(getattr(self.sink, "repaired", {})), "blocks": self.sink.committed(),
                "divergence_events": divs, "queue_wait_s": self.writer.wait_s, "busy_s": self.compute_s,
                "cpu_s": self.cpu_s, "hardware": self.hardware, "memory_plan": self.memory_plan.as_dict(),
                "micro_batch": e.micro_batch, "device_note": self.device_note, "fast": e.fast.as_dict()}

    def commit(self) -> dict:
        """Wait until every submitted checkpoint is written; return the committed block entries."""
        with self._lock:
            self.writer.drain()
            return {"step": self.engine.step, "blocks": self.sink.committed()}

    def status(self) -> dict:
        """Current step and layout (cheap; for the driver and tests)."""
        return {"pid": os.getpid(), "step": self.engine.step, "block_ids": self.block_ids,
                "restored_step": self.start_step, "restarted": self.restarted,
                "device_class": self.hardware["device_class"], "micro_batch": self.engine.micro_batch}

    def close(self) -> None:
        """Stop the writer thread after the queued messages (a writer error is not re-raised here)."""
        self.writer.stop()


RemoteChainActor = ray.remote(ChainActor)
