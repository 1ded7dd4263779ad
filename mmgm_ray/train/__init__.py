"""Training: the loop (in-process or inside Ray Train workers) and the Ray Train driver.

- ``training_loop`` / ``train_local`` (``mmgm_ray.train.loop``): plain process, no Ray.
- ``run_ray_training`` (``mmgm_ray.train.ray_train``): TorchTrainer + DDP, checkpoints, resume,
  retries. Imported lazily so ``import mmgm_ray.train`` does not pay for Ray.
- ``validate_run`` (``mmgm_ray.train.validate``): every check a run needs, before any worker starts.
"""
from __future__ import annotations

from .loop import LocalSession, LoopResult, Session, read_metrics, run_dir_of, train_local, training_loop
from .validate import RunPlan, validate_run

__all__ = ["training_loop", "train_local", "LoopResult", "Session", "LocalSession", "read_metrics",
           "run_dir_of", "validate_run", "RunPlan", "run_ray_training"]


def run_ray_training(*args, **kwargs):
    """See ``mmgm_ray.train.ray_train.run_ray_training`` (imports Ray on first use)."""
    from .ray_train import run_ray_training as _run
    return _run(*args, **kwargs)
