"""Tests for mmgm_ray.nets: shapes, width scaling, trainability, bf16 autocast, channels_last."""
from __future__ import annotations

import pytest
import torch

from mmgm_ray.config import DataConfig, NetConfig, from_dict
from mmgm_ray.data import load_dataset
from mmgm_ray.nets import MLP, UNet, build_net, count_parameters, norm_groups
from mmgm_ray.nets.unet import SelfAttention


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core box OpenMP spin-waits
    make a 2-thread step ~10x slower than a 1-thread one; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _n_attn(net):
    return sum(isinstance(m, SelfAttention) for m in net.modules())


@pytest.mark.parametrize("shape,mult,attn,in_mult", [
    ((1, 8, 8), [1, 2], [4], 1),
    ((1, 28, 28), [1, 2, 2], [7], 4),       # 28 -> 14 -> 7, attention at 7x7
    ((1, 28, 28), [1, 1, 2, 2], [], 1),     # 28 -> 14 -> 7 -> 4: odd sizes come back as 7, 14, 28
    ((3, 32, 32), [1, 2, 2], [16], 2),
])
def test_unet_shapes(shape, mult, attn, in_mult):
    torch.manual_seed(0)
    cfg = NetConfig(channels=8, channel_mult=mult, attn_resolutions=attn, zero_init_out=False)
    net = build_net(cfg, shape, in_mult=in_mult)
    assert isinstance(net, UNet)
    x = torch.randn(2, in_mult * shape[0], *shape[1:])
    y = net(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # one attention per encoder block and (num_res_blocks + 1) per decoder block at that level, + mid
    assert _n_attn(net) == (3 if attn else 0) + 1


def test_mlp_shapes_and_auto_arch():
    cfg = NetConfig(hidden=32, depth=2)
    net = build_net(cfg, (5,), in_mult=3)
    assert isinstance(net, MLP)
    x = torch.randn(7, 15)
    assert net(x).shape == (7, 15)
    assert sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == 3  # depth hidden + output
    img = build_net(NetConfig(arch="mlp", hidden=16, depth=1), (1, 8, 8), in_mult=2)
    assert img(torch.randn(3, 2, 8, 8)).shape == (3, 2, 8, 8)
    with pytest.raises(ValueError, match="unet"):
        build_net(NetConfig(arch="unet"), (5,))


def test_zero_init_output():
    x = torch.randn(2, 1, 8, 8)
    net = build_net(NetConfig(channels=8), (1, 8, 8))
    assert torch.count_nonzero(net(x)) == 0  # starts at 0 for every input
    net = build_net(NetConfig(channels=8, zero_init_out=False), (1, 8, 8))
    assert torch.count_nonzero(net(x)) > 0


def test_parameter_count_scales_with_width():
    """Convs dominate and have ch_in * ch_out weights, so doubling the width ~quadruples the count."""
    small = count_parameters(build_net(NetConfig(channels=16), (1, 28, 28)))
    big = count_parameters(build_net(NetConfig(channels=32), (1, 28, 28)))
    assert 3.5 < big / small < 4.1
    m1 = count_parameters(build_net(NetConfig(hidden=64), (4,)))
    m2 = count_parameters(build_net(NetConfig(hidden=128), (4,)))
    assert 3.0 < m2 / m1 < 4.1


def test_norm_groups_divide():
    for ch in (1, 3, 8, 12, 48, 64, 96, 100):
        g = norm_groups(ch)
        assert ch % g == 0 and g <= 32
    assert norm_groups(64) == 32 and norm_groups(48) == 24


@pytest.mark.parametrize("arch", ["unet", "mlp"])
def test_training_reduces_denoising_loss(arch):
    """A few Adam steps on a fixed tiny batch must cut the denoising loss and keep gradients finite."""
    torch.manual_seed(0)
    if arch == "unet":
        x = load_dataset(DataConfig(limit=16)).x
        net = build_net(NetConfig(channels=8, channel_mult=[1, 2], attn_resolutions=[4]), (1, 8, 8))
    else:
        x = load_dataset(DataConfig(name="gmm", gmm_samples=64)).x
        net = build_net(NetConfig(hidden=64, depth=2), (2,))
    y = x + 0.3 * torch.randn_like(x)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = ((net(y) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::4]
    # better than the best constant output (loss = Var x): the net uses its input, it does not just
    # learn the data mean
    assert losses[-1] < 0.5 * x.var(dim=0, unbiased=False).mean().item(), losses[::4]


def test_bf16_autocast_cpu_and_channels_last():
    torch.manual_seed(0)
    cfg = NetConfig(channels=16, channel_mult=[1, 2], attn_resolutions=[4], zero_init_out=False)
    net = build_net(cfg, (1, 8, 8), in_mult=2).eval()
    x = torch.rand(4, 2, 8, 8)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
        assert low.dtype == torch.bfloat16 and low.shape == x.shape
        assert torch.isfinite(low.float()).all()
        assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3  # bf16 has ~3 digits
        cl_net = build_net(cfg, (1, 8, 8), in_mult=2).eval()
        cl_net.load_state_dict(net.state_dict())
        cl_net = cl_net.to(memory_format=torch.channels_last)
        out = cl_net(x.contiguous(memory_format=torch.channels_last))
        assert out.shape == x.shape and torch.allclose(out, ref, atol=1e-5)


def test_netconfig_validation():
    with pytest.raises(ValueError, match="channel_mult"):
        from_dict(NetConfig, {"channel_mult": []})
    with pytest.raises(ValueError, match="not one of"):
        from_dict(NetConfig, {"arch": "transformer"})
    assert from_dict(NetConfig, {"arch": "unet", "attn_resolutions": [7]}).attn_resolutions == [7]
