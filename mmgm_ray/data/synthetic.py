"""Synthetic data with known densities: the Gaussian mixture whose oracle denoiser is closed-form."""
from __future__ import annotations

import torch

from .base import ImageDataset


def gmm_parameters(components: int, dim: int, seed: int) -> dict:
    """Mixture parameters, a pure function of (components, dim, seed).

    Means uniform in [-4, 4]^d; covariances A A^T / d * 0.25 + 0.05 I (random orientations, SPD,
    well separated from the means' spread); weights uniform in [0.5, 1.5], normalised. Drawn in
    float64 on a private torch.Generator, then returned as float32.
    """
    g = torch.Generator().manual_seed(int(seed))
    means = (torch.rand(components, dim, generator=g, dtype=torch.float64) * 8.0 - 4.0)
    a = torch.randn(components, dim, dim, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) / dim * 0.25 + 0.05 * torch.eye(dim, dtype=torch.float64)
    w = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
    return {"means": means.float(), "covs": covs.float(), "weights": (w / w.sum()).float()}


def make_gmm(components: int = 4, dim: int = 2, samples: int = 20000, seed: int = 0) -> ImageDataset:
    """``samples`` draws from the mixture; labels are the component indices; ``.gmm`` its parameters."""
    if components < 1 or dim < 1 or samples < 1:
        raise ValueError("gmm: components, dim and samples must be >= 1")
    params = gmm_parameters(components, dim, seed)
    # a second stream for the draws so changing `samples` keeps the parameters identical
    g = torch.Generator().manual_seed(int(seed) + 0x9E3779B1)
    k = torch.multinomial(params["weights"].double(), samples, replacement=True, generator=g)
    chol = torch.linalg.cholesky(params["covs"].double())
    z = torch.randn(samples, dim, generator=g, dtype=torch.float64)
    x = params["means"].double()[k] + torch.einsum("nij,nj->ni", chol[k], z)
    src = f"synthetic:gmm(components={components},dim={dim},samples={samples},seed={seed})"
    return ImageDataset("gmm", x.float(), k.long(), (dim,), src, gmm=params)
