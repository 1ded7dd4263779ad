"""Multimeasurement noise models (THEORY section 1).

Shapes: a clean batch x is (B, *event_shape); measurements y are (B, M, *event_shape).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from mmgm_ray.validators import positive as check_positive


def check_M(M: int) -> int:
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise ValueError(f"M must be an integer >= 1, got {M!r}")
    return M


@dataclass(frozen=True)
class GaussianMNM:
    """Y_m = X + sigma * N_m, m = 1..M (THEORY section 1).

    ``sigma_eff = sigma / sqrt(M)`` is the noise level of ybar = mean_m y_m (THEORY section 2).
    """
    sigma: float
    M: int

    def __post_init__(self):
        object.__setattr__(self, "sigma", check_positive("sigma", self.sigma))
        object.__setattr__(self, "M", check_M(self.M))

    @property
    def sigma_eff(self) -> float:
        return self.sigma / math.sqrt(self.M)

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw y (B, M, *event) given x (B, *event)."""
        eps = torch.randn((x.shape[0], self.M, *x.shape[1:]), generator=generator,
                          device=x.device, dtype=x.dtype)
        return x.unsqueeze(1) + self.sigma * eps

    def sample_ybar(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ybar = x + sigma_eff * eps directly (same law as mean_m of ``sample``)."""
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + self.sigma_eff * eps


@dataclass(frozen=True)
class PoissonMNM:
    """Y_{m,i} | x ~ Poisson(x_i), x >= 0 (THEORY section 1)."""
    M: int

    def __post_init__(self):
        object.__setattr__(self, "M", check_M(self.M))

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw integer counts y (B, M, *event) given rates x (B, *event) >= 0."""
        if (x < 0).any():
            raise ValueError("Poisson MNM needs x >= 0")
        rates = x.unsqueeze(1).expand(x.shape[0], self.M, *x.shape[1:])
        return torch.poisson(rates.contiguous(), generator=generator)

    @staticmethod
    def robbins_estimate(log_p: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Robbins' estimator E[X_i | y] = (y_{m,i} + 1) p(y + e_{m,i}) / p(y), for every (m, i).

        ``log_p`` maps counts (B, M, d) to an *unnormalized* log-density (B,); the normalizer cancels.
        Returns (B, M, d): one estimate of each coordinate per channel m (all equal in exact arithmetic).
        """
        if y.dim() != 3:
            raise ValueError(f"y must be (B, M, d) counts, got shape {tuple(y.shape)}")
        B, M, d = y.shape
        base = log_p(y)                                            # (B,)
        eye = torch.eye(M * d, dtype=y.dtype, device=y.device).reshape(M * d, M, d)
        shifted = (y.unsqueeze(1) + eye.unsqueeze(0)).reshape(B * M * d, M, d)
        up = log_p(shifted).reshape(B, M, d)                       # log p(y + e_{m,i})
        return (y + 1) * torch.exp(up - base[:, None, None])
