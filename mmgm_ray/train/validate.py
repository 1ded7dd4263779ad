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
    from mmgm_ray.factory import build_noise, build_score_model
    from mmgm_ray.nets import count_parameters
    from mmgm_ray.train.loop import run_dir_of

    if not isinstance(cfg, RunConfig):
        raise ValueError(f"expected a RunConfig, got {type(cfg).__name__}")
    # Re-check types and ranges even for configs built in code (dataclasses skip validation).
    cfg = from_dict(RunConfig, to_dict(cfg))
    cfg.validate()
    build_noise(cfg)  # only Gaussian MNMs are trained
    if cfg.oracle.kind != "none":
        raise ValueError("oracle.kind must be 'none' for training (an oracle has nothing to learn)")
    tc = cfg.train
    if not tc.use_gpu and tc.backend == "nccl":
        raise ValueError("train.backend='nccl' needs train.use_gpu=true (NCCL is GPU-only)")
    try:
        fsspec.core.url_to_fs(str(cfg.output))
    except (ValueError, ImportError) as e:
        raise ValueError(f"output {cfg.output!r} is not a usable path or URL: {e}") from e

    ds = dataset if dataset is not None else load_dataset(cfg.data)
    if len(ds) == 0:
        raise ValueError(f"data set {cfg.data.name!r} is empty")
    world = world_size or tc.num_workers
    per_rank = len(ds) // world
    if per_rank < tc.batch_size:
        raise ValueError(f"{len(ds)} examples over {world} worker(s) give {per_rank} per worker, fewer than "
                         f"train.batch_size={tc.batch_size}; lower the batch size or the worker count")
    if cfg.data.hflip and not ds.is_image:
        raise ValueError("data.hflip needs image data")
    try:
        model = build_score_model(cfg, ds.event_shape)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"model does not build for event shape {ds.event_shape}: {e}") from e
    return RunPlan(cfg, ds, tuple(ds.event_shape), count_parameters(model), run_dir_of(cfg))


def check_cluster_resources(cfg: RunConfig) -> None:
    """With Ray initialized: return once the cluster can hold the Ray Train workers, asking the
    autoscaler for nodes if needed; ValueError if it never can, ``ResourcesUnavailable`` (a
    ValueError) after ``train.scale_timeout_s`` (``mmgm_ray.preflight``)."""
    # imported here: validate_run must not pull Ray into processes that only validate
    from mmgm_ray.preflight import ResourceRequest, ensure_resources

    tc = cfg.train
    bundle = {"CPU": tc.cpus_per_worker, **({"GPU": 1.0} if tc.use_gpu else {})}
    # Ray Train's ScalingConfig places its workers with the PACK strategy by default
    request = ResourceRequest.uniform(tc.num_workers, bundle, "PACK", what=f"train.num_workers={tc.num_workers}")
    ensure_resources(request, timeout_s=tc.scale_timeout_s)
