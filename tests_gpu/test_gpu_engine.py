"""The engine on CUDA: equal to itself across a save / restore; bf16 sampling on the Gaussian oracle."""
from __future__ import annotations

import pytest
import torch

from mmgm_ray.config import SamplerConfig
from mmgm_ray.engine import WalkJumpEngine
from mmgm_ray.factory import build_score_model
from mmgm_ray.jumps import JumpBatch
from mmgm_ray.noise import GaussianMNM
from mmgm_ray.oracles import GaussianOracle, GMMOracle
from gpu_runs import digits_run

CUDA = torch.device("cuda")


def _models():
    torch.manual_seed(0)
    unet = build_score_model(digits_run("runs", "x", "model.net.zero_init_out=false"), (1, 8, 8))
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    gmm = GMMOracle([0.3, 0.7], [[0.0, 1.0], [2.0, -1.0]], torch.eye(2).expand(2, 2, 2), GaussianMNM(1.0, 4))
    return {"gmm": (gmm, (2,)), "unet": (unet.eval(), (1, 8, 8))}


@pytest.mark.parametrize("name", ["gmm", "unet"])
@pytest.mark.parametrize("micro_batch", [None, 64])
def test_engine_on_cuda_equals_itself_across_a_restore(name, micro_batch):
    """40 steps in one go == 20 steps, state_dict, a fresh engine, 20 steps: bitwise on the GPU
    (the restored engine adopts the micro-batch the state was computed with)."""
    model, shape = _models()[name]
    model = model.to(CUDA)
    cfg = SamplerConfig(block_size=64, jump_every=5)
    blocks = [0, 1, 2, 3]
    whole = WalkJumpEngine(model, cfg, shape, 7, blocks, CUDA, micro_batch=micro_batch)
    whole.initialize()
    ref = whole.run_collect(40)
    first = WalkJumpEngine(model, cfg, shape, 7, blocks, CUDA, micro_batch=micro_batch)
    first.initialize()
    a = first.run_collect(20)
    second = WalkJumpEngine(model, cfg, shape, 7, blocks, CUDA)
    second.load_state_dict(first.state_dict())
    assert second.micro_batch == micro_batch
    got = JumpBatch.cat([a, second.run_collect(20)])
    assert all(torch.equal(x, y) for x, y in zip(got, ref))
    assert torch.equal(second.state.y, whole.state.y)


def test_bf16_sampling_moments_on_the_gaussian_oracle():
    """Under bf16 autocast the jumps keep the law of the float32 chains driven by the same noise:
    mean and variance per coordinate within 2% (bf16 rounds to 2^-8 relative per evaluation; the
    walk contracts, so the errors stay of that order), and the float32 variance within 20% of the
    stationary jump variance of THEORY section 6 (the discretization bias at this delta is a few %)."""
    M, sigma = 4, 1.0
    lam = torch.tensor([1.0, 0.25], dtype=torch.float64)
    mu = torch.tensor([0.5, -0.5], dtype=torch.float64)
    oracle = GaussianOracle(mu, torch.diag(lam), GaussianMNM(sigma, M)).float().to(CUDA)
    cfg = SamplerConfig(block_size=1024, jump_every=50, init="zeros", gamma=1.0)
    draws = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        eng = WalkJumpEngine(oracle, cfg, (2,), 7, range(4), CUDA, autocast_dtype=dtype)
        eng.initialize()
        list(eng.run(600))
        draws[name] = torch.cat([jb.xhat.double() for jb in eng.run(400)])
    s2 = sigma ** 2 / M
    for i, l in enumerate(lam.tolist()):
        gain = l / (l + s2)
        v32, v16 = draws["fp32"][:, i].var().item(), draws["bf16"][:, i].var().item()
        assert abs(v16 / v32 - 1) < 0.02, (i, v16, v32)
        assert abs(draws["bf16"][:, i].mean().item() - draws["fp32"][:, i].mean().item()) < 0.02
        assert abs(v32 / (gain ** 2 * (l + s2)) - 1) < 0.2
