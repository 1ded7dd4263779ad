"""Denoiser networks: a U-Net for images and an MLP for vectors, both shape-preserving.

``build_net(cfg, event_shape, in_mult)`` maps (B, in_mult*C, H, W) -> same shape, or
(B, in_mult*d) -> same shape. ``in_mult`` is M for MDAE / MEM^2 (the M measurements stacked as
channels, THEORY section 3) and 1 for the universal denoiser (section 2). The modules use only
plain convs, GroupNorm, SiLU, nearest interpolation and scaled_dot_product_attention, so they run
under torch.autocast(bfloat16), torch.compile and channels_last.
"""
from __future__ import annotations


from torch import nn

from .mlp import MLP, FlatMLP
from .unet import ATTENTION_KERNELS, UNet, norm_groups

__all__ = ["build_net", "ATTENTION_KERNELS", "UNet", "MLP", "FlatMLP", "norm_groups", "count_parameters"]


def build_net(cfg, event_shape: tuple, in_mult: int = 1, attention: str = "fused") -> nn.Module:
    """Build the network a ``NetConfig`` describes for events of ``event_shape``.

    arch='auto' picks the U-Net for (C, H, W) events and the MLP for (d,) events; 'unet' on vectors
    is an error; 'mlp' on images flattens them. ``attention``: the U-Net's attention kernels
    (``unet.ATTENTION_KERNELS``; "math" when the model is trained through a double backward).
    """
    if hasattr(cfg, "validate"):
        cfg.validate()
    shape = tuple(int(s) for s in event_shape)
    if in_mult < 1:
        raise ValueError(f"in_mult must be >= 1, got {in_mult}")
    if len(shape) not in (1, 3):
        raise ValueError(f"event_shape must be (C, H, W) or (d,), got {shape}")
    arch = cfg.arch if cfg.arch != "auto" else ("unet" if len(shape) == 3 else "mlp")
    if arch == "unet":
        if len(shape) != 3:
            raise ValueError(f"net.arch='unet' needs image events (C, H, W), got {shape}; use 'mlp'")
        c, h, _ = shape
        return UNet(in_mult * c, in_mult * c, channels=cfg.channels, channel_mult=list(cfg.channel_mult),
                    num_res_blocks=cfg.num_res_blocks, attn_resolutions=list(cfg.attn_resolutions),
                    dropout=cfg.dropout, mid_attn=cfg.mid_attn, resolution=h, zero_init_out=cfg.zero_init_out,
                    attention=attention)
    if len(shape) == 1:
        return MLP(in_mult * shape[0], cfg.hidden, cfg.depth, cfg.zero_init_out)
    return FlatMLP((in_mult * shape[0],) + shape[1:], cfg.hidden, cfg.depth, cfg.zero_init_out)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
