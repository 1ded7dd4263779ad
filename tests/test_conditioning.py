"""Conditioning of the M-density (THEORY section 7): closed forms vs explicit covariances, CLI, suggestion."""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from mmgm_ray import conditioning as C
from mmgm_ray.cli import main


def _random_spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    A = rng.standard_normal((d, rank or d))
    return A @ A.T / d + (0.0 if rank else 1e-3) * np.eye(d)


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


# ---- closed forms vs numpy -------------------------------------------------------------------

@pytest.mark.parametrize("M,sigma", [(1, 0.3), (1, 2.0), (2, 1.0), (3, 0.5), (8, 1.0), (16, 0.7)])
@pytest.mark.parametrize("rank", [None, 2])  # full rank, and singular S (lambda_min = 0)
def test_spectrum_matches_explicit_covariance(M, sigma, rank):
    rng = np.random.default_rng(100 * M + (rank or 0))
    d = 4
    S = _random_spd(d, rng, rank)
    lam = np.clip(np.linalg.eigvalsh(S), 0, None)
    cov = C.explicit_covariance(S, M, sigma)
    assert cov.shape == (M * d, M * d)
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    np.testing.assert_allclose(C.m_density_spectrum(lam, M, sigma), ev, rtol=1e-9, atol=1e-9)
    kappa_np = ev.max() / ev.min()
    assert C.condition_number(lam, M, sigma) == pytest.approx(kappa_np, rel=1e-8)
    # the multiplicities add up to M d and reproduce the full spectrum
    mult = C.spectrum_multiplicities(lam, M, sigma, rtol=1e-9)
    assert sum(k for _, k in mult) == M * d
    np.testing.assert_allclose(np.repeat([v for v, _ in mult], [k for _, k in mult]), ev, rtol=1e-8)


def test_explicit_covariance_is_cov_of_samples():
    """Cov(Y) of simulated measurements matches the Kronecker form (checks the model, not only algebra)."""
    rng = np.random.default_rng(0)
    d, M, sigma, n = 3, 4, 0.8, 200_000
    S = _random_spd(d, rng)
    x = rng.multivariate_normal(np.zeros(d), S, size=n)
    y = (x[:, None, :] + sigma * rng.standard_normal((n, M, d))).reshape(n, M * d)
    np.testing.assert_allclose(np.cov(y.T), C.explicit_covariance(S, M, sigma), atol=0.03)


def test_condition_number_formulas_and_edge_cases():
    lam = [4.0, 1.0]
    assert C.condition_number(lam, 8, 1.0) == pytest.approx(33.0)
    # M = 1: (sigma^2 + lmax) / (sigma^2 + lmin), not 1 + lmax / sigma^2
    assert C.condition_number(lam, 1, 1.0) == pytest.approx(5.0 / 2.0)
    # all eigenvalues 0: every direction has variance sigma^2
    for M in (1, 2, 5):
        assert C.condition_number([0.0, 0.0, 0.0], M, 0.7) == pytest.approx(1.0)
    # ybar walk: (lmax + s_eff^2) / (lmin + s_eff^2), s_eff^2 = 1/8
    assert C.ybar_condition_number(lam, 8, 1.0) == pytest.approx((4 + 1 / 8) / (1 + 1 / 8))
    # the ybar target is the M = 1 density at sigma_eff
    assert C.ybar_condition_number(lam, 8, 1.0) == pytest.approx(C.condition_number(lam, 1, 1 / math.sqrt(8)))
    # fixed sigma_eff: the M-density kappa for every M >= 2, independent of M
    se = 0.25
    for M in (2, 4, 16):
        assert C.condition_number(lam, M, se * math.sqrt(M)) == pytest.approx(
            C.condition_number_fixed_sigma_eff(lam, se))
    # and it bounds the ybar kappa, with equality when lambda_min = 0
    assert C.ybar_condition_number(lam, 4, 0.5) < C.condition_number_fixed_sigma_eff(lam, 0.25)
    assert C.ybar_condition_number([4.0, 0.0], 4, 0.5) == pytest.approx(
        C.condition_number_fixed_sigma_eff([4.0, 0.0], 0.25))


# ---- CLI -------------------------------------------------------------------------------------

