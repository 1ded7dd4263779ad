"""Training: the loop (in-process or inside Ray Train workers) and the Ray Train driver.

- ``training_loop`` / ``train_local`` (``mmgm_ray.train.loop``): plain process, no Ray.
- ``validate_run`` (``mmgm_ray.train.validate``): every check a run needs, before any worker starts.
- ``run_ray_training`` (``mmgm_ray.train.ray_train``): TorchTrainer + DDP, checkpoints, resume,
  retries; import that module for it (it imports Ray, which this package does not).
"""
from __future__ import annotations

from .loop import LocalSession, LoopResult, Session, read_metrics, train_local, training_loop
from .validate import RunPlan, validate_run

__all__ = ["training_loop", "train_local", "LoopResult", "Session", "LocalSession", "read_metrics",
           "validate_run", "RunPlan"]
