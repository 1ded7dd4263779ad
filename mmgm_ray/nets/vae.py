"""The small VAE behind MUVB (THEORY section 3): an encoder over the M stacked measurements and a
decoder into the clean space, both MLPs on flattened events.

One ``forward(t, eps)`` returns everything the ELBO needs, so a DDP wrapper sees exactly one
forward per energy evaluation (its gradient hooks are tied to the wrapper's forward).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with SiLU between them (smooth: the energy's gradient drives the Langevin walk)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """q(z | y) = N(mu(t), diag exp(logvar(t))) over the stacked measurements t = c_in * y (B, M*d);
    decoder d: R^latent -> clean space (B, *event_shape).

    ``forward(t, eps)`` with ``eps`` (K, latent) reparametrization draws returns (mu, logvar, dec),
    dec = d(mu + exp(logvar / 2) * eps_k) of shape (B, K, *event_shape). The log-variance head and
    the decoder's output layer start at zero (s = 1, d(z) = 0 for every z), like the other nets'
    zero-initialised outputs.
    """

    def __init__(self, in_dim: int, event_shape: tuple[int, ...], latent_dim: int = 16,
                 hidden: int = 256, depth: int = 2):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.latent_dim = int(latent_dim)
        out_dim = math.prod(self.event_shape)
        self.encoder = _mlp([in_dim] + [hidden] * depth + [2 * latent_dim])
        self.decoder = _mlp([latent_dim] + [hidden] * depth + [out_dim])
        head = self.encoder[-1]
        with torch.no_grad():  # the log-variance half of the encoder's last layer
            head.weight[latent_dim:].zero_()
            head.bias[latent_dim:].zero_()
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def forward(self, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(t.flatten(1)).chunk(2, dim=1)
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps.to(mu.dtype)   # (B, K, latent)
        dec = self.decoder(z)
        return mu, logvar, dec.reshape(t.shape[0], eps.shape[0], *self.event_shape)
