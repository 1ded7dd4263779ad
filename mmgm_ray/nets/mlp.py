"""MLP denoiser for vector data (and, flattened, for images when asked for explicitly)."""
from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """(B, dim) -> (B, dim): Linear-SiLU x depth, then a linear output (zero-initialised by default,
    for the same reason as the U-Net: the untrained net outputs 0 for every input)."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, zero_init_out: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        if zero_init_out:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class FlatMLP(nn.Module):
    """An MLP on flattened (B, C, H, W) events, reshaped back (arch='mlp' for image data)."""

    def __init__(self, shape: tuple, hidden: int, depth: int, zero_init_out: bool = True):
        super().__init__()
        self.shape = tuple(shape)
        self.mlp = MLP(math.prod(self.shape), hidden, depth, zero_init_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.flatten(1)).reshape(x.shape)
