"""Closed-form models with the score-model interface (THEORY section 6).

For Gaussian and Gaussian-mixture data the denoiser E[X | ybar] is known exactly, and so is the
M-density p(y) itself (a Gaussian in R^{Md} with covariance (1_M 1_M^T) kron S + sigma^2 I). The
explicit ``log_p_y`` is written *without* the ybar factorization of THEORY section 2, so tests that
compare the universal score to autograd of ``log_p_y`` check that factorization independently.

Event shapes may be images; the oracles work on flattened vectors and reshape.
"""
from __future__ import annotations

import math

import torch

from mmgm_ray.models import UniversalScoreModel
from mmgm_ray.noise import GaussianMNM
from mmgm_ray.validators import positive as check_positive


def _mvn_logpdf(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, cov) for rows of x (..., n)."""
    L = torch.linalg.cholesky(cov)
    diff = (x - mean).unsqueeze(-1)
    sol = torch.linalg.solve_triangular(L, diff, upper=False).squeeze(-1)
    n = x.shape[-1]
    logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (sol.pow(2).sum(-1) + logdet + n * math.log(2.0 * math.pi))


def _check_cov(name: str, cov: torch.Tensor, d: int) -> torch.Tensor:
    if cov.shape != (d, d):
        raise ValueError(f"{name} must be ({d}, {d}), got {tuple(cov.shape)}")
    if not torch.allclose(cov, cov.T, atol=1e-8 * (1 + cov.abs().max().item())):
        raise ValueError(f"{name} must be symmetric")
    if torch.linalg.eigvalsh(cov).min() < -1e-10:
        raise ValueError(f"{name} must be positive semi-definite")
    return 0.5 * (cov + cov.T)


class GMMOracle(UniversalScoreModel):
    """X ~ sum_k pi_k N(mu_k, S_k): exact E[X | ybar], log p(ybar) and log p(y).

    E[X | ybar] = sum_k w_k(ybar) [mu_k + S_k (S_k + s^2 I)^{-1} (ybar - mu_k)],
    w_k oc pi_k N(ybar; mu_k, S_k + s^2 I), s = sigma_eff (THEORY section 6).
    Computations run in the dtype of the buffers (float64 unless the module is cast) and are cast
    back to the input dtype. Everything that does not depend on ybar (the Cholesky factors and log
    determinants of S_k + s^2 I, the gains, log pi_k) is computed once here: a sampling step then
    runs one triangular solve per component and no factorization (a Cholesky checks its result on the
    host, which stalls a GPU every step).
    """

    def __init__(self, weights, means, covs, noise: GaussianMNM, event_shape: tuple[int, ...] | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must be (K, d), got shape {tuple(means.shape)}")
        K, d = means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if weights.shape != (K,) or (weights < 0).any() or not math.isclose(weights.sum().item(), 1.0, rel_tol=1e-6):
            raise ValueError(f"weights must be {K} non-negative numbers summing to 1")
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must be ({K}, {d}, {d}), got {tuple(covs.shape)}")
        covs = torch.stack([_check_cov(f"covs[{k}]", covs[k], d) for k in range(K)])
        if event_shape is None:
            event_shape = (d,)
        if math.prod(event_shape) != d:
            raise ValueError(f"event_shape {event_shape} does not hold d={d} values")
        super().__init__(noise, event_shape)
        s2 = noise.sigma_eff ** 2
        eye = torch.eye(d, dtype=torch.float64)
        smoothed = covs + s2 * eye
        self.register_buffer("weights", weights)
        self.register_buffer("means", means)
        self.register_buffer("covs", covs)
        self.register_buffer("smoothed_covs", smoothed)                       # S_k + s^2 I
        self.register_buffer("gains", covs @ torch.linalg.inv(smoothed))       # A_k = S_k (S_k + s^2 I)^{-1}
        chol = torch.linalg.cholesky(smoothed)
        # derived from the buffers above: not saved in a state dict, moved and cast with the module
        self.register_buffer("smoothed_chol", chol, persistent=False)        # L_k, L_k L_k^T = S_k + s^2 I
        self.register_buffer("smoothed_logdet", 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1),
                             persistent=False)
        self.register_buffer("log_weights", torch.log(weights), persistent=False)
        self.d = d

    @property
    def K(self) -> int:
        return self.means.shape[0]

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(z.shape[0], self.d).to(self.means.dtype)

    def _log_joint(self, f: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(ybar; mu_k, S_k + s^2 I) for flat rows f (B, d): (B, K). One triangular
        solve per component with the B rows as right-hand sides (not B tiny solves)."""
        diff = (f[None] - self.means[:, None]).transpose(1, 2)                     # (K, d, B)
        sol = torch.linalg.solve_triangular(self.smoothed_chol, diff, upper=False)
        maha = sol.pow(2).sum(1).T                                                 # (B, K)
        return -0.5 * (maha + self.smoothed_logdet + self.d * math.log(2.0 * math.pi)) + self.log_weights

    def log_responsibilities(self, ybar: torch.Tensor) -> torch.Tensor:
        """log w_k(ybar), (B, K): the posterior over components given ybar."""
        logp = self._log_joint(self._flat(ybar))
        return logp - torch.logsumexp(logp, -1, keepdim=True)

    def denoise(self, ybar: torch.Tensor) -> torch.Tensor:
        f = self._flat(ybar)
        w = self.log_responsibilities(ybar).exp()                                   # (B, K)
        comp = self.means + torch.einsum("kij,bkj->bki", self.gains, f[:, None, :] - self.means)
        out = (w.unsqueeze(-1) * comp).sum(1)
        return out.to(ybar.dtype).reshape(ybar.shape)

    def log_p_ybar(self, ybar: torch.Tensor) -> torch.Tensor:
        """log p_{sigma_eff}(ybar), (B,)."""
        return torch.logsumexp(self._log_joint(self._flat(ybar)), -1)

    def log_p_y(self, y: torch.Tensor) -> torch.Tensor:
        """Normalized log p(y) of the M-density, from the explicit Md-dimensional Gaussians, (B,)."""
        B, M = y.shape[0], y.shape[1]
        if M != self.M:
            raise ValueError(f"y has M={M}, the model M={self.M}")
        flat = y.reshape(B, M * self.d).to(torch.float64)
        ones = torch.ones(M, M, dtype=torch.float64, device=flat.device)
        eye = torch.eye(M * self.d, dtype=torch.float64, device=flat.device)
        terms = []
        for k in range(self.K):
            cov = torch.kron(ones, self.covs[k]) + self.sigma ** 2 * eye
            terms.append(_mvn_logpdf(flat, self.means[k].repeat(M), cov) + torch.log(self.weights[k]))
        return torch.logsumexp(torch.stack(terms, -1), -1)

    def sample_x(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws of X (float64, event shape) and their component labels."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        L = torch.linalg.cholesky(self.covs + 1e-12 * torch.eye(self.d, dtype=torch.float64))
        z = torch.randn(n, self.d, dtype=torch.float64, generator=generator)
        x = self.means[k] + torch.einsum("nij,nj->ni", L[k], z)
        return x.reshape(n, *self.event_shape), k


class GaussianOracle(GMMOracle):
    """X ~ N(mu, S): the one-component mixture, plus the moments of THEORY section 6."""

    def __init__(self, mean, cov, noise: GaussianMNM, event_shape: tuple[int, ...] | None = None):
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        super().__init__([1.0], mean[None], cov[None], noise, event_shape)

    @property
    def gain(self) -> torch.Tensor:
        """A = S (S + sigma_eff^2 I)^{-1}: E[X | ybar] = mu + A (ybar - mu)."""
        return self.gains[0]

    def ybar_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ybar ~ N(mu, S + sigma_eff^2 I)."""
        return self.means[0], self.smoothed_covs[0]

    def jump_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Jumps ~ N(mu, S (S + sigma_eff^2 I)^{-1} S)."""
        S = self.covs[0]
        return self.means[0], S @ torch.linalg.solve(self.smoothed_covs[0], S)


class GammaPoissonOracle:
    """X_i ~ Gamma(a, b) i.i.d., Y_{m,i} | x ~ Poisson(x_i): the conjugate Poisson MNM oracle.

    ``log_p_unnormalized`` is log p(y) up to a constant (what Robbins' estimator needs);
    ``posterior_mean`` is the conjugate E[X_i | y] = (a + sum_m y_{m,i}) / (b + M) (THEORY section 1).
    """

    def __init__(self, a: float, b: float, M: int):
        self.a = check_positive("a", a)
        self.b = check_positive("b", b)
        if M < 1:
            raise ValueError(f"M must be >= 1, got {M}")
        self.M = M

    def log_p_unnormalized(self, y: torch.Tensor) -> torch.Tensor:
        """sum_i [lgamma(a + s_i) - (a + s_i) log(b + M) - sum_m lgamma(y_{m,i} + 1)], s_i = sum_m y_{m,i}."""
        y = y.to(torch.float64)
        s = y.sum(1)
        per = torch.lgamma(self.a + s) - (self.a + s) * math.log(self.b + self.M) - torch.lgamma(y + 1).sum(1)
        return per.flatten(1).sum(1)

    def posterior_mean(self, y: torch.Tensor) -> torch.Tensor:
        """(a + sum_m y_{m,i}) / (b + M), shape (B, d)."""
        return (self.a + y.to(torch.float64).sum(1)) / (self.b + self.M)

    def sample_x(self, n: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of X in R^d (float64). Uses numpy-free torch Gamma via the generator-free API when needed."""
        gamma = torch.distributions.Gamma(torch.full((d,), self.a, dtype=torch.float64),
                                          torch.full((d,), self.b, dtype=torch.float64))
        if generator is not None:  # torch.distributions has no generator argument: seed a fork
            with torch.random.fork_rng():
                torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
                return gamma.sample((n,))
        return gamma.sample((n,))
