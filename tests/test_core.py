"""Math core against closed forms (THEORY sections 1-6)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from mmgm_ray import rng
from mmgm_ray.config import SamplerConfig
from mmgm_ray.engine import WalkJumpEngine
from mmgm_ray.integrators import IntegratorParams, LangevinState, ScoreOutput, aboba_step, get_integrator
from mmgm_ray.models import MDAE, MEM2, MUVB, PoissonMEM2, UniversalDenoiser, UniversalScoreModel
from mmgm_ray.nets import MLP
from mmgm_ray.nets.vae import VAE
from mmgm_ray.noise import GaussianMNM, PoissonMNM
from mmgm_ray.oracles import GammaPoissonOracle, GaussianOracle, GMMOracle
from pinned import cpu_config

torch.set_default_dtype(torch.float32)


def random_spd(d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return scale * (A @ A.T / d + 0.1 * torch.eye(d, dtype=torch.float64))


def gmm_oracle(M=4, sigma=0.7, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(3, d, generator=g, dtype=torch.float64)
    covs = torch.stack([random_spd(d, seed + k, 0.3) for k in range(3)])
    return GMMOracle([0.2, 0.3, 0.5], means, covs, GaussianMNM(sigma, M))


# ---------------------------------------------------------------------------------------------
# Oracles: Tweedie, the universal factorization, equivariance
# ---------------------------------------------------------------------------------------------

def test_gaussian_oracle_tweedie_matches_posterior_mean():
    d, M, sigma = 4, 5, 0.8
    mu = torch.linspace(-1, 1, d, dtype=torch.float64)
    S = random_spd(d, 1)
    oracle = GaussianOracle(mu, S, GaussianMNM(sigma, M))
    y = torch.randn(7, M, d, dtype=torch.float64)
    out = oracle.score(y)
    # closed form computed here with numpy, independently of the oracle's internals
    s2 = sigma ** 2 / M
    ybar = y.mean(1).numpy()
    post = mu.numpy() + (S.numpy() @ np.linalg.inv(S.numpy() + s2 * np.eye(d)) @ (ybar - mu.numpy()).T).T
    for m in range(M):  # Tweedie holds for every channel: xhat = y_m + sigma^2 score_m
        np.testing.assert_allclose((y[:, m] + sigma ** 2 * out.psi[:, m]).numpy(), post, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.xhat.numpy(), post, rtol=1e-10, atol=1e-10)


def test_gmm_oracle_posterior_mean_matches_numpy():
    oracle = gmm_oracle()
    d, M, sigma = 3, 4, 0.7
    y = 2 * torch.randn(6, M, d, dtype=torch.float64)
    xhat = oracle.score(y).xhat.numpy()
    s2 = sigma ** 2 / M
    ybar = y.mean(1).numpy()
    pis, mus, covs = oracle.weights.numpy(), oracle.means.numpy(), oracle.covs.numpy()
    from scipy.stats import multivariate_normal
    expect = []
    for yb in ybar:
        w = np.array([pis[k] * multivariate_normal(mus[k], covs[k] + s2 * np.eye(d)).pdf(yb) for k in range(3)])
        w /= w.sum()
        comp = [mus[k] + covs[k] @ np.linalg.solve(covs[k] + s2 * np.eye(d), yb - mus[k]) for k in range(3)]
        expect.append(sum(w[k] * comp[k] for k in range(3)))
    np.testing.assert_allclose(xhat, np.array(expect), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "gmm"])
def test_universal_score_is_autograd_of_explicit_log_p(kind):
    """score_m = grad_{y_m} log p(y) with p the explicit Md-dim density (no ybar factorization used)."""
    if kind == "gaussian":
        oracle = GaussianOracle(torch.zeros(3), random_spd(3, 2), GaussianMNM(0.9, 3))
    else:
        oracle = gmm_oracle(M=3, sigma=0.9)
    y = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(oracle.log_p_y(y).sum(), y)
    psi = oracle.score(y.detach()).psi
    torch.testing.assert_close(psi, grad, rtol=1e-9, atol=1e-9)


def test_log_p_y_factorizes_through_ybar():
    """THEORY section 2: log p(y) = -sum_m |y_m - ybar|^2/(2 sigma^2) + log p_{sigma_eff}(ybar) + const."""
    oracle = gmm_oracle(M=3, sigma=0.9)
    y = torch.randn(6, 3, 3, dtype=torch.float64)
    ybar = y.mean(1)
    rhs = -(y - ybar[:, None]).pow(2).sum((1, 2)) / (2 * 0.81) + oracle.log_p_ybar(ybar)
    diff = oracle.log_p_y(y) - rhs
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-9)  # the same constant for every y


@pytest.mark.parametrize("which", ["oracle", "net"])
def test_permutation_equivariance(which):
    torch.manual_seed(0)
    M, d = 5, 4
    if which == "oracle":
        model = gmm_oracle(M=M, sigma=1.0, d=d)
        y = torch.randn(3, M, d, dtype=torch.float64)
    else:
        net = nn.Sequential(nn.Linear(d, 16), nn.SiLU(), nn.Linear(16, d))
        model = UniversalDenoiser(net, GaussianMNM(1.0, M), (d,))
        y = torch.randn(3, M, d)
    perm = torch.randperm(M)
    a = model.score(y)
    b = model.score(y[:, perm])
    torch.testing.assert_close(b.psi, a.psi[:, perm])
    torch.testing.assert_close(b.xhat, a.xhat)


# ---------------------------------------------------------------------------------------------
# Poisson MNM
# ---------------------------------------------------------------------------------------------

def test_robbins_estimator_equals_conjugate_posterior_mean():
    a, b, M, d = 2.5, 1.5, 4, 3
    oracle = GammaPoissonOracle(a, b, M)
    g = torch.Generator().manual_seed(3)
    x = oracle.sample_x(8, d, generator=g)
    y = PoissonMNM(M).sample(x, generator=g).to(torch.float64)
    est = PoissonMNM.robbins_estimate(oracle.log_p_unnormalized, y)       # (B, M, d)
    post = oracle.posterior_mean(y)
    for m in range(M):
        torch.testing.assert_close(est[:, m], post, rtol=1e-10, atol=1e-10)
    # the estimator only needs p up to a constant: shifting log p changes nothing
    est2 = PoissonMNM.robbins_estimate(lambda z: oracle.log_p_unnormalized(z) + 123.0, y)
    torch.testing.assert_close(est2, est)


def test_poisson_mem2_robbins_form_and_flat_prior_start():
    """PoissonMEM2's closed-form base ratio equals Robbins' estimator on its own energy, and the
    zero-initialised network starts at the flat-prior posterior mean (s_i + 1) / M."""
    M, d = 3, 4
    torch.manual_seed(0)
    model = PoissonMEM2(MLP(M * d, 16, 2, zero_init_out=False), PoissonMNM(M), (d,))
    g = torch.Generator().manual_seed(1)
    y = PoissonMNM(M).sample(3.0 * torch.rand(5, d, generator=g), generator=g)
    with torch.no_grad():
        direct = PoissonMNM.robbins_estimate(lambda z: -model.energy(z).double(), y.double())
        torch.testing.assert_close(model.robbins(y).double(), direct, rtol=1e-4, atol=1e-5)
        # channels picked per example: the same numbers as the full table
        ch = torch.tensor([[2], [0], [1], [1], [2]])
        torch.testing.assert_close(model.robbins(y, ch)[:, 0], model.robbins(y)[torch.arange(5), ch[:, 0]])
        flat = PoissonMEM2(MLP(M * d, 16, 2), PoissonMNM(M), (d,))          # zero output layer
        torch.testing.assert_close(flat.jump(y), (y.sum(1) + 1) / M)
    with pytest.raises(ValueError, match="no score"):
        WalkJumpEngine(model, SamplerConfig(walk="full"), (d,), 0, [0])


# ---------------------------------------------------------------------------------------------
# MUVB
# ---------------------------------------------------------------------------------------------

def _tiny_muvb(K: int = 2) -> MUVB:
    torch.manual_seed(3)
    M, d = 3, 4
    vae = VAE(M * d, (d,), latent_dim=2, hidden=8, depth=1)
    for p in vae.parameters():            # leave the zero-initialised heads: test a generic VAE
        torch.nn.init.normal_(p, std=0.5)
    return MUVB(vae, GaussianMNM(0.8, M), (d,), input_scaling=False, elbo_samples=K).double()


def test_muvb_energy_is_the_negative_elbo_and_score_its_gradient():
    """f(y) = -ELBO(y) written out here from the encoder / decoder; psi = -grad f against central
    differences of f (float64: h = 1e-5 gives O(h^2) ~ 1e-10 truncation); f is deterministic."""
    model = _tiny_muvb()
    M, d, s2 = 3, 4, 0.8 ** 2
    y = torch.randn(2, M, d, dtype=torch.float64)
    h = model.net.encoder(y.flatten(1))
    mu, logvar = h[:, :2], h[:, 2:]
    f_hand = []
    for b in range(2):
        z = mu[b] + torch.exp(0.5 * logvar[b]) * model.eps                  # (K, latent)
        rec = torch.stack([(y[b] - model.net.decoder(zk)).pow(2).sum() / (2 * s2) for zk in z]).mean()
        kl = 0.5 * (mu[b].pow(2) + logvar[b].exp() - 1 - logvar[b]).sum()
        f_hand.append(rec + kl)
    torch.testing.assert_close(model.energy(y), torch.stack(f_hand).detach())
    assert torch.equal(model.energy(y), model.energy(y))                 # fixed draws: one function
    out = model.score(y)
    fd = torch.zeros_like(y)
    with torch.no_grad():
        for idx in np.ndindex(*y.shape[1:]):
            e = torch.zeros_like(y)
            e[(slice(None),) + idx] = 1e-5
            fd[(slice(None),) + idx] = -(model.energy(y + e) - model.energy(y - e)) / 2e-5
    torch.testing.assert_close(out.psi, fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.xhat, (y + s2 * out.psi).mean(1))
    assert "eps" in model.state_dict()                                    # the draws travel with the weights


def test_muvb_reduced_walk_is_refused_by_config_and_engine():
    with pytest.raises(ValueError, match="sampler.walk='reduced' needs a universal model.*'muvb'"):
        cpu_config("digits", "model.kind=muvb", "sampler.walk=reduced")
    with pytest.raises(ValueError, match="universal"):
        WalkJumpEngine(_tiny_muvb().float(), SamplerConfig(walk="reduced"), (4,), 0, [0])
    fresh = MUVB(VAE(3 * 4, (4,), latent_dim=2, hidden=8, depth=1), GaussianMNM(0.8, 3), (4,))
    eng = WalkJumpEngine(fresh, SamplerConfig(walk="full", block_size=4, jump_every=2), (4,), 0, [0])
    eng.initialize()
    assert eng.run_collect(6).xhat.shape == (12, 4) and not eng.divergences


def test_poisson_sampling_config_is_refused_in_one_line():
    cfg = cpu_config("digits", "noise.kind=poisson", "model.kind=mem2")  # a valid training config
    for call in (cfg.validate_sampling, lambda: __import__("mmgm_ray.factory").factory.load_sampling_model(cfg)):
        with pytest.raises(ValueError) as exc:
            call()
        msg = str(exc.value)
        assert "noise.kind='poisson'" in msg and "cannot be sampled" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="noise.kind='poisson' needs model.kind='mem2'"):
        cpu_config("digits", "noise.kind=poisson", "model.kind=muvb")


# ---------------------------------------------------------------------------------------------
# Integrators: reduced vs full walk
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("integrator", ["aboba", "cheng", "ula"])
@pytest.mark.parametrize("friction", ["scaled", "unscaled"])
def test_reduced_walk_equals_full_walk_with_shared_noise(integrator, friction):
    """THEORY section 5: averaging the full walk over m gives the reduced walk, to round-off."""
    M, d, B, T = 6, 3, 4, 60
    oracle = gmm_oracle(M=M, sigma=0.8, d=d)
    params = IntegratorParams.create(0.4, 0.7, 1.3, friction)
    step = get_integrator(integrator)
    g = torch.Generator().manual_seed(5)
    y = torch.randn(B, M, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, M, d, generator=g, dtype=torch.float64)
    full = LangevinState(y, v)
    red = LangevinState(y.mean(1), v.mean(1))
    for _ in range(T):
        shape = (2, B, M, d) if integrator == "cheng" else (B, M, d)
        xi = torch.randn(shape, generator=g, dtype=torch.float64)
        full, out_f = step(full, oracle.score, params, xi)
        red, out_r = step(red, oracle.reduced_score, params, xi.mean(-2))
        torch.testing.assert_close(full.y.mean(1), red.y, rtol=0, atol=1e-10)
        torch.testing.assert_close(out_f.xhat, out_r.xhat, rtol=0, atol=1e-10)


class _SharedNoiseReducedEngine(WalkJumpEngine):
    """Reduced walk fed the full walk's noise averaged over m (THEORY section 5), a test helper.

    The full walk draws (draws, M, *event) normals per chain on the walk stream; their mean over m is
    exactly N(0, I/M), so a reduced walk started at the full walk's mean follows it to round-off.
    Production reduced walks draw N(0, I/M) directly (M times fewer numbers).
    """

    def _noise(self, step):
        shape = (self.n_draws, self.M, *self.event_shape)
        xi = self.rng.normal(self.chain_ids, step, rng.STREAM_WALK, shape).mean(2)
        return xi.movedim(1, 0) if self.n_draws > 1 else xi.squeeze(1)


@pytest.mark.parametrize("integrator,jump_at", [("aboba", "half"), ("aboba", "full"), ("cheng", "half")])
def test_engine_reduced_and_full_walks_agree_with_shared_noise(integrator, jump_at):
    oracle = gmm_oracle(M=4, sigma=0.8, d=3).float()
    kw = dict(integrator=integrator, block_size=16, jump_every=5, jump_at=jump_at)
    full = WalkJumpEngine(oracle, SamplerConfig(walk="full", **kw), (3,), 11, [0, 1])
    red = _SharedNoiseReducedEngine(oracle, SamplerConfig(walk="reduced", **kw), (3,), 11, [0, 1])
    full.initialize(); red.initialize()
    red.state = red.state._replace(y=full.state.y.mean(1), v=full.state.v.mean(1))
    a, b = full.run_collect(100), red.run_collect(100)
    assert a.num_rows == b.num_rows == 32 * 20
    # float32 round-off of two differently ordered computations, accumulated over 100 steps
    torch.testing.assert_close(a.xhat, b.xhat, rtol=1e-4, atol=1e-4)
    assert red.state_bytes_per_chain() * 4 == full.state_bytes_per_chain()


# ---------------------------------------------------------------------------------------------
# Analytic trajectories: zero noise, harmonic force
# ---------------------------------------------------------------------------------------------

def test_aboba_without_friction_or_noise_is_leapfrog_on_harmonic_oscillator():
    """With zeta1 -> 1 and no noise, A-B-O-B-A is velocity Verlet: energy is conserved to O(delta^2)
    and the phase advances at the known modified frequency cos(theta) = 1 - delta^2 k / 2."""
    k, delta, T = 2.0, 0.1, 500
    params = IntegratorParams(delta, 1e-12, 1.0, "scaled")       # friction ~ 0: O step is the identity
    s = LangevinState(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    for _ in range(T):
        s, _ = aboba_step(s, lambda y: ScoreOutput(-k * y, y), params, torch.zeros(1, dtype=torch.float64))
    theta = math.acos(1 - delta ** 2 * k / 2)
    # the one-step map has det 1 and trace 2 cos(theta), so y_n = cos(n theta) from y_0 = 1, v_0 = 0
    assert abs(s.y.item() - math.cos(T * theta)) < 1e-6
    energy = 0.5 * s.v.item() ** 2 + 0.5 * k * s.y.item() ** 2
    assert abs(energy - 0.5 * k) < delta ** 2 * k


# ---------------------------------------------------------------------------------------------
# Stationary moments on a Gaussian target
# ---------------------------------------------------------------------------------------------

def discrete_stationary(integrator: str, k: float, p: IntegratorParams, noise_var: float):
    """Exact stationary covariance of (y, v) and of the score-evaluation position for psi = -k y.

    Written out by hand from THEORY section 4 (independently of mmgm_ray.integrators), then the
    discrete Lyapunov equation C = F C F^T + Q is solved."""
    d, u, g = p.delta, p.u, p.gamma_eff
    z1, z2 = math.exp(-g * d), math.exp(-2 * g * d)
    if integrator == "aboba":
        # (y, v) -A-> (y_half, v) -BOB-> (y_half, v') -A-> (y', v'), psi = -k y_half evaluated once:
        # v' = z1 v + (z1 + 1)(u d / 2) psi + sqrt(u (1 - z2)) xi
        A = np.array([[1, d / 2], [0, 1]])
        BOB = np.array([[1, 0], [-(z1 + 1) * u * d / 2 * k, z1]])
        F = A @ BOB @ A
        G = A @ np.array([[0.0], [math.sqrt(u * (1 - z2))]])
        Q = noise_var * G @ G.T
        evalpos = np.array([[1, d / 2]])                             # score at y + d/2 v
    elif integrator == "cheng":
        a, b = (1 - z1) / g, (u / g) * (d - (1 - z1) / g)
        c, e = z1, (u / g) * (1 - z1)
        F = np.array([[1 - b * k, a], [-e * k, c]])
        var_y = (u / g) * (2 * d - (4 / g) * (1 - z1) + (1 / g) * (1 - z2))
        Q = noise_var * np.array([[var_y, (u / g) * (1 - 2 * z1 + z2)], [(u / g) * (1 - 2 * z1 + z2), u * (1 - z2)]])
        evalpos = np.array([[1, 0]])
    else:
        F = np.array([[1 - d * d * k / 2, 0], [0, 0]])
        Q = noise_var * np.array([[d * d, 0], [0, 0]])
        evalpos = np.array([[1, 0]])
    C = scipy.linalg.solve_discrete_lyapunov(F, Q)
    return C, float((evalpos @ C @ evalpos.T).item())


@pytest.mark.parametrize("integrator", ["aboba", "cheng", "ula"])
def test_stationary_moments_on_gaussian_target(integrator):
    """Reduced walk on N(mu, S) data: moments of ybar and of the jumps.

    Exact reference: the discretized chain is linear, so its stationary covariance is known in
    closed form (``discrete_stationary``); it differs from THEORY section 6 by the discretization
    bias, which we also bound. Tolerance: 5 Monte Carlo standard errors. The N = 4096 chains are
    independent; each is sampled at 8 times 50 steps apart (> 5 autocorrelation times here,
    correlation < 1e-2), so the variance estimate has relative s.e. ~ sqrt(2 / (N * 8)) ~ 0.8%.
    """
    M, sigma = 4, 1.0
    lam = torch.tensor([1.0, 0.25], dtype=torch.float64)
    mu = torch.tensor([0.5, -0.5], dtype=torch.float64)
    oracle = GaussianOracle(mu, torch.diag(lam), GaussianMNM(sigma, M)).float()
    cfg = SamplerConfig(integrator=integrator, block_size=1024, jump_every=50, init="zeros", gamma=1.0)
    eng = WalkJumpEngine(oracle, cfg, (2,), 7, range(4))
    eng.initialize()
    list(eng.run(600))                                               # burn-in
    ys, jumps = [], []
    for jb in eng.run(400):
        jumps.append(jb.xhat.double())
    ys = eng.state.y.double()
    X = torch.cat(jumps)
    s2 = sigma ** 2 / M
    p = eng.params
    n_eff = X.shape[0]
    for i, l in enumerate(lam.tolist()):
        k = 1.0 / (M * (l + s2))                                     # psi_bar = -k (ybar - mu)
        C, var_eval = discrete_stationary(integrator, k, p, 1.0 / M)
        gain = l / (l + s2)
        var_jump = gain ** 2 * var_eval
        # discretization bias at this delta is a few percent of the target variance, as expected
        assert abs(var_jump / (gain ** 2 * (l + s2)) - 1) < 0.2
        se = var_jump * math.sqrt(2.0 / n_eff)
        assert abs(X[:, i].var().item() - var_jump) < 5 * se, (i, X[:, i].var().item(), var_jump)
        assert abs(X[:, i].mean().item() - mu[i].item()) < 5 * math.sqrt(var_jump / n_eff)
        se_y = C[0, 0] * math.sqrt(2.0 / ys.shape[0])
        assert abs(ys[:, i].var().item() - C[0, 0]) < 5 * se_y
    # jumps are uncorrelated across coordinates (diagonal S)
    assert abs(torch.corrcoef(X.T)[0, 1].item()) < 5 / math.sqrt(n_eff)


def test_discrete_stationary_bias_orders():
    """The reference itself, against the continuous target k * Var = 1 as delta shrinks.

    A-B-O-B-A: the full-step position is exact for a Gaussian target at any stable delta, while the
    half-step position (where the score, hence the jump, is evaluated) has O(delta^2) bias.
    Cheng et al.: O(delta) bias. ULA with time step delta^2 / 2: O(delta^2) bias."""
    k = 0.5
    def bias(integ, delta):
        C, var_eval = discrete_stationary(integ, k, IntegratorParams(delta, 1.0), 1.0)
        return abs(C[0, 0] * k - 1.0), abs(var_eval * k - 1.0)
    for delta in (0.4, 0.2, 0.1):
        assert bias("aboba", delta)[0] < 1e-12
    assert 3.5 < bias("aboba", 0.2)[1] / bias("aboba", 0.1)[1] < 4.5
    assert 1.8 < bias("cheng", 0.2)[0] / bias("cheng", 0.1)[0] < 2.3
    assert 3.5 < bias("ula", 0.2)[0] / bias("ula", 0.1)[0] < 4.5


def test_full_step_jumps_have_the_exact_jump_law_where_half_step_jumps_are_biased():
    """A-B-O-B-A on N(mu, diag(lam)) data at a large step (delta = 1.5): jumps evaluated at the
    full-step position (sampler.jump_at='full') have the exact jump law of THEORY section 6; the
    default half-step jumps are inflated by 1 / (1 - u k delta^2 / 4) (k: the reduced walk's force
    constant; the closed form is checked against the Lyapunov solution), here by 13% and 23%.

    Monte Carlo error: 4096 independent chains x 8 jumps 10 steps (15 time units) apart; the slowest
    mode of the walk decays at rate >= 0.37 per time unit here (correlation < 0.004 between jumps,
    burn-in 150 time units), so a variance has relative s.e. ~ sqrt(2 / (4096 * 8)) ~ 0.8%;
    agreement within 5 s.e., and the half-step bias must exceed 10 s.e. (it is ~16 and ~30 s.e.).
    The walk itself is unchanged by the option: both runs end in the same state, bitwise.
    """
    M, sigma, delta = 4, 1.0, 1.5
    lam = torch.tensor([1.0, 0.5], dtype=torch.float64)
    mu = torch.tensor([0.5, -0.5], dtype=torch.float64)
    oracle = GaussianOracle(mu, torch.diag(lam), GaussianMNM(sigma, M)).float()
    jumps, states = {}, {}
    for where in ("half", "full"):
        cfg = SamplerConfig(block_size=1024, jump_every=10, init="zeros", gamma=1.0, delta=delta, jump_at=where)
        eng = WalkJumpEngine(oracle, cfg, (2,), 7, range(4))
        eng.initialize()
        list(eng.run(100))
        jumps[where] = torch.cat([jb.xhat.double() for jb in eng.run(80)])
        states[where] = eng.state
    assert torch.equal(states["half"].y, states["full"].y) and torch.equal(states["half"].v, states["full"].v)
    exact_mean, exact_cov = oracle.double().jump_moments()
    s2 = sigma ** 2 / M
    n = jumps["full"].shape[0]
    for i, l in enumerate(lam.tolist()):
        k = 1.0 / (M * (l + s2))
        inflation = 1.0 / (1.0 - k * delta ** 2 / 4)
        _, var_eval = discrete_stationary("aboba", k, IntegratorParams(delta, 1.0), 1.0 / M)
        assert var_eval * k * M == pytest.approx(inflation, rel=1e-9)   # closed form = Lyapunov
        var_exact = exact_cov[i, i].item()
        se = var_exact * math.sqrt(2.0 / n)
        full, half = jumps["full"][:, i].var().item(), jumps["half"][:, i].var().item()
        assert abs(full - var_exact) < 5 * se, (i, full, var_exact)
        assert abs(half - inflation * var_exact) < 5 * inflation * se, (i, half, inflation * var_exact)
        assert half - var_exact > 10 * se, (i, half, var_exact)
        for where in ("half", "full"):
            assert abs(jumps[where][:, i].mean().item() - exact_mean[i].item()) < 5 * math.sqrt(half / n)


def test_gmm_chains_move_between_modes_with_correct_occupancy():
    """1-d mixture of 3 well-separated modes: chains hop, and time-averaged occupancy matches pi."""
    M, sigma = 2, 1.0
    weights = [0.2, 0.3, 0.5]
    means = [[-3.0], [0.0], [3.0]]
    covs = [[[0.05]], [[0.05]], [[0.05]]]
    oracle = GMMOracle(weights, means, covs, GaussianMNM(sigma, M)).float()
    cfg = SamplerConfig(block_size=1000, jump_every=5, init="uniform", gamma=1.0)
    eng = WalkJumpEngine(oracle, cfg, (1,), 3, [0, 1])
    eng.initialize()
    list(eng.run(300))
    labels = []
    for jb in eng.run(2000):
        labels.append(torch.bucketize(jb.xhat[:, 0], torch.tensor([-1.5, 1.5])).reshape(2000))
    L = torch.stack(labels)                                          # (jumps, chains)
    hops = (L[1:] != L[:-1]).float().sum(0)
    assert (hops > 0).float().mean() > 0.9                           # nearly every chain changes mode
    occ = torch.stack([(L == k).float().mean() for k in range(3)]).tolist()
    # Monte Carlo error: 2000 chains x ~40 effectively independent visits each -> s.e. < 0.005;
    # the jump law weights the modes like p_X only up to discretization effects, allow 0.03.
    for o, w in zip(occ, weights):
        assert abs(o - w) < 0.03, (occ, weights)


# ---------------------------------------------------------------------------------------------
# Reproducibility: save / restore and block layouts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("walk", ["reduced", "full"])
@pytest.mark.parametrize("integrator", ["aboba", "cheng"])
def test_save_restore_is_bitwise(walk, integrator, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Linear(32, 4))
    model = UniversalDenoiser(net, GaussianMNM(1.0, 3), (4,))
    cfg = SamplerConfig(walk=walk, integrator=integrator, block_size=8, jump_every=3)
    a = WalkJumpEngine(model, cfg, (4,), 42, [0, 1, 2])
    a.initialize()
    straight = a.run_collect(60)

    b = WalkJumpEngine(model, cfg, (4,), 42, [0, 1, 2])
    b.initialize()
    first = b.run_collect(30)
    torch.save(b.state_dict(), tmp_path / "s.pt")
    c = WalkJumpEngine(model, cfg, (4,), 42, [0, 1, 2])
    c.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    second = c.run_collect(30)
    resumed = type(first).cat([first, second])
    for x, y in zip(straight, resumed):
        assert torch.equal(x, y)


def test_num_chains_limits_emitted_chains_exactly():
    oracle = gmm_oracle(M=2, sigma=1.0, d=3).float()
    cfg = SamplerConfig(block_size=8, jump_every=2)
    padded = WalkJumpEngine(oracle, cfg, (3,), 1, [0, 1], num_chains=13)
    full = WalkJumpEngine(oracle, cfg, (3,), 1, [0, 1])
    padded.initialize(); full.initialize()
    a, b = padded.run_collect(10), full.run_collect(10)
    assert sorted(set(a.chain_id.tolist())) == list(range(13))
    keep = b.chain_id < 13
    assert torch.equal(a.xhat, b.xhat[keep])                          # the 13 chains are unchanged
    assert padded.divergences == []


class _RationalDenoiser(UniversalScoreModel):
    """g(ybar) = ybar / (1 + ybar^2) + 1/2, elementwise with IEEE +, *, / only.

    Its output for one chain cannot depend on the rest of the batch (unlike BLAS kernels or
    vectorized libm, whose rounding can follow the batch size), so any difference between batch
    layouts below can only come from the noise.
    """

    def denoise(self, ybar):
        return ybar / (1.0 + ybar * ybar) + 0.5


def _rows_by_chain_step(batches):
    jb = type(batches[0]).cat(batches)
    idx = (jb.chain_id * 100_000 + jb.step).argsort()
    return jb.chain_id[idx], jb.step[idx], jb.xhat[idx], jb.score_norm[idx], jb.kinetic[idx]


@pytest.mark.parametrize("walk,integrator,init", [("reduced", "aboba", "uniform"), ("full", "cheng", "data"),
                                                  ("reduced", "ula", "data"), ("full", "aboba", "uniform")])
def test_rows_do_not_depend_on_block_size_or_layout(walk, integrator, init):
    """768 chains: block size 256 or 128, 1 or 3 blocks per engine, shuffled block orders: same bits."""
    model = _RationalDenoiser(GaussianMNM(0.8, 4), (3,))
    data = torch.tensor([[0.0, 1.0, 2.0], [1.0, -1.0, 0.5], [3.0, 0.0, -2.0]])
    layouts = [(256, [[0, 1, 2]]), (256, [[2], [0], [1]]),                       # block size, engines' blocks
               (128, [[5, 3, 1], [0, 4, 2]]), (128, [[b] for b in (4, 1, 5, 0, 3, 2)])]
    results = []
    for bs, groups in layouts:
        cfg = SamplerConfig(walk=walk, integrator=integrator, init=init, block_size=bs, jump_every=4)
        batches = []
        for blocks in groups:
            eng = WalkJumpEngine(model, cfg, (3,), 2024, blocks)
            eng.initialize(data)
            batches.append(eng.run_collect(40))
        results.append(_rows_by_chain_step(batches))
    ref = results[0]
    assert torch.equal(ref[0].unique(), torch.arange(768)) and ref[0].numel() == 768 * 10
    for other in results[1:]:
        for a, b in zip(ref, other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------

class _Poisoned(GMMOracle):
    """Oracle whose denoiser returns NaN where the first coordinate of ybar exceeds 2."""

    def denoise(self, ybar):
        out = super().denoise(ybar)
        bad = ybar.reshape(ybar.shape[0], -1)[:, 0] > 2.0
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)


def test_diverging_chains_are_flagged_and_isolated():
    base = gmm_oracle(M=2, sigma=1.0, d=3)
    poisoned = _Poisoned(base.weights, base.means, base.covs, GaussianMNM(1.0, 2)).float()
    cfg = SamplerConfig(block_size=50, jump_every=2, init="data", divergence_threshold=1e3)
    data = torch.zeros(1, 3)
    clean_data = torch.zeros(1, 3)
    eng = WalkJumpEngine(poisoned, cfg, (3,), 5, [0, 1])
    eng.initialize(data)
    # an exploding chain: push chain 7 far away
    y = eng.state.y.clone(); y[7] = -1e6  # negative: not poisoned, only far away
    eng.state = eng.state._replace(y=y)
    rows = eng.run_collect(40)
    assert torch.isfinite(rows.xhat).all()
    reasons = {e.chain_id: e.reason for e in eng.divergences}
    assert reasons.get(7) == "exploding"
    bad = set(reasons)
    assert any(r == "non-finite" for r in reasons.values())
    assert len(bad) == len(eng.divergences)                          # each reported once
    emitted = set(rows.chain_id.tolist())
    for e in eng.divergences:                                        # nothing after its divergence
        assert not ((rows.chain_id == e.chain_id) & (rows.step >= e.step)).any()
    # healthy chains are untouched by their neighbours: same rows as an unpoisoned run
    ref = WalkJumpEngine(base.float(), cfg, (3,), 5, [0, 1])
    ref.initialize(clean_data)
    ref_rows = ref.run_collect(40)
    healthy = torch.tensor(sorted(set(range(100)) - bad))
    sel_a = torch.isin(rows.chain_id, healthy)
    sel_b = torch.isin(ref_rows.chain_id, healthy)
    assert torch.equal(rows.xhat[sel_a], ref_rows.xhat[sel_b])
    assert emitted - bad and len(bad) < 100


# ---------------------------------------------------------------------------------------------
# MDAE and MEM^2
# ---------------------------------------------------------------------------------------------

def test_mem2_score_of_linear_net_is_closed_form():
    """nu(y) = W y gives f = |(I - W) y|^2 / (2 sigma^2), so psi = -(I - W)^T (I - W) y / sigma^2."""
    M, d, sigma = 3, 2, 0.7
    lin = nn.Linear(M * d, M * d, bias=False).double()
    model = MEM2(lin, GaussianMNM(sigma, M), (d,), input_scaling=False)
    y = torch.randn(4, M, d, dtype=torch.float64)
    R = torch.eye(M * d, dtype=torch.float64) - lin.weight.detach()
    expect = -(y.reshape(4, -1) @ (R.T @ R).T) / sigma ** 2
    out = model.score(y)
    torch.testing.assert_close(out.psi.reshape(4, -1), expect)
    torch.testing.assert_close(out.xhat, (y + sigma ** 2 * out.psi).mean(1))


@pytest.mark.parametrize("kind", ["universal", "mdae", "mem2"])
def test_models_learn_gaussian_denoiser(kind):
    """A few hundred Adam steps on N(0, diag(1, .25)) data: the loss approaches the oracle's MSE."""
    torch.manual_seed(0)
    d, M, sigma = 2, 4, 1.0
    noise = GaussianMNM(sigma, M)
    lam = torch.tensor([1.0, 0.25])
    if kind == "universal":
        model = UniversalDenoiser(nn.Linear(d, d), noise, (d,), precond="none")
    elif kind == "mdae":
        model = MDAE(nn.Linear(M * d, M * d), noise, (d,))
    else:
        model = MEM2(nn.Linear(M * d, M * d, bias=False), noise, (d,))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        x = torch.randn(256, d, generator=g) * lam.sqrt()
        loss = model.loss(x, g)
        opt.zero_grad(); loss.backward(); opt.step()
    x = torch.randn(20000, d, generator=g) * lam.sqrt()
    with torch.no_grad() if kind != "mem2" else torch.enable_grad():
        final = model.loss(x, g).item()
    s2 = sigma ** 2 / M
    if kind == "universal":
        oracle_mse = (lam * s2 / (lam + s2)).mean().item()           # posterior variance given ybar
    else:
        # MDAE / MEM^2 estimate x from all of y (a sufficient statistic is ybar): same bound
        oracle_mse = (lam * s2 / (lam + s2)).mean().item()
    assert final < 1.15 * oracle_mse, (final, oracle_mse)
    assert final > 0.9 * oracle_mse                                  # nothing beats the Bayes risk


