"""Training on the GPU: DDP over NCCL on one GPU (directly and through Ray Train), the demo."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mmgm_ray.demo import run_demo
from mmgm_ray.factory import load_artifact
from mmgm_ray.train.loop import Session, training_loop
from gpu_runs import digits_run


class _DDPSession(Session):
    """One rank of an NCCL process group: the network wrapped in DDP on cuda:0."""

    def prepare_net(self, net):
        return DistributedDataParallel(net, device_ids=[0])


def test_ddp_over_nccl_on_one_gpu(tmp_path):
    """The loop under DDP (NCCL, world size 1) follows the plain loop: same losses to 1% (the
    all-reduce is exact; nearest-upsampling backward adds in a nondeterministic order) and a
    falling curve."""
    cfg = digits_run(tmp_path, "ddp", "train.steps=30")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = training_loop(cfg, str(tmp_path / "ddp"), _DDPSession(), progress=False, write_artifact=False)
    finally:
        dist.destroy_process_group()
    plain = training_loop(cfg, str(tmp_path / "plain"), Session(), progress=False, write_artifact=False)
    assert next(ddp.model.parameters()).device.type == "cuda"
    for a, b in zip(ddp.history, plain.history):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-2)
    assert ddp.history[-1]["loss"] < ddp.history[0]["loss"]


def test_ray_train_nccl_on_one_gpu(ray_gpu, tmp_path):
    """Ray Train with use_gpu and the NCCL backend: the worker trains on its GPU and the artifact
    records it."""
    from mmgm_ray.train.ray_train import run_ray_training

    cfg = digits_run(tmp_path, "rt", "train.steps=20", "train.resources.use_gpu=true",
                     "train.resources.backend=nccl")
    res = run_ray_training(cfg, progress=False)
    _, _, info = load_artifact(res.artifact)
    assert res.metrics["step"] == 20 and info["extra"]["hardware"]["device_type"] == "cuda"


def test_demo_on_the_gpu(tmp_path):
    """The demo trains on the GPU and draws its preview there: finite samples, a grid, the artifact."""
    res = run_demo(str(tmp_path / "demo"), overrides=["train.device=cuda", "pool.device=cpu", "train.steps=50"],
                   progress=False)
    assert res["x"].shape == (64, 1, 8, 8) and torch.isfinite(res["x"]).all()
    _, _, info = load_artifact(res["artifact"])
    assert info["extra"]["hardware"]["device_type"] == "cuda" and math.isfinite(res["final_loss"])
