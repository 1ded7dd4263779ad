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

import fsspec
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mmgm_ray import faults
from mmgm_ray.cluster import require_ray
from mmgm_ray.config import RunConfig, from_dict, to_dict
from mmgm_ray.factory import ARTIFACT_NAME
from mmgm_ray.preflight import ResourceRequest, ensure_resources
from mmgm_ray.hardware import DeviceChangeError
from mmgm_ray.train.loop import CKPT_FILE, Session, load_payload, read_metrics, training_loop, write_config
from mmgm_ray.train.validate import RunPlan, validate_run


class RaySession(Session):
    """The loop's view of a Ray Train worker."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()

    def device(self, cfg: RunConfig) -> torch.device:
        return ray.train.torch.get_device()

    def prepare_net(self, net: torch.nn.Module) -> torch.nn.Module:
        # DDP only when there is more than one worker; prepare_model also moves it to the device.
        # Plain DDP also serves the energy models (MEM^2, MUVB, Poisson), whose loss differentiates
        # the energy's gradient: their inner autograd.grad(..., inputs=y) runs no parameter's
        # AccumulateGrad hook, so DDP reduces once per parameter in the outer backward and needs
        # neither static_graph nor find_unused_parameters (tests/test_train.py checks 2 workers).
        return ray.train.torch.prepare_model(net, parallel_strategy="ddp" if self.world_size > 1 else None)

    def restore(self) -> Optional[dict]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            with open(os.path.join(d, CKPT_FILE), "rb") as f:
                return load_payload(f)

    def report(self, metrics: dict, payload: Optional[dict]) -> None:
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
        if self.world_size > 1 and dist.is_initialized():
            v = value.detach().clone().float()
            dist.all_reduce(v)
            return v / self.world_size
        return value


def train_worker(config: dict) -> None:
    """Ray Train per-worker entry point: ``config = {"run": RunConfig as dict, "run_dir": str,
    "progress": bool, "allow_device_change": bool, "faults": the driver's fault-injection plan
    (tests; usually empty)}``."""
    faults.install(config.get("faults"))
    cfg = from_dict(RunConfig, config["run"])
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    training_loop(cfg, config["run_dir"], RaySession(), progress=config.get("progress", True),
                  allow_device_change=config.get("allow_device_change", False))


@dataclass
class RayTrainResult:
    """What ``run_ray_training`` returns."""
    run_dir: str
    artifact: str
    metrics: dict                  # last metrics reported by rank 0
    checkpoint_path: Optional[str]  # latest checkpoint folder in storage
    history: list                  # metrics.jsonl records of the whole run (all attempts, deduplicated)


def storage_for(output: str):
    """(storage_path, storage_filesystem) for RunConfig: local paths as is; URLs through fsspec."""
    fs, p = fsspec.core.url_to_fs(str(output))
    if "://" not in str(output) or str(output).startswith("file://"):
        return os.path.abspath(p), None
    return p, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def check_cluster_resources(cfg: RunConfig) -> None:
    """Return once the cluster can hold the Ray Train workers, asking the autoscaler for nodes if
    needed; ValueError if it never can, ``ResourcesUnavailable`` (a ValueError) after
    ``train.resources.scale_timeout_s`` (``mmgm_ray.preflight``). Without this check Ray Train
    waits forever for workers a cluster cannot hold."""
    r = cfg.train.resources
    bundle = {"CPU": r.cpus_per_worker, **({"GPU": 1.0} if r.use_gpu else {})}
    # Ray Train's ScalingConfig places its workers with the PACK strategy by default
    request = ResourceRequest.uniform(r.num_workers, bundle, "PACK",
                                      what=f"train.resources.num_workers={r.num_workers}")
    ensure_resources(request, timeout_s=r.scale_timeout_s)


def _trainer(cfg: RunConfig, run_dir: str, progress: bool, allow_device_change: bool) -> TorchTrainer:
    r = cfg.train.resources
    storage_path, storage_fs = storage_for(cfg.output)
    resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})}
    return TorchTrainer(
        train_worker,
        train_loop_config={"run": to_dict(cfg), "run_dir": run_dir, "progress": progress, "faults": faults.plan(),
                           "allow_device_change": allow_device_change},
        torch_config=TorchConfig(backend=r.backend if r.backend != "auto" else ("nccl" if r.use_gpu else "gloo")),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        run_config=RayRunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                failure_config=FailureConfig(max_failures=r.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep)),
    )


def _device_change(err: BaseException) -> Optional[DeviceChangeError]:
    """The DeviceChangeError a worker raised, found in Ray Train's error (worker failures, causes)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DeviceChangeError):
            return e
        todo += [e.__cause__, getattr(e, "cause", None), *getattr(e, "worker_failures", {}).values()]
    return None


def run_ray_training(cfg: RunConfig, plan: Optional[RunPlan] = None, progress: bool = True,
                     allow_device_change: bool = False) -> RayTrainResult:
    """Train with Ray Train on the cluster this process joined (``mmgm_ray.cluster.ensure_ray``).

    Validates everything first (ValueError before any worker starts), writes ``config.yaml``,
    runs ``TorchTrainer.fit`` and returns the result; raises RuntimeError if training failed
    after ``max_failures`` retries, ``hardware.DeviceChangeError`` (a ValueError) when the latest
    checkpoint was written on another device class and ``allow_device_change`` is False.
    """
    require_ray("run_ray_training")
    plan = plan or validate_run(cfg)
    check_cluster_resources(cfg)
    if "://" not in str(cfg.output):  # workers may run in another directory
        cfg = from_dict(RunConfig, {**to_dict(cfg), "output": os.path.abspath(cfg.output)})
    write_config(cfg, cfg.run_dir)
    try:
        result = _trainer(cfg, cfg.run_dir, progress, allow_device_change).fit()
    except Exception as e:  # V2 raises on failure after retries; keep the cause
        refused = _device_change(e)
        if refused is not None:
            raise DeviceChangeError(str(refused)) from None
        raise RuntimeError(f"training run {cfg.name!r} failed: {e}") from e
    if result.error is not None:
        refused = _device_change(result.error)
        if refused is not None:
            raise DeviceChangeError(str(refused)) from None
        raise RuntimeError(f"training run {cfg.name!r} failed: {result.error}") from result.error
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    return RayTrainResult(run_dir=cfg.run_dir, artifact=f"{cfg.run_dir}/{ARTIFACT_NAME}",
                          metrics=dict(result.metrics or {}), checkpoint_path=ckpt, history=read_metrics(cfg.run_dir))
