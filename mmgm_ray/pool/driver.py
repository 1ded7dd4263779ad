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
  checkpoint, wait for them at most ``pool.stop_timeout_s`` in all (stop AND final commit), mark
  the run ``interrupted`` (resume with ``resume=True``); a second Ctrl-C stops waiting at once (the
  block checkpoints are consistent at any instant anyway);
* an actor that cannot start (its constructor raised) or a call that raised: one line naming the
  actor's blocks and the cause, a ValueError when the cause is bad input (``pool.device=cuda``
  without CUDA, a damaged part, no credentials), a RuntimeError otherwise (a full disk).

Before any actor exists the request is checked against the cluster (``mmgm_ray.preflight``:
refused at once when no cluster the autoscaler may build holds it, a bounded wait with progress
when it must scale), and after the actors are created the driver waits at most
``pool.scale_timeout_s`` for them to be placed, saying what is pending. Implausible requests (more
blocks than a manifest can list, a chain state larger than any node, a store larger than the local
disk) are refused before that.

The layout (which actor holds which blocks) is recorded in the manifest (``extra.layout``) and
reused on resume whatever ``pool.num_actors`` says then. So are the hardware every actor ran on
(``hardware``: ``mmgm_ray.hardware.describe`` per actor) and its memory plan (``memory_plans``): a
resume on another device class (CPU vs CUDA, another GPU model) is refused with one line unless
``allow_device_change``, since the rows would differ from an uninterrupted run; allowed changes are
listed in ``device_changes``.

A resume may change the settings that decide
where and how fast the chains run (``pool.device``, ``num_actors``, CPUs/GPUs per actor, restarts,
queue and chunk sizes, timeouts), never those that decide the draws (``RESUME_KEYS``). A run that
committed nothing (it failed or was stopped before its first checkpoint) starts afresh under its
name, with whatever config; one whose manifest was lost is rebuilt from its block checkpoints.

Credentials never travel in the actors' runtime environment (``ray list actors --detail`` shows it
in clear): the workers get them from the cluster (instance roles, mounted secrets, fsspec config),
from ``storage_options``, or, when the caller opts in (``forward_credentials``), as an argument of
the actor constructor.

