"""Ray chain pool: long-run walk-jump chains on many actors, written exactly once to the sample store.

* :func:`run_pool` (``mmgm sample``): run or resume a sampling run; returns a summary dict.
* :func:`generate_dataset` (``mmgm generate``): N samples with burn-in and thinning as a Parquet
  image data set (``mmgm_ray.data.load_dataset(DataConfig(name='parquet', path=...))`` reads it).
* :class:`ChainActor`: the actor (plain class; ``remote_class()`` is its Ray version).

Names are imported lazily, so ``import mmgm_ray.pool.cli`` (the CLI parser) stays cheap and importing
this package neither starts nor needs Ray.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "run_pool": "controller", "split_layout": "controller", "check_resume_compatible": "controller",
    "PoolState": "controller", "run_bytes": "controller",
    "ChainActor": "actor", "remote_class": "actor", "resolve_device": "actor",
    "generate_dataset": "generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mmgm_ray.pool.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mmgm_ray.pool' has no attribute {name!r}")
