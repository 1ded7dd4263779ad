"""U-Net for single-noise-level denoisers (no time embedding: the noise level is fixed per model)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

#: ``scaled_dot_product_attention`` kernels a U-Net may use, by what its model needs. The fused
#: kernels (flash, memory-efficient; in order of preference) keep O(B heads HW) memory where the
#: math kernel materializes the (B, heads, HW, HW) scores, but they have no double backward, which
#: MEM^2 training needs: its loss differentiates the score, itself a gradient of the energy
#: (THEORY section 3; ``create_graph=True``). The math kernel stays in "fused" as the fallback
#: for inputs no fused kernel takes (e.g. float32 on CUDA for flash).
ATTENTION_KERNELS: dict[str, tuple[SDPBackend, ...]] = {
    "fused": (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    "math": (SDPBackend.MATH,),
}


def norm_groups(ch: int, max_groups: int = 32) -> int:
    """Largest group count <= max_groups that divides ``ch`` (GroupNorm needs ch % groups == 0)."""
    for g in range(min(max_groups, ch), 0, -1):
        if ch % g == 0:
            return g
    return 1


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(ch), ch, eps=1e-6)


def zero_(m: nn.Module) -> nn.Module:
    """Zero a layer's parameters so the residual branch (or the output) starts at zero."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual; the second conv starts at zero so the block
    starts as the identity (stable early training for deep stacks)."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), zero_(nn.Conv2d(cout, cout, 3, padding=1))
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions (scaled_dot_product_attention), residual.

    ``kernels``: a key of :data:`ATTENTION_KERNELS`, the kernels the attention may run on.
    """

    def __init__(self, ch: int, head_dim: int = 32, kernels: str = "fused"):
        super().__init__()
        if kernels not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernels must be one of {sorted(ATTENTION_KERNELS)}, got {kernels!r}")
        heads = max(1, ch // head_dim)
        while ch % heads:
            heads -= 1
        self.heads = heads
        self.kernels = kernels
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_(nn.Conv2d(ch, ch, 1))

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as contiguous (B, heads, HW, head_dim) tensors: the fused kernels need the last
        (head) dimension at stride 1 and refuse the strided views of the conv's channel layout."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        return qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_heads(x)
        with sdpa_kernel(list(ATTENTION_KERNELS[self.kernels])):
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; odd sizes round up (7 -> 4)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to the skip's exact size, then a 3x3 conv. Resizing to the skip size
    (not a fixed factor 2) is what makes odd sizes such as 28 -> 14 -> 7 -> 4 come back as 7."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class UNet(nn.Module):
    """Maps (B, in_channels, H, W) to (B, out_channels, H, W) for any H, W >= 1.

    Levels i = 0..L-1 have width channels * channel_mult[i]; each level has ``num_res_blocks``
    residual blocks (plus self-attention where the feature height is in ``attn_resolutions``) and all
    but the last end in a stride-2 downsample. The decoder mirrors it with one more block per level,
    each fed the matching encoder activation by concatenation. The output conv is zero-initialised
    by default: the untrained net outputs 0 for every input, so wrappers that add a skip
    (x_hat = y + net) start at the identity and sigmoid outputs start at 1/2, instead of at a random
    function of an input that may be far outside [0, 1]. ``attention`` picks the attention kernels
    (:data:`ATTENTION_KERNELS`): "math" for models trained through a double backward (MEM^2).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, mid_attn: bool = True,
                 resolution: int = 32, zero_init_out: bool = True, attention: str = "fused"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        attn = set(int(r) for r in attn_resolutions)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        # encoder; `res` tracks the feature height (ceil division, like the stride-2 convs)
        self.down = nn.ModuleList()
        skip_ch = [channels]
        ch, res = channels, resolution
        level_res = []
        for i, mult in enumerate(channel_mult):
            level_res.append(res)
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, channels * mult, dropout)]
                ch = channels * mult
                if res in attn:
                    blocks.append(SelfAttention(ch, kernels=attention))
                self.down.append(nn.ModuleList(blocks))
                skip_ch.append(ch)
            if i != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_ch.append(ch)
                res = (res + 1) // 2

        self.mid = nn.ModuleList([ResBlock(ch, ch, dropout)] + ([SelfAttention(ch, kernels=attention)] if mid_attn else [])
                                 + [ResBlock(ch, ch, dropout)])

        # decoder
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skip_ch.pop(), channels * mult, dropout)]
                ch = channels * mult
                if level_res[i] in attn:
                    blocks.append(SelfAttention(ch, kernels=attention))
                self.up.append(nn.ModuleList(blocks))
            if i != 0:
                self.up.append(Upsample(ch))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        if zero_init_out:
            zero_(self.conv_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, Downsample):
                h = layer(h)
            else:
                for blk in layer:
                    h = blk(h)
            skips.append(h)
        for blk in self.mid:
            h = blk(h)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h, skips[-1].shape[-2:])
            else:
                h = torch.cat([h, skips.pop()], dim=1)
                for blk in layer:
                    h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))