def test_cli_reports_33():
    rc, out, _ = _run_cli(["condition", "--eigenvalues", "4,1", "--M", "8", "--sigma", "1"])
    assert rc == 0
    assert "kappa of the M-density (full walk): 33" in out
    rc, out, _ = _run_cli(["condition", "--eigenvalues", "4,1", "--M", "8", "--sigma", "1", "--json"])
    assert rc == 0
    rep = json.loads(out)
    assert rep["kappa_m_density"] == pytest.approx(33.0)
    assert rep["kappa_ybar"] == pytest.approx((4 + 1 / 8) / (1 + 1 / 8))
    assert rep["spectrum"] == [[33.0, 1], [9.0, 1], [1.0, 14]]
    assert rep["M"] == 8 and rep["sigma"] == 1.0 and rep["from_suggestion"] == []


def test_cli_without_M_sigma_uses_suggestion():
    rc, out, _ = _run_cli(["condition", "--eigenvalues", "4,1", "--target-kappa", "50", "--json"])
    assert rc == 0
    rep = json.loads(out)
    assert rep["from_suggestion"] == ["M", "sigma"]
    assert rep["M"] == rep["suggestion"]["M"]
    assert rep["kappa_m_density"] <= 50 * (1 + 1e-9)


@pytest.mark.parametrize("argv,param", [
    (["--eigenvalues", "4,-1", "--M", "2", "--sigma", "1"], "eigenvalues"),
    (["--eigenvalues", "", "--M", "2", "--sigma", "1"], "eigenvalues"),
    (["--eigenvalues", "4,abc", "--M", "2", "--sigma", "1"], "eigenvalues"),
    (["--eigenvalues", "4,1", "--M", "0", "--sigma", "1"], "M"),
    (["--eigenvalues", "4,1", "--M", "2", "--sigma", "0"], "sigma"),
    (["--eigenvalues", "4,1", "--M", "2", "--sigma", "-1"], "sigma"),
    (["--eigenvalues", "4,1", "--target-kappa", "1"], "target_kappa"),
])
def test_cli_bad_inputs_exit_2(argv, param):
    rc, out, err = _run_cli(["condition", *argv])
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and f"{param}:" in err


@pytest.mark.parametrize("call,param", [
    (lambda: C.condition_number([1.0, -0.5], 2, 1.0), "eigenvalues"),
    (lambda: C.condition_number([], 2, 1.0), "eigenvalues"),
    (lambda: C.condition_number([1.0, float("nan")], 2, 1.0), "eigenvalues"),
    (lambda: C.m_density_spectrum([1.0], 0, 1.0), "M"),
    (lambda: C.m_density_spectrum([1.0], 2.5, 1.0), "M"),
    (lambda: C.ybar_condition_number([1.0], 2, 0.0), "sigma"),
    (lambda: C.explicit_covariance(np.eye(2), -1, 1.0), "M"),
    (lambda: C.suggest([1.0], target_kappa=0.5), "target_kappa"),
    (lambda: C.condition_number_fixed_sigma_eff([1.0], -1.0), "sigma_eff"),
])
def test_bad_inputs_raise_value_error(call, param):
    with pytest.raises(ValueError, match=f"^{param}:"):
        call()


# ---- suggestion ------------------------------------------------------------------------------

def _aboba_mean_map(k: float, delta: float, gamma: float, u: float) -> np.ndarray:
    """Mean map of one A-B-O-B-A step (THEORY section 4) for psi = -k y, built step by step."""
    A = np.array([[1.0, delta / 2], [0.0, 1.0]])
    B = np.array([[1.0, 0.0], [-u * k * delta / 2, 1.0]])
    O = np.diag([1.0, math.exp(-gamma * delta)])
    return A @ B @ O @ B @ A


