"""Score models with one interface (THEORY sections 2-3).

Every model exposes, for measurements y of shape (B, M, *event_shape):

- ``score(y) -> ScoreOutput(psi, xhat)``: the per-channel score psi_m = grad_{y_m} log p(y) and the
  jump xhat(y) (B, *event_shape), from one network evaluation;
- ``loss(x, generator)``: the training objective on a clean batch x (B, *event_shape);
- ``universal``: True when the score depends on y only through ybar (USSF). Universal models also
  expose ``denoise(ybar)`` and ``reduced_score(ybar)``, which is all the exact reduced walk needs.

Learned models wrap any ``torch.nn.Module``; the closed-form oracles in ``mmgm_ray.oracles`` share
this interface, so samplers, diagnostics and the pool are tested with no training.

Gaussian MNM parametrizations: ``UniversalDenoiser`` (USSF), ``MDAE``, and the energy models
``MEM2`` and ``MUVB`` (``EnergyScoreModel``: score = -grad f by autograd). ``PoissonMEM2`` models a
Poisson M-density through Robbins' estimator: it has ``loss`` and ``jump`` (the Bayes estimate)
but no score, and ``samplable = False`` (walk-jump sampling is for Gaussian MNMs only).
"""
from __future__ import annotations

import abc
import math

import torch
from torch import nn

from mmgm_ray.integrators import ScoreOutput
from mmgm_ray.noise import GaussianMNM, PoissonMNM


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
    samplable: bool = True   # walk-jump sampling applies (a score exists)

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


class EnergyScoreModel(ScoreModel):
    """A model of the M-density through an energy f(y) = -log p(y) + const (THEORY section 3).

    psi = -grad_y f by autograd; xhat_m = y_m + sigma^2 psi_m (Tweedie, THEORY section 1); the jump
    is mean_m xhat_m. Training minimizes mean_m |x - xhat_m(y)|^2 with the gradient built with
    ``create_graph`` (double backprop). A sampling step costs a forward and a backward pass.
    Subclasses implement ``energy``.
    """

    @abc.abstractmethod
    def energy(self, y: torch.Tensor) -> torch.Tensor:
        """f(y) per example, (B,)."""

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


class MEM2(EnergyScoreModel):
    """Multimeasurement energy model MEM^2 (MMGM, THEORY section 3): f(y) = |y - nu(y)|^2 / (2 sigma^2)."""

    def __init__(self, net: nn.Module, noise: GaussianMNM, event_shape: tuple[int, ...] | None = None,
                 input_scaling: bool = True):
        super().__init__(noise, event_shape)
        self.net = net
        self.c_in = 1.0 / math.sqrt(0.225 ** 2 + noise.sigma ** 2) if input_scaling else 1.0

    def energy(self, y: torch.Tensor) -> torch.Tensor:
        """f(y) per example, (B,)."""
        nu = self.net(self.c_in * y.flatten(1, 2)).to(y.dtype).unflatten(1, (self.M, y.shape[2]))
        return (y - nu).pow(2).flatten(1).sum(1) / (2.0 * self.sigma ** 2)


