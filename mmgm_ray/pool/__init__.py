"""Ray chain pool: long-run walk-jump chains on many actors, written exactly once to the sample store.

* :func:`run_pool` (``mmgm sample``): run or resume a sampling run; returns a summary dict.
* :func:`generate_dataset` (``mmgm generate``): N samples with burn-in and thinning as a Parquet
  image data set (``mmgm_ray.data.load_dataset(DataConfig(name='parquet', path=...))`` reads it).
* :class:`ChainActor`: the actor (plain class; ``RemoteChainActor`` is its Ray version).

This package needs Ray; the math core (``mmgm_ray.engine`` and below) does not import it.
"""
from mmgm_ray.pool.actor import ChainActor, RemoteChainActor, resolve_device
from mmgm_ray.pool.driver import (PoolDriver, SamplingRun, check_resume_compatible, open_sampling_run, run_bytes,
                                  run_pool, split_layout)
from mmgm_ray.pool.generate import generate_dataset

__all__ = ["run_pool", "open_sampling_run", "PoolDriver", "SamplingRun", "split_layout", "check_resume_compatible",
           "run_bytes", "ChainActor", "RemoteChainActor", "resolve_device", "generate_dataset"]
