"""Apply a learned Bayes estimator xhat(y) = E[X | Y = y] to a data set (THEORY sections 1-3).

Every trained model maps M measurements y (N, M, *event) to xhat (N, *event) with ``model.jump``:
the Gaussian MNM models (universal, MDAE, MEM^2, MUVB) through Tweedie's formula, the Poisson
energy model (``PoissonMEM2``) through Robbins'. ``denoise`` applies it in batches;
``evaluate_denoiser`` draws the measurements of clean data itself (seeded) and reports the mean
squared error next to the identity estimator's (mean_m y_m: the maximum-likelihood estimate under
both MNMs) and, when an oracle posterior mean is given, the Bayes risk.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def denoise(model, y: torch.Tensor, batch_size: int = 64,
            device: Optional[str | torch.device] = None) -> torch.Tensor:
    """xhat = model.jump(y) for measurements y (N, M, *event), in batches; returns (N, *event) on the CPU.

    ``batch_size`` bounds memory: the Poisson model evaluates its energy at B * M * d + B points per
    batch of B. Energy models take their gradient inside ``jump``; nothing else keeps a graph.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if y.dim() < 3 or y.shape[1] != model.M:
        raise ValueError(f"y must be (N, M={model.M}, *event_shape), got {tuple(y.shape)}")
    if device is None:  # the model's device (an oracle has no parameters: the CPU)
        device = next(iter(model.parameters()), torch.empty(0)).device
    dev = torch.device(device)
    out = []
    with torch.no_grad():
        for start in range(0, y.shape[0], batch_size):
            out.append(model.jump(y[start:start + batch_size].to(dev, torch.float32)).float().cpu())
    return torch.cat(out)


def measure_and_denoise(model, x: torch.Tensor, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Measure clean data x (N, *event) with the model's MNM and return the estimates xhat (N, *event);
    the measurements are the ones :func:`evaluate_denoiser` draws for the same seed and batch size."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.cat([denoise(model, model.noise.sample(x[s:s + batch_size].float(), g), batch_size)
                      for s in range(0, x.shape[0], batch_size)])


def evaluate_denoiser(model, x: torch.Tensor, seed: int = 0, batch_size: int = 64,
                      oracle: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """Measure clean data x (N, *event) with the model's MNM, denoise, and score against x.

    Returns {"n", "mse", "mse_identity", and with ``oracle`` (y -> E[X | y], e.g.
    ``GammaPoissonOracle.posterior_mean``) "mse_oracle" and "ratio_to_oracle"}; MSE is per
    coordinate. The measurements are drawn batch by batch from one generator seeded with ``seed``
    (same seed and batch size, same measurements).
    """
    g = torch.Generator().manual_seed(int(seed))
    sums = {"mse": 0.0, "mse_identity": 0.0, "mse_oracle": 0.0}
    n = 0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].float()
        yb = model.noise.sample(xb, g)
        per = xb[0].numel()
        sums["mse"] += (denoise(model, yb, batch_size) - xb).pow(2).sum().item() / per
        sums["mse_identity"] += (yb.mean(1) - xb).pow(2).sum().item() / per
        if oracle is not None:
            sums["mse_oracle"] += (oracle(yb).float() - xb).pow(2).sum().item() / per
        n += xb.shape[0]
    if n == 0:
        raise ValueError("x is empty")
    report = {"n": n, "mse": sums["mse"] / n, "mse_identity": sums["mse_identity"] / n}
    if oracle is not None:
        report["mse_oracle"] = sums["mse_oracle"] / n
        report["ratio_to_oracle"] = report["mse"] / report["mse_oracle"]
    return report