def test_mdae_full_walk_runs_and_reduced_is_refused():
    M, d = 3, 2
    model = MDAE(nn.Linear(M * d, M * d), GaussianMNM(1.0, M), (d,))
    eng = WalkJumpEngine(model, SamplerConfig(walk="full", block_size=4, jump_every=2), (d,), 0, [0])
    eng.initialize()
    rows = eng.run_collect(10)
    assert rows.xhat.shape == (4 * 5, d)
    with pytest.raises(ValueError, match="universal"):
        WalkJumpEngine(model, SamplerConfig(walk="reduced"), (d,), 0, [0])


# ---------------------------------------------------------------------------------------------
# Bad parameters
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,name", [
    (lambda: GaussianMNM(0.0, 2), "sigma"),
    (lambda: GaussianMNM(-1.0, 2), "sigma"),
    (lambda: GaussianMNM(float("nan"), 2), "sigma"),
    (lambda: GaussianMNM(1.0, 0), "M"),
    (lambda: PoissonMNM(0), "M"),
    (lambda: IntegratorParams.create(float("nan"), 1.0), "delta"),
    (lambda: IntegratorParams.create(0.1, float("inf")), "gamma"),
    (lambda: IntegratorParams.create(0.1, 1.0, -1.0), "u"),
    (lambda: SamplerConfig(delta=float("inf")).validate(), "delta"),
    (lambda: SamplerConfig(gamma=float("nan")).validate(), "gamma"),
    (lambda: SamplerConfig(jump_every=0).validate(), "jump_every"),
    (lambda: SamplerConfig(integrator="cheng", jump_at="full").validate(), "jump_at"),
    (lambda: WalkJumpEngine(gmm_oracle(), SamplerConfig(), (4,), 0, [0]), "event_shape"),
    (lambda: gmm_oracle().score(torch.randn(2, 5, 3, dtype=torch.float64)), "M"),
    (lambda: GaussianOracle([0.0, 0.0], [[1.0, 2.0], [0.0, 1.0]], GaussianMNM(1.0, 2)), "symmetric"),
    (lambda: GMMOracle([0.5, 0.6], [[0.0], [1.0]], [[[1.0]], [[1.0]]], GaussianMNM(1.0, 2)), "weights"),
])
def test_bad_parameters_raise_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()