@pytest.mark.parametrize("gamma", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("u", [0.5, 1.0, 4.0])
def test_aboba_stability_bound_is_sharp(gamma, u):
    k = 1 / 0.7 ** 2
    h = C.aboba_max_step(k, u)
    rho = lambda d: max(abs(np.linalg.eigvals(_aboba_mean_map(k, d, gamma, u))))
    assert rho(0.99 * h) < 1.0
    assert rho(1.01 * h) > 1.0


@pytest.mark.parametrize("target", [10.0, 100.0, 1000.0])
@pytest.mark.parametrize("sigma", [None, 1.0, 0.05])
def test_suggestion_respects_target_and_stability(target, sigma):
    rng = np.random.default_rng(7)
    lam = np.sort(rng.gamma(0.5, 0.2, size=64))[::-1]
    s = C.suggest(lam, target_kappa=target, sigma=sigma)
    assert s.M >= 1
    assert s.kappa <= target * (1 + 1e-9)
    assert s.kappa == pytest.approx(C.condition_number(lam, s.M, s.sigma))
    assert s.kappa_ybar <= s.kappa * (1 + 1e-12)
    assert s.sigma_eff == pytest.approx(s.sigma / math.sqrt(s.M))
    assert 0 < s.delta < s.delta_max
    assert s.delta_max == pytest.approx(2 * s.sigma)  # u = 1: stiffest curvature 1/sigma^2
    # the step is stable on the stiffest direction of the Gaussian M-density
    k_max = 1 / min(C.m_density_spectrum(lam, s.M, s.sigma))
    assert max(abs(np.linalg.eigvals(_aboba_mean_map(k_max, s.delta, 0.5, 1.0)))) < 1
    if sigma is not None and s.M > 1:
        assert s.sigma == sigma
        # one more measurement would break the target (M is as large as the target allows)
        assert C.condition_number(lam, s.M + 1, s.sigma) > target or s.M == 64


def test_suggestion_mmgm_like_defaults():
    # sigma = 1, lambda_max = 4, target 65 -> sigma_eff = 0.25 -> M = 16 (MNIST-like MMGM setting)
    s = C.suggest([4.0, 1.0, 0.5], target_kappa=65.0, sigma=1.0)
    assert s.M == 16 and s.delta == pytest.approx(0.5) and s.kappa == pytest.approx(65.0)
    # sigma below the needed sigma_eff -> M = 1 and sigma raised
    s = C.suggest([4.0], target_kappa=5.0, sigma=0.1)
    assert s.M == 1 and s.sigma == pytest.approx(1.0) and s.kappa <= 5.0 + 1e-9
    # degenerate data
    s = C.suggest([0.0, 0.0])
    assert s.M == 1 and s.kappa == 1.0 and s.notes
    # cap on M
    s = C.suggest([1.0], target_kappa=1e6, sigma=1.0, max_M=8)
    assert s.M == 8 and s.kappa < 1e6


# ---- data ------------------------------------------------------------------------------------

def test_covariance_eigenvalues_from_data_numpy_and_torch():
    import torch
    rng = np.random.default_rng(3)
    S = _random_spd(5, rng, rank=3)
    x = rng.multivariate_normal(np.ones(5), S, size=4000).reshape(4000, 1, 5).astype(np.float32)
    ev = C.covariance_eigenvalues_from_data(x, chunk=333)
    ref = np.clip(np.linalg.eigvalsh(np.cov(x.reshape(4000, -1).astype(np.float64).T)), 0, None)[::-1]
    np.testing.assert_allclose(ev, ref, atol=1e-9)
    assert ev.dtype == np.float64 and np.all(ev >= 0) and np.all(np.diff(ev) <= 0)
    np.testing.assert_allclose(C.covariance_eigenvalues_from_data(torch.from_numpy(x)), ev, atol=1e-9)
    # a large offset does not cancel the spread (centred accumulation)
    np.testing.assert_allclose(C.covariance_eigenvalues_from_data(x.astype(np.float64) + 1e4, chunk=333),
                               ev, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="^data:"):
        C.covariance_eigenvalues_from_data(x[:1])


def test_cli_data_digits():
    rc, out, err = _run_cli(["condition", "--data", "digits", "--M", "16", "--sigma", "1", "--json"])
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["eigenvalues"]["d"] == 64
    lmax = rep["eigenvalues"]["max"]
    assert rep["kappa_m_density"] == pytest.approx(1 + 16 * lmax)


def test_cli_data_unknown_name_exit_2():
    rc, _, err = _run_cli(["condition", "--data", "no_such_set"])
    assert rc == 2 and "data.name" in err


def test_format_report_lines():
    """The text form names the source and every condition number the JSON form holds."""
    rep = {**C.report([4.0, 1.0], M=8, sigma=1.0), "source": "eigenvalues"}
    text = C.format_report(rep)
    assert text.startswith("source: eigenvalues; d = 2")
    assert "kappa of the M-density (full walk): 33" in text
    assert f"A-B-O-B-A stability bound on delta: {rep['delta_max']:.6g}" in text
