"""Ray chain pool: long-run walk-jump chains on many actors, written exactly once to the sample store.

* :func:`run_pool` (``mmgm sample``): run or resume a sampling run; returns a summary dict.
* :func:`generate_dataset` (``mmgm generate``): N samples with burn-in and thinning as a Parquet
  image data set (``mmgm_ray.data.load_dataset(DataConfig(name='parquet', path=...))`` reads it).
* :class:`ChainActor`: the actor (plain class; ``remote_class()`` is its Ray version).

Ray is imported lazily: importing this package does not start or need Ray.
"""
from mmgm_ray.pool.actor import ChainActor, remote_class, resolve_device
from mmgm_ray.pool.controller import PoolState, check_resume_compatible, run_bytes, run_pool, split_layout
from mmgm_ray.pool.generate import generate_dataset

__all__ = ["run_pool", "generate_dataset", "ChainActor", "remote_class", "resolve_device", "PoolState",
           "check_resume_compatible", "split_layout", "run_bytes"]
