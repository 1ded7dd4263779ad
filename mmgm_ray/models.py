"""Score models with one interface (THEORY sections 2-3).

Every model exposes, for measurements y of shape (B, M, *event_shape):

- ``score(y) -> ScoreOutput(psi, xhat)``: the per-channel score psi_m = grad_{y_m} log p(y) and the
  jump xhat(y) (B, *event_shape), from one network evaluation;
- ``loss(x, generator)``: the training objective on a clean batch x (B, *event_shape);
- ``universal``: True when the score depends on y only through ybar (USSF). Universal models also
  expose ``denoise(ybar)`` and ``reduced_score(ybar)``, which is all the exact reduced walk needs.

Learned models wrap any ``torch.nn.Module``; the closed-form oracles in ``mmgm_ray.oracles`` share
this interface, so samplers, diagnostics and the pool are tested with no training.
"""
from __future__ import annotations

import abc
import math

import torch
from torch import nn

from mmgm_ray.integrators import ScoreOutput
from mmgm_ray.noise import GaussianMNM


def _check_y(y: torch.Tensor, M: int, event_shape: tuple[int, ...] | None) -> None:
    if y.dim() < 3 or y.shape[1] != M:
        raise ValueError(f"y must have shape (B, M={M}, *event_shape), got {tuple(y.shape)}")
    if event_shape is not None and tuple(y.shape[2:]) != tuple(event_shape):
        raise ValueError(f"y event shape {tuple(y.shape[2:])} does not match the model's {tuple(event_shape)}")


def _sq_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the per-example squared error summed over event dims / dim (per-pixel MSE)."""
    return (a - b).float().pow(2).flatten(1).mean(1).mean()


class ScoreModel(nn.Module, abc.ABC):
    """Base class: a Gaussian MNM plus the parametrization of its score."""

    universal: bool = False

    def __init__(self, noise: GaussianMNM, event_shape: tuple[int, ...] | None = None):
        super().__init__()
        if not isinstance(noise, GaussianMNM):
            raise ValueError(f"noise must be a GaussianMNM, got {type(noise).__name__}")
        self.noise = noise
        self.event_shape = tuple(event_shape) if event_shape is not None else None

    @property
    def sigma(self) -> float:
        return self.noise.sigma

    @property
    def M(self) -> int:
        return self.noise.M

    @abc.abstractmethod
    def score(self, y: torch.Tensor) -> ScoreOutput:
        """Per-channel score psi (B, M, *event) and jump xhat (B, *event) from one evaluation."""

    def jump(self, y: torch.Tensor) -> torch.Tensor:
        """xhat(y) = E[X | Y = y]."""
        return self.score(y).xhat

    @abc.abstractmethod
    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training objective on a clean batch x (B, *event)."""


class UniversalScoreModel(ScoreModel):
    """A model whose score depends on y only through ybar (THEORY section 2).

    Subclasses implement ``denoise(ybar)``; score, reduced score and loss follow from it.
    """

    universal = True

    @abc.abstractmethod
    def denoise(self, ybar: torch.Tensor) -> torch.Tensor:
        """g(ybar) = E[X | ybar] (B, *event)."""

    def reduced_score(self, ybar: torch.Tensor) -> ScoreOutput:
        """psi_bar = (g(ybar) - ybar) / sigma^2 for the exact reduced walk (THEORY section 5)."""
        xhat = self.denoise(ybar)
        return ScoreOutput((xhat - ybar) / self.sigma ** 2, xhat)

    def score(self, y: torch.Tensor) -> ScoreOutput:
        """score_m(y) = (g(ybar) - y_m) / sigma^2, one evaluation of g whatever M is."""
        _check_y(y, self.M, self.event_shape)
        xhat = self.denoise(y.mean(1))
        return ScoreOutput((xhat.unsqueeze(1) - y) / self.sigma ** 2, xhat)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """E |X - g(X + sigma_eff eps)|^2 (ybar has exactly this law)."""
        ybar = self.noise.sample_ybar(x, generator)
        return _sq_err(self.denoise(ybar), x)


