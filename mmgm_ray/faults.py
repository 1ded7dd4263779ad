"""Fault injection for tests and benchmarks, in one place and out of production signatures.

A plan is a JSON object in the environment variable ``MMGM_FAULTS`` of the process that runs the
code (tests set it with ``monkeypatch.setenv``; the pool driver forwards it to its actors' runtime
environment and the Ray Train driver to its workers' loop config, see :func:`plan`). Without it
every hook is a no-op costing one dict lookup. Fields:

- ``train_crash``: ``{"step": int, "rank": int, "marker": path}``: the training process of that rank
  exits hard (``os._exit(1)``) right after that step, once: the marker file records that it did.
- ``train_step_sleep``: seconds the training loop sleeps after every step, so that a test's node
  removal lands between checkpoints.
- ``actor_step_sleep``: seconds a chain actor sleeps after every walk step, so that a test's kill
  lands in the middle of a chunk.
- ``actor_exit``: ``{"step": int, "marker": path}``: the chain actor that reaches that walk step exits
  hard (``os._exit(1)``), once: the marker file records that it did (Ray then restarts it).
- ``actor_skip_store``: chain actors run their chains without writing anything (the pool benchmark's
  "pool without store" baseline).
- ``store_full``: ``{"after": int, "match": str}``: every atomic store write (``store.fsutil``) whose
  path contains ``match`` fails with ENOSPC once this process has made ``after`` such writes (a disk
  that fills up mid-run).
"""
from __future__ import annotations

import errno
import json
import os
import time
from typing import Optional

ENV = "MMGM_FAULTS"
_KNOWN = {"train_crash", "train_step_sleep", "actor_step_sleep", "actor_skip_store", "actor_exit", "store_full"}
_writes = {"n": 0}  # store writes this process made that match the plan's ``store_full.match``


def plan() -> dict:
    """The active plan (empty without ``MMGM_FAULTS``); ValueError names an unknown field."""
    raw = os.environ.get(ENV)
    if not raw:
        return {}
    p = json.loads(raw)
    if not isinstance(p, dict) or set(p) - _KNOWN:
        raise ValueError(f"{ENV} must be a JSON object with fields from {sorted(_KNOWN)}, got {raw!r}")
    return p


def env_vars() -> dict:
    """``{MMGM_FAULTS: ...}`` to forward to Ray workers (empty when no plan is active)."""
    raw = os.environ.get(ENV)
    return {ENV: raw} if raw else {}


def install(p: Optional[dict]) -> None:
    """Activate ``p`` in this process (a Ray Train worker receives the driver's plan this way)."""
    if p:
        os.environ[ENV] = json.dumps(p)


def after_train_step(step: int, rank: int) -> None:
    """Training loop hook: the planned sleep; crash once at the planned (step, rank)."""
    p = plan()
    if p.get("train_step_sleep"):
        time.sleep(float(p["train_step_sleep"]))
    crash = p.get("train_crash")
    if crash and step == crash["step"] and rank == crash.get("rank", 0) and not os.path.exists(crash["marker"]):
        with open(crash["marker"], "w") as f:
            f.write(str(step))
        os._exit(1)


def after_walk_step(step: int) -> None:
    """Chain actor hook: the planned sleep after every walk step; the planned exit at ``step``."""
    p = plan()
    sleep = p.get("actor_step_sleep")
    if sleep:
        time.sleep(float(sleep))
    die = p.get("actor_exit")
    if die and step == die["step"] and not os.path.exists(die["marker"]):
        with open(die["marker"], "w") as f:
            f.write(str(step))
        os._exit(1)


def skip_store() -> bool:
    """Chain actor setting: run without writing (benchmark baseline)."""
    return bool(plan().get("actor_skip_store"))


def before_store_write(path: str) -> None:
    """Store hook: ENOSPC once the planned number of matching writes was made."""
    full = plan().get("store_full")
    if not full or full.get("match", "") not in path:
        return
    _writes["n"] += 1
    if _writes["n"] > int(full.get("after", 0)):
        raise OSError(errno.ENOSPC, f"No space left on device ({ENV})", path)