class MUVB(EnergyScoreModel):
    """Multimeasurement unnormalized variational Bayes (MMGM, after Saremi's UVB; THEORY section 3).

    A latent variable model of the M-density: z ~ N(0, I), y_m | z ~ N(d(z), sigma^2 I) i.i.d. (the
    decoder maps into the clean space and the MNM kernel is the likelihood), and an encoder
    q(z | y) = N(mu(y), diag s(y)^2) over all M measurements (``mmgm_ray.nets.vae.VAE``). The
    energy is the negative ELBO,

        f(y) = (1/K) sum_k sum_m |y_m - d(z_k)|^2 / (2 sigma^2) + KL(q(z | y) || N(0, I)),
        z_k = mu(y) + s(y) * eps_k,

    and score, jump and loss follow from it as for every ``EnergyScoreModel``.

    The reparametrization draws eps_1..eps_K are a fixed buffer, drawn once when the model is built
    and saved with the weights (common random numbers): f is then one deterministic, smooth function
    of y, the same in training and in sampling, and psi = -grad f is an exact gradient field. Fresh
    draws per call would make the "score" a random field (the walk would feel extra noise its
    friction does not balance, and the training loss would also have to fight the draws' variance);
    the noise-free ELBO (z = mu) would leave the encoder's variance out of the energy's gradient,
    except through the KL term, whose minimum s = 1 then ignores y. The estimator needs only
    f = -log p + const, so f need not be a tight bound on log p: the ELBO is a parametrization.
    """

    def __init__(self, net: nn.Module, noise: GaussianMNM, event_shape: tuple[int, ...] | None = None,
                 input_scaling: bool = True, elbo_samples: int = 1, sigmoid_output: bool = False):
        super().__init__(noise, event_shape)
        if elbo_samples < 1:
            raise ValueError(f"elbo_samples must be >= 1, got {elbo_samples}")
        self.net = net
        self.c_in = 1.0 / math.sqrt(0.225 ** 2 + noise.sigma ** 2) if input_scaling else 1.0
        self.sigmoid_output = sigmoid_output
        self.register_buffer("eps", torch.randn(elbo_samples, int(net.latent_dim)))

    def elbo_terms(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction energy, KL) per example, (B,) each: f = their sum."""
        mu, logvar, dec = self.net(self.c_in * y.flatten(1, 2), self.eps)
        dec = dec.to(y.dtype)
        if self.sigmoid_output:
            dec = torch.sigmoid(dec)
        sq = (y.unsqueeze(2) - dec.unsqueeze(1)).pow(2)                 # (B, M, K, *event)
        rec = sq.flatten(3).sum((1, 3)).mean(1) / (2.0 * self.sigma ** 2)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1).to(y.dtype)
        return rec, kl

    def energy(self, y: torch.Tensor) -> torch.Tensor:
        """f(y) = -ELBO(y) per example, (B,)."""
        rec, kl = self.elbo_terms(y)
        return rec + kl


class PoissonMEM2(nn.Module):
    """An energy model of the Poisson M-density, learned through Robbins' estimator (THEORY section 1).

    For counts y (B, M, *event), f(y) = f_0(y) + g(y) with g(y) = sum(net(t(y))) a learned scalar on
    the Anscombe transform t(y) = 2 sqrt(y + 3/8) (about unit noise per count, whatever the rates)
    and f_0 = -log p_0, the M-density under a flat prior on x >= 0:
    p_0(y) = prod_i Gamma(s_i + 1) M^{-(s_i + 1)} prod_m 1 / y_{m,i}!, with s_i = sum_m y_{m,i}.
    Robbins' estimator, written with the unnormalized p only, is then

        xhat_{m,i}(y) = (y_{m,i} + 1) exp(f(y) - f(y + e_{m,i})) = (s_i + 1) / M * exp(g(y) - g(y + e_{m,i})),

    the base ratio taken in closed form (a difference of two large lgamma sums would lose digits).
    The zero-initialised network starts at the flat-prior posterior mean (s_i + 1) / M; it learns
    the data's prior as a correction (the role c_skip plays for the universal denoiser).

    Training minimizes the least-squares objective E |x - xhat_m(y)|^2 for one channel m drawn per
    example: the same expectation as the mean over m at d + 1 energy evaluations per example instead
    of M d + 1. There is no score and no walk: Poisson models denoise only (``samplable = False``).
    Energies are evaluated in float32 outside autocast: log-ratios of bf16 sums are too coarse.
    """

    universal = False
    samplable = False

    def __init__(self, net: nn.Module, noise: PoissonMNM, event_shape: tuple[int, ...] | None = None):
        super().__init__()
        if not isinstance(noise, PoissonMNM):
            raise ValueError(f"noise must be a PoissonMNM, got {type(noise).__name__}")
        self.noise = noise
        self.net = net
        self.event_shape = tuple(event_shape) if event_shape is not None else None

    @property
    def M(self) -> int:
        return self.noise.M

    def _g(self, y: torch.Tensor) -> torch.Tensor:
        """The learned part g(y) per example (B,), float32."""
        t = 2.0 * torch.sqrt(y.float().clamp_min(0.0) + 0.375)
        with torch.autocast(device_type=y.device.type, enabled=False):
            return self.net(t.flatten(1, 2)).float().flatten(1).sum(1)

    def energy(self, y: torch.Tensor) -> torch.Tensor:
        """f(y) = f_0(y) + g(y) per example (B,): -log p(y) up to a constant."""
        y = y.float()
        s = y.sum(1)
        f0 = torch.lgamma(y + 1).flatten(1).sum(1) - (torch.lgamma(s + 1) - (s + 1) * math.log(self.M)).flatten(1).sum(1)
        return f0 + self._g(y)

    def robbins(self, y: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
        """xhat_{m,i}(y) for the channels m in ``channels`` (B, C) (default: all), (B, C, *event).

        One network call on y and its B * C * d unit shifts together (a DDP wrapper sees one forward).
        """
        _check_y(y, self.M, self.event_shape)
        B, ev = y.shape[0], y.shape[2:]
        d = math.prod(ev)
        if channels is None:
            channels = torch.arange(self.M, device=y.device).expand(B, self.M)
        C = channels.shape[1]
        flat = y.float().reshape(B, self.M, d)
        eye = torch.eye(d, device=y.device)                                     # e_i
        onehot_m = torch.nn.functional.one_hot(channels, self.M).float()        # (B, C, M)
        shifted = flat[:, None, None] + onehot_m[:, :, None, :, None] * eye[None, None, :, None, :]
        g = self._g(torch.cat([flat, shifted.reshape(B * C * d, self.M, d)]).reshape(-1, self.M, *ev))
        g0, g_shift = g[:B], g[B:].reshape(B, C, d)
        s = flat.sum(1)                                                         # (B, d)
        xhat = (s[:, None] + 1.0) / self.M * torch.exp(g0[:, None, None] - g_shift)
        return xhat.reshape(B, C, *ev)

    def jump(self, y: torch.Tensor) -> torch.Tensor:
        """E[X | Y = y] estimated as mean_m xhat_m(y) (equal for every m in exact arithmetic), (B, *event).

        Costs M d + 1 energy evaluations per example (Robbins' form), taken one channel at a time so
        memory holds B d shifted copies of y, not B M d.
        """
        ones = torch.ones(y.shape[0], 1, dtype=torch.long, device=y.device)
        return torch.stack([self.robbins(y, m * ones)[:, 0] for m in range(self.M)], 1).mean(1)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """|x - xhat_m(y)|^2 per coordinate, one random channel m per example (THEORY section 1)."""
        y = self.noise.sample(x.float(), generator)
        m = torch.randint(self.M, (x.shape[0], 1), generator=generator, device=x.device)
        return _sq_err(self.robbins(y, m)[:, 0], x)
