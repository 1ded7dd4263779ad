"""Distributed training with Ray Train (V2, Ray 2.60): ``TorchTrainer`` + DDP around the same loop.

Driver side (``run_ray_training``):

1. validate the whole run (config, data presence, batch vs data size, the network builds, the
   cluster can hold the workers) before any worker starts: a bad run raises one ValueError;
2. write the resolved config to ``{output}/{name}/config.yaml``;
3. start ``TorchTrainer(train_worker, ScalingConfig(num_workers, use_gpu, resources_per_worker),
   TorchConfig(backend=gloo|nccl), RunConfig(name, storage_path=output, FailureConfig(max_failures),
   CheckpointConfig(num_to_keep)))``.

Worker side (``train_worker``): ``training_loop`` with a :class:`RaySession`: rank / world size
from ``ray.train.get_context()``, the network wrapped by ``ray.train.torch.prepare_model`` (DDP),
``ray.train.report`` every ``checkpoint_every`` steps on every rank (rank 0 attaches the checkpoint
``state.pt``: model, EMA, optimizer, step, resolved config; read back with ``weights_only=True``).

Resume: reusing the same ``name`` and ``output`` makes Ray Train hand the latest checkpoint to
``ray.train.get_checkpoint()``, and the loop continues from its step (same data order and noise as
an uninterrupted run). A crashed worker is replaced up to ``max_failures`` times and the new group
restarts from the latest checkpoint the same way.

How workers get data: every worker loads the (small: digits, MNIST, CIFAR-10, a GMM, at most a few
hundred MB) data set into memory itself and takes its rank's shard of a per-epoch permutation
(``mmgm_ray.data.make_loader``, DistributedSampler semantics, drop_last so every rank runs the same
number of steps). No per-batch inter-process traffic and no object-store copies; the order is a pure
function of (seed, epoch, rank), which is what makes exact resume possible. Ray Data is used for
the Parquet sample stores, which can be larger than one process.

Storage: ``output`` is a local path or an fsspec URL; for URLs the fsspec filesystem is wrapped as
a pyarrow filesystem (``PyFileSystem(FSSpecHandler(fs))``) and passed as ``storage_filesystem``.
Multi-node runs need storage every node sees (NFS, S3, GCS); ``memory://`` is per process.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

from mmgm_ray.config import RunConfig, from_dict, to_dict
from mmgm_ray.factory import ARTIFACT_NAME
from mmgm_ray.train.loop import (CKPT_FILE, Session, load_payload, read_metrics,
                                 run_dir_of, training_loop, write_config)
from mmgm_ray.train.validate import RunPlan, check_cluster_resources, validate_run

# Set for the Ray Train controller (RAY-NOTES: report() otherwise waits ~2 s for its poll).
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


class RaySession(Session):
    """The loop's view of a Ray Train worker."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()

    def device(self, cfg: RunConfig) -> torch.device:
        import ray.train.torch
        return ray.train.torch.get_device()

    def prepare_net(self, net: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch
        # DDP only when there is more than one worker; prepare_model also moves it to the device
        return ray.train.torch.prepare_model(net, parallel_strategy="ddp" if self.world_size > 1 else None)

    def restore(self) -> Optional[dict]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            with open(os.path.join(d, CKPT_FILE), "rb") as f:
                return load_payload(f)

    def report(self, metrics: dict, payload: Optional[dict]) -> None:
        import ray.train

        if payload is None:
            ray.train.report(metrics)
            return
        tmp = tempfile.mkdtemp(prefix="mmgm-ckpt-")
        try:
            torch.save(payload, os.path.join(tmp, CKPT_FILE))
            # synchronous upload: the folder is copied to storage before report returns
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            v = value.detach().clone().float()
            dist.all_reduce(v)
            return v / self.world_size
        return value


def train_worker(config: dict) -> None:
    """Ray Train per-worker entry point: ``config = {"run": RunConfig as dict, "run_dir": str,
    "crash": optional {"step", "marker", "rank"} fault-injection hook for tests}``."""
    cfg = from_dict(RunConfig, config["run"])
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    session = RaySession()
    crash = config.get("crash")
    callback = None
    if crash:
        def callback(step: int) -> None:
            # crash once: the marker file records that the first attempt already died here
            if step == crash["step"] and session.rank == crash.get("rank", 0) and not os.path.exists(crash["marker"]):
                with open(crash["marker"], "w") as f:
                    f.write(str(step))
                os._exit(1)
    training_loop(cfg, config["run_dir"], session, progress=config.get("progress", True),
                  step_callback=callback)


@dataclass
class RayTrainResult:
    """What ``run_ray_training`` returns."""
    run_dir: str
    artifact: str
    metrics: dict                  # last metrics reported by rank 0
    checkpoint_path: Optional[str]  # latest checkpoint folder in storage
    history: list                  # metrics.jsonl records of the whole run (all attempts, deduplicated)
    error: Optional[BaseException] = None


def storage_for(output: str):
    """(storage_path, storage_filesystem) for RunConfig: local paths as is; URLs through fsspec."""
    import fsspec

    if "://" not in str(output) or str(output).startswith("file://"):
        fs, p = fsspec.core.url_to_fs(str(output))
        return os.path.abspath(p), None
    import pyarrow.fs as pafs

    fs, p = fsspec.core.url_to_fs(str(output))
    return p, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def prepare(cfg: RunConfig) -> RunPlan:
    """Driver-side validation (no Ray needed): raises ValueError for any bad run."""
    return validate_run(cfg)


def run_ray_training(cfg: RunConfig, plan: Optional[RunPlan] = None, progress: bool = True,
                     _crash: Optional[dict] = None) -> RayTrainResult:
    """Train with Ray Train on the connected cluster (``ray.init`` is called if needed).

    Validates everything first (ValueError before any worker starts), writes ``config.yaml``,
    runs ``TorchTrainer.fit`` and returns the result; raises RuntimeError if training failed
    after ``max_failures`` retries. ``_crash`` is a test hook (see ``train_worker``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    plan = plan or validate_run(cfg)
    # Train V2 reroutes worker print() through logging, so each progress line reached the driver
    # twice; the driver propagates this switch to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # report() waits for the controller's poll (2 s by default, RAY-NOTES); also propagated by the driver
    os.environ.setdefault(HEALTH_CHECK_ENV, "0.1")
    if not ray.is_initialized():
        ray.init()  # connects to RAY_ADDRESS / a running cluster (as a job), else starts a local one
    check_cluster_resources(cfg)
    tc = cfg.train
    out = str(cfg.output)
    if "://" not in out:
        out = os.path.abspath(out)
        cfg = from_dict(RunConfig, {**to_dict(cfg), "output": out})  # workers may run elsewhere
    run_dir = run_dir_of(cfg)
    write_config(cfg, run_dir)
    storage_path, storage_fs = storage_for(out)
    backend = tc.backend if tc.backend != "auto" else ("nccl" if tc.use_gpu else "gloo")
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"run": to_dict(cfg), "run_dir": run_dir, "crash": _crash, "progress": progress},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                failure_config=FailureConfig(max_failures=tc.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # V2 raises on failure after retries; keep the cause
        raise RuntimeError(f"training run {cfg.name!r} failed: {e}") from e
    if result.error is not None:
        raise RuntimeError(f"training run {cfg.name!r} failed: {result.error}") from result.error
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    return RayTrainResult(run_dir=run_dir, artifact=f"{run_dir}/{ARTIFACT_NAME}", metrics=dict(result.metrics or {}),
                          checkpoint_path=ckpt, history=read_metrics(run_dir))