class UniversalDenoiser(UniversalScoreModel):
    """USSF's universal parametrization (THEORY section 2): one learned denoiser g at sigma_eff.

    score_m(y) = (g(ybar) - y_m) / sigma^2 and xhat = g(ybar). With ``precond="edm"`` the network
    output is combined as g(ybar) = c_skip ybar + c_out net(c_in ybar) (Karras et al. 2022, at the
    single level sigma_eff), which keeps the network's input and target at unit scale.
    """

    def __init__(self, net: nn.Module, noise: GaussianMNM, event_shape: tuple[int, ...] | None = None,
                 precond: str = "edm", sigma_data: float = 0.5):
        super().__init__(noise, event_shape)
        if precond not in ("edm", "none"):
            raise ValueError(f"precond must be 'edm' or 'none', got {precond!r}")
        self.net = net
        self.precond = precond
        s, sd = noise.sigma_eff, float(sigma_data)
        self.c_in = 1.0 / math.sqrt(s * s + sd * sd) if precond == "edm" else 1.0
        self.c_skip = sd * sd / (s * s + sd * sd) if precond == "edm" else 0.0
        self.c_out = s * sd / math.sqrt(s * s + sd * sd) if precond == "edm" else 1.0

    def denoise(self, ybar: torch.Tensor) -> torch.Tensor:
        """g(ybar) = E[X | ybar], the jump (B, *event_shape)."""
        out = self.net(self.c_in * ybar).to(ybar.dtype)
        return self.c_skip * ybar + self.c_out * out if self.precond == "edm" else out


class MDAE(ScoreModel):
    """Multidenoising autoencoder (MMGM, THEORY section 3).

    nu: R^{Md} -> R^{Md} with the M measurements stacked as channels (B, M*C, H, W) or (B, M*d).
    score_m = (nu(y)_m - y_m) / sigma^2, xhat = mean_m nu(y)_m. MMGM's code scales the input by
    1/sqrt(0.225^2 + sigma^2) and uses a sigmoid output for data in [0, 1]; both are options.
    """

    def __init__(self, net: nn.Module, noise: GaussianMNM, event_shape: tuple[int, ...] | None = None,
                 input_scaling: bool = True, sigmoid_output: bool = False):
        super().__init__(noise, event_shape)
        self.net = net
        self.c_in = 1.0 / math.sqrt(0.225 ** 2 + noise.sigma ** 2) if input_scaling else 1.0
        self.sigmoid_output = sigmoid_output

    def nu(self, y: torch.Tensor) -> torch.Tensor:
        """Network output per channel, (B, M, *event_shape)."""
        out = self.net(self.c_in * y.flatten(1, 2)).to(y.dtype)
        if self.sigmoid_output:
            out = torch.sigmoid(out)
        return out.unflatten(1, (self.M, y.shape[2]))

    def score(self, y: torch.Tensor) -> ScoreOutput:
        _check_y(y, self.M, self.event_shape)
        nu = self.nu(y)
        return ScoreOutput((nu - y) / self.sigma ** 2, nu.mean(1))

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean_m |x - nu(y)_m|^2."""
        y = self.noise.sample(x, generator)
        return _sq_err(self.nu(y).flatten(0, 1), x.unsqueeze(1).expand_as(y).flatten(0, 1))


class MEM2(ScoreModel):
    """Multimeasurement energy model MEM^2 (MMGM, THEORY section 3).

    Energy f(y) = |y - nu(y)|^2 / (2 sigma^2); psi = -grad f by autograd (create_graph while
    training); xhat_m = y_m + sigma^2 psi_m; the jump is mean_m xhat_m. A sampling step costs a
    forward and a backward pass.
    """

    def __init__(self, net: nn.Module, noise: GaussianMNM, event_shape: tuple[int, ...] | None = None,
                 input_scaling: bool = True):
        super().__init__(noise, event_shape)
        self.net = net
        self.c_in = 1.0 / math.sqrt(0.225 ** 2 + noise.sigma ** 2) if input_scaling else 1.0

    def energy(self, y: torch.Tensor) -> torch.Tensor:
        """f(y) per example, (B,)."""
        nu = self.net(self.c_in * y.flatten(1, 2)).to(y.dtype).unflatten(1, (self.M, y.shape[2]))
        return (y - nu).pow(2).flatten(1).sum(1) / (2.0 * self.sigma ** 2)

    def _score(self, y: torch.Tensor, create_graph: bool) -> ScoreOutput:
        with torch.enable_grad():
            yg = y if create_graph else y.detach()
            if not yg.requires_grad:
                yg = yg.requires_grad_(True)
            f = self.energy(yg).sum()
            (grad,) = torch.autograd.grad(f, yg, create_graph=create_graph)
        psi = -grad if create_graph else -grad.detach()
        xhat_m = y + self.sigma ** 2 * psi
        return ScoreOutput(psi, xhat_m.mean(1))

    def score(self, y: torch.Tensor) -> ScoreOutput:
        _check_y(y, self.M, self.event_shape)
        return self._score(y, create_graph=False)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean_m |x - xhat_m(y)|^2 with xhat_m from the energy's gradient (double backprop)."""
        y = self.noise.sample(x, generator).requires_grad_(True)
        psi = self._score(y, create_graph=True).psi
        xhat_m = y + self.sigma ** 2 * psi
        return _sq_err(xhat_m.flatten(0, 1), x.unsqueeze(1).expand_as(y).flatten(0, 1))
