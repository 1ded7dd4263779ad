"""Driver-side checks run BEFORE any worker starts: a bad run fails here with one clear ValueError.

``validate_run`` checks the whole config (types and ranges), that the data set loads (files exist,
formats parse), that one batch per worker fits the data, that the network builds for the data's
event shape, that the sampler suits the model, and that the output location is usable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import fsspec

from mmgm_ray.config import RunConfig, from_dict, to_dict
from mmgm_ray.data import ImageDataset, load_dataset
from mmgm_ray.factory import build_noise, build_score_model
from mmgm_ray.nets import count_parameters


@dataclass
class RunPlan:
    """What validation found: the loaded data, its event shape and the model size."""
    cfg: RunConfig
    dataset: ImageDataset
    event_shape: tuple
    n_params: int
    run_dir: str


def validate_run(cfg: RunConfig, dataset: Optional[ImageDataset] = None,
                 world_size: Optional[int] = None) -> RunPlan:
    """Validate everything a training run needs; returns the plan or raises ValueError."""
    if not isinstance(cfg, RunConfig):
        raise ValueError(f"expected a RunConfig, got {type(cfg).__name__}")
    # Re-check types and ranges even for configs built in code (dataclasses skip validation).
    cfg = from_dict(RunConfig, to_dict(cfg))
    build_noise(cfg)
    if cfg.oracle.kind != "none":
        raise ValueError("oracle.kind must be 'none' for training (an oracle has nothing to learn)")
    try:
        fsspec.core.url_to_fs(str(cfg.output))
    except (ValueError, ImportError) as e:
        raise ValueError(f"output {cfg.output!r} is not a usable path or URL: {e}") from e

    ds = dataset if dataset is not None else load_dataset(cfg.data)
    if len(ds) == 0:
        raise ValueError(f"data set {cfg.data.name!r} is empty")
    world = world_size or cfg.train.resources.num_workers
    per_rank = len(ds) // world
    if per_rank < cfg.train.batch_size:
        raise ValueError(f"{len(ds)} examples over {world} worker(s) give {per_rank} per worker, fewer than "
                         f"train.batch_size={cfg.train.batch_size}; lower the batch size or the worker count")
    if cfg.noise.kind == "poisson" and bool((ds.x < 0).any()):
        raise ValueError(f"noise.kind='poisson' needs non-negative data (the Poisson rates); data set "
                         f"{cfg.data.name!r} has negative values")
    if cfg.data.hflip and not ds.is_image:
        raise ValueError("data.hflip needs image data")
    try:
        model = build_score_model(cfg, ds.event_shape)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"model does not build for event shape {ds.event_shape}: {e}") from e
    return RunPlan(cfg, ds, tuple(ds.event_shape), count_parameters(model), cfg.run_dir)