Structure: :func:`open_sampling_run` makes the open-or-resume decision (every check before any file
is touched); :class:`PoolDriver` holds the run's actors, pending calls, committed entries,
divergences and stop state, with one method per event; :func:`run_pool` ties the two.
"""
from __future__ import annotations

import math
import os
import re
import shutil
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
from mmgm_ray.preflight import ResourceRequest, ensure_resources, wait_scheduled
from mmgm_ray.store import (SampleStore, checkpointed_blocks, create_run, fsutil, load_block_checkpoint,
                            load_manifest, manifest_from_checkpoints, sync_manifest_from_checkpoints,
                            update_manifest, write_manifest)

#: config sections that must be identical when a run is resumed (they decide every draw and row)
RESUME_KEYS = ("seed", "noise", "sampler", "oracle", "model_path", "store", "data")
RESUME_POOL_KEYS = ("num_chains",)
#: environment variables forwarded to the actors when the caller opts in (``forward_credentials``)
CREDENTIAL_ENV_PREFIXES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS")
#: blocks a run may have: the manifest and the driver keep one entry per block
MAX_BLOCKS = 1_000_000
#: bytes of a stored row besides its sample (ids, step, jump index, scalars), before compression
ROW_OVERHEAD_BYTES = 41
_DTYPE_BYTES = {"uint8": 1, "float16": 2, "float32": 4}


def _say(text: str) -> None:
    """A note or warning of the pool on stderr (stdout carries the result only)."""
    print(f"mmgm pool: {text}", file=sys.stderr, flush=True)


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
    repairs: Optional[dict] = None          # damaged parts the actors re-create (part -> what was wrong)


#: the exception line of a ValueError raised in an actor's constructor, in Ray's error text
_BAD_INPUT = re.compile(r"^(?:[\w.]+\.)?(DeviceChangeError|ValueError): (.+)$", re.MULTILINE)


@dataclass
class _Plan:
    """What ``open_sampling_run`` decided before touching anything."""
    cfg: RunConfig
    event_shape: tuple
    model_hash: str
    layout: list[list[int]]
    existing: Optional[dict]                # the manifest resumed (rebuilt when it was lost)
    replace: bool                           # an earlier attempt committed nothing: start afresh
    rebuilt: bool
    repairs: dict


def check_plausible(cfg: RunConfig, event_shape: tuple, done_fraction: float = 0.0) -> dict:
    """Refuse (ValueError naming the settings) what no cluster runs: more than ``MAX_BLOCKS`` blocks,
    a chain state per actor larger than the largest node's memory, more bytes to store than a local
    store's disk has free. Returns the estimate {blocks, rows, bytes} (bytes before compression)."""
    p, smp = cfg.pool, cfg.sampler
    blocks = -(-p.num_chains // smp.block_size)
    if blocks > MAX_BLOCKS:
        raise ValueError(f"pool.num_chains={p.num_chains} makes {blocks} blocks of sampler.block_size="
                         f"{smp.block_size}, more than the {MAX_BLOCKS} a run can track; lower pool.num_chains "
                         f"or raise sampler.block_size")
    d = math.prod(event_shape)
    per_actor = -(-blocks // max(1, min(p.num_actors, blocks))) * smp.block_size
    state_bytes = per_actor * (2 * cfg.noise.M + 4) * d * 4   # y, v (M x d each), jumps, scores: float32
    nodes = ray.nodes() if ray.is_initialized() else []
    node_mem = max((n.get("Resources", {}).get("memory", 0.0) for n in nodes if n.get("Alive")), default=0.0)
    if node_mem and state_bytes > node_mem:
        raise ValueError(f"{per_actor} chains per actor (pool.num_chains={p.num_chains}, pool.num_actors="
                         f"{p.num_actors}) need about {state_bytes / 2**30:.3g} GiB of chain state, more than the "
                         f"largest node's {node_mem / 2**30:.3g} GiB; lower pool.num_chains or add actors")
    rows = p.num_chains * (p.num_steps // smp.jump_every)
    total = rows * (d * _DTYPE_BYTES[cfg.store.sample_dtype] + ROW_OVERHEAD_BYTES)
    need = total * max(0.0, 1.0 - done_fraction)
    free = _local_free_bytes(cfg.output)
    if free is not None and need > free:
        raise ValueError(f"run {cfg.run_dir} would store {rows} rows, about {need / 2**30:.3g} GiB before compression "
                         f"(pool.num_chains={p.num_chains} x pool.num_steps={p.num_steps} / sampler.jump_every="
                         f"{smp.jump_every}), but its disk has {free / 2**30:.3g} GiB free")
    return {"blocks": blocks, "rows": rows, "bytes": total}


def _local_free_bytes(output: str) -> Optional[int]:
    """Free bytes of the local disk that holds ``output`` (None for remote stores)."""
    if "://" in str(output) and not str(output).startswith("file://"):
        return None
    path = os.path.abspath(str(output).removeprefix("file://"))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _committed_fraction(existing: Optional[dict], cfg: RunConfig) -> float:
    rows = int(((existing or {}).get("progress") or {}).get("rows") or 0)
    want = cfg.pool.num_chains * (cfg.pool.num_steps // cfg.sampler.jump_every)
    return min(1.0, rows / want) if want else 1.0


def _existing_run(cfg: RunConfig, resume: bool, storage_options: Optional[dict],
                  locator: SampleStore) -> tuple[Optional[dict], bool, bool]:
    """(manifest to resume, replace an attempt that committed nothing, manifest rebuilt)."""
    existing = load_manifest(cfg.run_dir, storage_options)
    committed = bool(checkpointed_blocks(locator))
    if existing is not None and not committed and (resume or existing.get("status") in ("failed", "interrupted")):
        _say(f"run {cfg.run_dir} ({existing.get('status')}) committed nothing: starting it afresh")
        return None, True, False
    if existing is not None and not resume:
        raise ValueError(f"run {cfg.run_dir} already exists; resume it (--resume / resume=True) or pick a new name")
    if existing is None and committed:
        if not resume:
            raise ValueError(f"{cfg.run_dir} has block checkpoints but no manifest.json: resume it (--resume) to "
                             f"rebuild the manifest from them, or pick a new name")
        existing = manifest_from_checkpoints(cfg.run_dir, storage_options)
        n_blocks = -(-cfg.pool.num_chains // cfg.sampler.block_size)
        existing["extra"]["layout"] = _complete_layout(existing["extra"]["layout"], n_blocks)
        _say(f"{cfg.run_dir}/manifest.json is missing: rebuilt from the block checkpoints")
        return existing, False, True
    if existing is None and resume:
        raise ValueError(f"cannot resume {cfg.run_dir}: there is no run manifest there")
    return existing, False, False


def _complete_layout(groups: list[list[int]], n_blocks: int) -> list[list[int]]:
    """The layout ``split_layout`` made that holds every recorded group (actors that never committed
    left no checkpoint to tell their blocks); the groups themselves when none does."""
    for k in range(1, n_blocks + 1):
        candidate = split_layout(n_blocks, k)
        if all(g in candidate for g in groups):
            return candidate
    return groups


def _repairs(locator: SampleStore, blocks: list[int], checksums: bool) -> dict:
    """{part: what is wrong} of the committed parts the actors can re-create (written after their
    block's previous checkpoint); ValueError naming a damaged part they cannot re-create."""
    out = {}
    for b in checkpointed_blocks(locator):
        if b not in blocks:
            continue
        meta = load_block_checkpoint(locator, b)[1]
        bad = locator.writer(b).damaged(meta["writer"], checksums=checksums)
        prev = set((meta.get("prev_writer") or {}).get("files", []))
        lost = sorted(f for f in bad if f in prev)
        if lost:
            raise ValueError(f"cannot resume {locator.url}: committed part {locator.url}/{lost[0]} is {bad[lost[0]]} "
                             f"({len(lost)} such part(s) in block {b}) and was written before the block's previous "
                             f"checkpoint, so its checkpoints cannot re-create it; no file was touched. To re-create "
                             f"it, rerun the blocks of its actor from step 0: delete the folders "
                             f"checkpoints/block=NNNNNN of blocks {meta.get('layout', [b])} and resume")
        out.update(bad)
    return out


def _plan(cfg: RunConfig, resume: bool, storage_options: Optional[dict], allow_device_change: bool) -> _Plan:
    """Every check of ``open_sampling_run``, touching nothing."""
    cfg.validate()
    _, event_shape, model_hash = load_sampling_model(cfg, "cpu")  # a bad artifact fails here first
    locator = SampleStore(cfg.output.rstrip("/"), cfg.name, event_shape=event_shape, config=cfg.store,
                          storage_options=storage_options, check_writable=False)
    existing, replace, rebuilt = _existing_run(cfg, resume, storage_options, locator)
    # before chain_blocks: 10^12 chains must not become a list
    check_plausible(cfg, event_shape, _committed_fraction(existing, cfg))
    blocks = chain_blocks(cfg.pool.num_chains, cfg.sampler.block_size)
    repairs = {}
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
        repairs = _repairs(locator, blocks, cfg.pool.verify_checksums)
    else:
        layout = split_layout(len(blocks), cfg.pool.num_actors)
        if cfg.pool.num_actors > len(layout):
            _say(f"warning: pool.num_actors={cfg.pool.num_actors}, but {cfg.pool.num_chains} chains make "
                 f"{len(blocks)} block(s) of sampler.block_size={cfg.sampler.block_size}: running {len(layout)} "
                 f"actor(s); lower sampler.block_size for more")
    return _Plan(cfg, event_shape, model_hash, layout, existing, replace, rebuilt, repairs)


def _open(plan: _Plan, storage_options: Optional[dict], allow_device_change: bool) -> SamplingRun:
    """Create or reopen the run ``plan`` describes (the first file written)."""
    cfg = plan.cfg
    seeds = {"run_seed": cfg.seed, "rng": "philox4x32-10(key=run_seed, counter=(draw // 4, step, chain_id, stream))",
             "block_size": cfg.sampler.block_size}
    if plan.rebuilt:
        locator = SampleStore(cfg.output.rstrip("/"), cfg.name, event_shape=plan.event_shape, config=cfg.store,
                              storage_options=storage_options, check_writable=True)
        write_manifest(locator, {**plan.existing, "seeds": seeds})
    # create_run checks writability and (on resume) schema / shape / dtype before touching anything
    store = create_run(cfg.output.rstrip("/"), cfg.name, event_shape=plan.event_shape, config=cfg,
                       model_hash=plan.model_hash, seeds=seeds, storage_options=storage_options,
                       extra={"layout": plan.layout, "kind": "sample"}, replace=plan.replace)
    recorded = plan.existing.get("divergence_events", []) if plan.existing else []
    # on resume the resolved config of this session is recorded (e.g. a longer pool.num_steps)
    update_manifest(store, status="running", pool_progress={}, config=to_dict(cfg), divergence_events=recorded)
    for part, why in sorted(plan.repairs.items()):
        _say(f"committed part {store.url}/{part} is {why}: its actor re-creates it from the previous checkpoint")
    hardware = (plan.existing.get("hardware") if plan.existing else None) or {}
    return SamplingRun(cfg, store, plan.layout, plan.model_hash, recorded, hardware, allow_device_change,
                       plan.repairs)


def open_sampling_run(cfg: RunConfig, resume: bool, storage_options: Optional[dict] = None,
                      allow_device_change: bool = False) -> SamplingRun:
    """Create the run ``{cfg.output}/{cfg.name}`` or reopen it to resume; every check (model
    artifact, plausible size, existing run, config and model hash on resume, layout, committed
    parts, writability, schema) runs before any existing file is modified, raising ValueError /
    ``StoreNotWritableError``. A run that committed nothing is started afresh; a lost manifest is
    rebuilt from the block checkpoints (resume only). Each actor checks its device class (e.g. the GPU
    model) against the one recorded for its blocks."""
    return _open(_plan(cfg, resume, storage_options, allow_device_change), storage_options, allow_device_change)


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
    # a test's fault plan only: credentials never go here (the runtime env is listed in clear)
    fwd = faults.env_vars()
    if fwd:
        env["env_vars"] = {**fwd, **env.get("env_vars", {})}
    if env:
        opts["runtime_env"] = env
    return opts


def credentials_from_env() -> dict:
    """The driver's ``AWS_*`` / ``GOOGLE_APPLICATION_CREDENTIALS`` variables (``forward_credentials``)."""
    return {k: v for k, v in os.environ.items() if k.startswith(CREDENTIAL_ENV_PREFIXES)}


def resource_request(cfg: RunConfig, num_actors: int) -> ResourceRequest:
    """The pool's actors as one pre-flight request (``SPREAD``, like the actors themselves)."""
    p = cfg.pool
    return ResourceRequest.uniform(num_actors, {"CPU": p.cpus_per_actor, "GPU": p.gpus_per_actor}, "SPREAD",
                                   what=f"{num_actors} chain actor(s) (pool.num_actors, or the run's recorded layout)")


def check_resources(cfg: RunConfig, num_actors: int) -> None:
    """Return once the cluster can place the actors (``mmgm_ray.preflight.ensure_resources``, waiting at
    most ``pool.scale_timeout_s`` for an autoscaler); ValueError naming the settings otherwise."""
    try:
        ensure_resources(resource_request(cfg, num_actors), timeout_s=cfg.pool.scale_timeout_s)
    except ValueError as e:
        raise type(e)(f"{e}; lower pool.num_actors, pool.cpus_per_actor or pool.gpus_per_actor, or use a larger "
                      f"cluster (--num-cpus for a local one)") from None


# ---- errors of the actors ---------------------------------------------------------------------------

_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception))(?::\s*(.*))?$")
#: causes that are bad input (a setting, a file, credentials): ValueError, exit status 2 in the CLI
_BAD_INPUT = {"ValueError", "FileNotFoundError", "NotADirectoryError", "PermissionError", "StoreNotWritableError",
              "StoreAccessError", "DamagedPartError", "NoCredentialsError", "DeviceChangeError"}


def error_cause(err: BaseException) -> tuple[str, str]:
    """(exception class name, first line of its message) of the error behind a Ray error: the
    exception a method raised (``RayTaskError.cause``), or the last exception line of the traceback
    text an actor's failed constructor leaves (``ActorDiedError`` keeps only that text)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(cause, ray.exceptions.RayError):
        lines = str(cause).strip().splitlines()
        return type(cause).__name__, lines[0] if lines else ""
    for line in reversed(str(err).splitlines()):
        m = _EXC_LINE.match(line.strip())
        if m:
            return m.group(1), (m.group(2) or "").strip()
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return type(err).__name__, lines[0] if lines else ""


class PoolDriver:
    """One sampling run's actors and what they have committed, advanced by events.

    ``on_progress(driver)`` callbacks (tests, dashboards) see ``actors`` (actor index -> handle),
    ``layout``, ``steps`` (actor index -> last returned step), ``results`` (every ``advance`` result
    in arrival order), ``chunks_done``, ``replacements``, ``restarts_seen`` and ``snapshot``.
    """

    def __init__(self, run: SamplingRun, *, storage_options: Optional[dict] = None,
                 runtime_env: Optional[dict] = None, progress: bool = True, stop_timeout_s: Optional[float] = None,
                 credentials_env: Optional[dict] = None):
        cfg = run.cfg
        self.run, self.cfg, self.layout = run, cfg, run.layout
        self.storage_options = storage_options
        self.credentials_env = credentials_env
        self.chunk = chunk_steps(cfg)
        self.options = _actor_options(cfg, runtime_env)
        self.stop_timeout_s = float(stop_timeout_s or cfg.pool.stop_timeout_s)
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
        """Create one actor per block group, wait (at most ``pool.scale_timeout_s``, saying what is
        pending) until all are placed and constructed, then give each its first chunk."""
        for i in range(len(self.layout)):
            self._create_actor(i)
        try:
            wait_scheduled(list(self.actors.values()), timeout_s=self.cfg.pool.scale_timeout_s,
                           what=f"{len(self.actors)} chain actor(s) of run {self.cfg.name}")
        except ray.exceptions.RayActorError as e:  # a constructor raised: name that actor
            i = next((i for i, a in self.actors.items() if a._actor_id.hex() == e.actor_id), 0)
            raise self.failure(i, e) from None
        for i in self.actors:
            self._advance(i)

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
        if getattr(err, "actor_init_failed", False) or self.replacements >= self.max_replacements:
            raise self.failure(i, err) from None
        self.replacements += 1  # same blocks, same order -> same rows
        self._start_actor(i)

    def failure(self, i: int, err: BaseException) -> Exception:
        """One line for actor ``i``'s failure: ValueError when its cause is bad input, else RuntimeError."""
        g = self.layout[i]
        kind, msg = error_cause(err)
        what = "could not start" if getattr(err, "actor_init_failed", False) else "failed"
        text = f"chain actor {i} (blocks {g[0]}..{g[-1]}) {what}: {kind}: {msg}"
        if kind == "DeviceChangeError":  # another device class than the run recorded (the flag to pass is in msg)
            return DeviceChangeError(text)
        return ValueError(text) if kind in _BAD_INPUT else RuntimeError(text)

    def request_stop(self) -> None:
        """Ctrl-C: every actor returns at its next checkpoint; no new chunks."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.perf_counter() + self.stop_timeout_s
        _say(f"stopping: {len(self.actors)} actor(s) finish their checkpoint interval (at most {self.stop_timeout_s:g} s,"
             f" pool.stop_timeout_s); Ctrl-C again to quit now (every committed checkpoint is kept)")
        for a in self.actors.values():
            a.request_stop.remote()

    def commit(self) -> bool:
        """Let every actor finish committing its last checkpoint (it runs in the background); bounded
        by the stop deadline after Ctrl-C. Returns True when a (second) Ctrl-C cut the wait short."""
        timeout = self.stop_deadline - time.perf_counter() if self.stopping else self.stop_timeout_s
        commits = {a.commit.remote(): i for i, a in self.actors.items()}
        try:
            done, _ = ray.wait(list(commits), num_returns=len(commits), timeout=max(0.0, timeout))
        except KeyboardInterrupt:
            return True
        for ref in done:
            try:
                self._fold(ray.get(ref)["blocks"], [])
            except ray.exceptions.RayError:
                pass  # died or failed meanwhile: its blocks restore from their checkpoints on resume
        return False

    @property
    def finished(self) -> bool:
        return all(self.steps[i] >= self.cfg.pool.num_steps for i in self.chains_of)

    # ---- the loop ------------------------------------------------------------------------------------

    def drive(self, on_progress: Optional[Callable[["PoolDriver"], None]] = None, poll_s: float = 0.2) -> bool:
        """Dispatch results until no call is pending; return True after a second Ctrl-C."""
        while self.pending:
            try:
                if time.perf_counter() > self.stop_deadline:
                    _say(f"{len(self.pending)} actor(s) still busy after {self.stop_timeout_s:g} s; quitting "
                         f"(a resume continues from their last commits)")
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
        except ray.exceptions.RayTaskError as e:   # advance() raised: a writer error, a fenced block
            raise self.failure(i, e) from None
        self.on_result(i, res)

    def _create_actor(self, i: int) -> None:
        rec = self.run.hardware
        recorded = (rec.get("actors") or {}).get(str(i)) or (rec if rec.get("device_class") else None)
        self.actors[i] = RemoteChainActor.options(**self.options).remote(
            to_dict(self.cfg), self.cfg.output.rstrip("/"), self.cfg.name, self.layout[i], self.storage_options,
            recorded_hardware=recorded, allow_device_change=self.run.allow_device_change,
            credentials_env=self.credentials_env)
        if self.stopping:
            self.actors[i].request_stop.remote()

    def _start_actor(self, i: int) -> None:
        self._create_actor(i)
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
            "repaired": sorted(self.run.repairs or {}),
            "queue_wait_s": sum(r["queue_wait_s"] for r in last),
            # CPU seconds the actors spent (engine + writer threads) per chain-step: robust to a busy machine
            "cpu_s": sum(r["cpu_s"] for r in last),
            "chain_steps_actors": sum(r["chain_steps_total"] for r in last),
        }


def run_pool(cfg: RunConfig, resume: bool = False, *, storage_options: Optional[dict] = None,
             progress: bool = True, on_progress: Optional[Callable[[PoolDriver], None]] = None,
             runtime_env: Optional[dict] = None, poll_s: float = 0.2, stop_timeout_s: Optional[float] = None,
             allow_device_change: bool = False, forward_credentials: bool = False) -> dict:
    """Run (or resume) the sampling run ``cfg`` on a pool of Ray chain actors; return a summary.

    The run lives at ``cfg.run_dir`` (local path or fsspec URL; ``storage_options`` for the file
    system, passed to the actors too). ``resume=False`` refuses an existing run (unless it committed
    nothing); ``resume=True`` needs one and continues it from its block checkpoints (same layout,
    same rows, bitwise). Needs Ray started (``mmgm_ray.cluster.ensure_ray``). ``on_progress(driver)``
    is called after every wait round; raising KeyboardInterrupt in it acts like Ctrl-C.
    ``stop_timeout_s`` overrides ``pool.stop_timeout_s``. ``forward_credentials`` hands the driver's
    ``AWS_*`` / ``GOOGLE_APPLICATION_CREDENTIALS`` variables to the actors (as a constructor
    argument, never through the runtime env); by default workers use the cluster's own. A resume on
    another device class than the run recorded raises ``hardware.DeviceChangeError`` (a ValueError)
    unless ``allow_device_change`` (then the rows differ from an uninterrupted run from there on).

    Returns {run_id, url, status ('done' | 'interrupted'), chains, num_steps, min_step, rows,
    samples, divergences, wall_s, chain_steps_per_s, restarts, replacements, model_hash, repaired, ...}.
    Raises ValueError for bad input (missing model artifact, existing run without ``resume``,
    config or schema mismatch on resume, a request the cluster can never hold, a damaged part the
    checkpoints cannot re-create), ``StoreNotWritableError`` for an unwritable store; in each case
    before any existing file is modified. A failing actor raises one line (see :meth:`PoolDriver.failure`).
    """
    require_ray("run_pool")
    plan = _plan(cfg, resume, storage_options, allow_device_change)
    check_resources(cfg, len(plan.layout))   # before the first file is written
    driver = PoolDriver(_open(plan, storage_options, allow_device_change), storage_options=storage_options,
                        runtime_env=runtime_env, progress=progress, stop_timeout_s=stop_timeout_s,
                        credentials_env=credentials_from_env() if forward_credentials else None)
    status, error, hard = "running", None, False
    try:
        driver.start()
        hard = driver.drive(on_progress, poll_s)
        hard = hard or driver.commit()
        status = "done" if driver.finished else "interrupted"
    except BaseException as e:
        error = e
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
    finally:
        driver.kill_actors()
    try:
        man = driver.finalize(status, f"{type(error).__name__}: {error}" if error is not None else None)
    except BaseException as e:  # a Ctrl-C or a failed status update: the original error matters more
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
