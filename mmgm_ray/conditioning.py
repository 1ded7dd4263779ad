"""Conditioning of the M-density in the Gaussian case (THEORY section 7) and a (M, sigma, delta) helper.

For X ~ N(mu, S) with covariance eigenvalues lambda_1 >= ... >= lambda_d >= 0, the M measurements
Y = (Y_1, ..., Y_M), Y_m = X + sigma N_m, have

    Cov(Y) = (1_M 1_M^T) kron S + sigma^2 I_{Md}

whose eigenvalues are sigma^2 + M lambda_i (eigenvectors 1_M/sqrt(M) kron e_i, once each) and sigma^2
(eigenvectors u kron e_i with u orthogonal to 1_M: multiplicity (M-1) d). The walk on y samples a
Gaussian with that covariance, so the condition number of its target is max/min of this spectrum:

* ``condition_number`` -- kappa of the M-density (the full walk in R^{Md}):
  1 + M lambda_max / sigma^2 when M >= 2 (the smallest eigenvalue is sigma^2), and
  (sigma^2 + lambda_max) / (sigma^2 + lambda_min) when M = 1 (there are no sigma^2-only directions).
  Both give 1 when every lambda is 0.
* ``ybar_condition_number`` -- kappa of the reduced walk's target (THEORY section 5), the density of
  ybar = X + sigma_eff N at sigma_eff = sigma / sqrt(M): Cov(ybar) = S + sigma_eff^2 I, so
  (lambda_max + sigma_eff^2) / (lambda_min + sigma_eff^2). It equals the M = 1 value at sigma_eff and
  is never above ``condition_number``.
* ``condition_number_fixed_sigma_eff`` -- 1 + lambda_max / sigma_eff^2: the M-density kappa for M >= 2
  rewritten with sigma_eff^2 = sigma^2 / M. At fixed sigma_eff it does not depend on M; it is also an
  upper bound of the ybar kappa (equal to it when lambda_min = 0).

Pure numpy: importing this module (and ``mmgm condition``) never imports Ray or torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from mmgm_ray.validators import positive as check_positive

DEFAULT_TARGET_KAPPA = 100.0


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def _check_eigenvalues(eigenvalues: Iterable[float] | np.ndarray) -> np.ndarray:
    """Return the eigenvalues as a float64 vector; ValueError naming 'eigenvalues' if bad."""
    try:
        lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"eigenvalues: not a list of numbers ({e})") from None
    if lam.size == 0:
        raise ValueError("eigenvalues: empty list")
    if not np.all(np.isfinite(lam)):
        raise ValueError("eigenvalues: must be finite numbers")
    if np.any(lam < 0):
        raise ValueError(f"eigenvalues: must be >= 0 (a covariance is positive semi-definite), "
                         f"got min {lam.min():g}")
    return lam


def _check_M(M: int, name: str = "M") -> int:
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)) or M < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {M!r}")
    return int(M)


def _check_sigma(sigma: float, name: str = "sigma") -> float:
    try:
        return check_positive(name, sigma)
    except ValueError:  # `mmgm condition` names its arguments as "name: problem"
        raise ValueError(f"{name}: must be a finite number > 0, got {sigma!r}") from None


def parse_eigenvalues(text: str) -> np.ndarray:
    """Parse a comma-separated list such as ``"4,1"`` into checked float64 eigenvalues."""
    if text is None or not str(text).strip():
        raise ValueError("eigenvalues: empty list")
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"eigenvalues: not a comma-separated list of numbers: {text!r}") from None
    return _check_eigenvalues(values)


# --------------------------------------------------------------------------------------------
# Spectra and condition numbers
# --------------------------------------------------------------------------------------------

def m_density_spectrum(eigenvalues: Iterable[float], M: int, sigma: float) -> np.ndarray:
    """Eigenvalues of Cov(Y) for X ~ N(mu, S) with the given covariance eigenvalues.

    Returns all M*d eigenvalues, sorted in decreasing order: sigma^2 + M lambda_i (once per i) and
    sigma^2 with multiplicity (M - 1) d. See ``spectrum_multiplicities`` for the compact form.
    """
    lam = _check_eigenvalues(eigenvalues)
    M, sigma = _check_M(M), _check_sigma(sigma)
    s2 = sigma * sigma
    out = np.concatenate([s2 + M * lam, np.full((M - 1) * lam.size, s2)])
    return np.sort(out)[::-1]


def spectrum_multiplicities(eigenvalues: Iterable[float], M: int, sigma: float,
                            rtol: float = 1e-12) -> list[tuple[float, int]]:
    """Distinct eigenvalues of Cov(Y) with their multiplicities, largest first.

    Computed from the closed form (no M*d array), so it is cheap for image-sized d.
    Values within ``rtol`` (relative) of each other are merged.
    """
    lam = _check_eigenvalues(eigenvalues)
    M, sigma = _check_M(M), _check_sigma(sigma)
    s2 = sigma * sigma
    vals = np.sort(s2 + M * lam)[::-1]
    groups: list[list[float | int]] = []
    for v in vals:
        if groups and abs(groups[-1][0] - v) <= rtol * max(abs(v), s2):
            groups[-1][1] += 1
        else:
            groups.append([float(v), 1])
    if M >= 2:
        extra = (M - 1) * lam.size
        if abs(groups[-1][0] - s2) <= rtol * s2:  # lambda_i == 0 already sits at sigma^2
            groups[-1][1] += extra
        else:
            groups.append([s2, extra])
    return [(float(v), int(k)) for v, k in groups]


def condition_number(eigenvalues: Iterable[float], M: int, sigma: float) -> float:
    """Condition number of Cov(Y), the target of the full walk on the M-density.

    max/min of ``m_density_spectrum``: 1 + M lambda_max / sigma^2 for M >= 2;
    (sigma^2 + lambda_max) / (sigma^2 + lambda_min) for M = 1; 1 when all lambda are 0.
    """
    lam = _check_eigenvalues(eigenvalues)
    M, sigma = _check_M(M), _check_sigma(sigma)
    s2 = sigma * sigma
    lmax = float(lam.max())
    if M >= 2:
        return 1.0 + M * lmax / s2
    return (s2 + lmax) / (s2 + float(lam.min()))


def ybar_condition_number(eigenvalues: Iterable[float], M: int, sigma: float) -> float:
    """Condition number of the reduced walk's target, the ybar density at sigma_eff = sigma/sqrt(M).

    Cov(ybar) = S + sigma_eff^2 I, so kappa = (lambda_max + sigma_eff^2) / (lambda_min + sigma_eff^2).
    """
    lam = _check_eigenvalues(eigenvalues)
    M, sigma = _check_M(M), _check_sigma(sigma)
    se2 = sigma * sigma / M
    return (float(lam.max()) + se2) / (float(lam.min()) + se2)


def condition_number_fixed_sigma_eff(eigenvalues: Iterable[float], sigma_eff: float) -> float:
    """1 + lambda_max / sigma_eff^2 (THEORY section 7, "at fixed sigma_eff").

    This is ``condition_number`` for any M >= 2 with sigma = sqrt(M) sigma_eff: at fixed sigma_eff
    it is independent of M. It bounds ``ybar_condition_number`` from above (equal when lambda_min = 0).
    It is not the M = 1 value unless lambda_min = 0.
    """
    lam = _check_eigenvalues(eigenvalues)
    se = _check_sigma(sigma_eff, "sigma_eff")
    return 1.0 + float(lam.max()) / (se * se)


def explicit_covariance(S: np.ndarray, M: int, sigma: float) -> np.ndarray:
    """The (M d) x (M d) matrix (1_M 1_M^T) kron S + sigma^2 I (for tests; y stacked channel-major)."""
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S: must be a square matrix, got shape {S.shape}")
    M, sigma = _check_M(M), _check_sigma(sigma)
    d = S.shape[0]
    return np.kron(np.ones((M, M)), S) + sigma * sigma * np.eye(M * d)


# --------------------------------------------------------------------------------------------
# Integrator stability
# --------------------------------------------------------------------------------------------

def aboba_max_step(curvature: float, u: float = 1.0) -> float:
    """Largest stable step of the A-B-O-B-A scheme (THEORY section 4) for the force psi = -k y.

    One step maps the mean of (y, v) by a 2x2 matrix with determinant zeta1 = exp(-gamma delta)
    and trace (1 + zeta1)(1 - u k delta^2 / 2); both eigenvalues lie inside the unit circle iff
    0 < u k delta^2 / 4 < 1, i.e. delta < 2 / sqrt(u k), whatever the friction gamma > 0.
    """
    k = _check_sigma(curvature, "curvature")
    u = _check_sigma(u, "u")
    return 2.0 / math.sqrt(u * k)


def walk_max_step(sigma: float, u: float = 1.0) -> float:
    """Stability bound on delta for the walk on the M-density: 2 sigma / sqrt(u).

    The stiffest curvature of -log p(y) is at most 1/sigma^2 for ANY data distribution (Tweedie:
    -Hess log p_s = (I - Cov(X|ybar)/s^2)/s^2 <= I/s^2, and the M-density adds the 1/sigma^2
    directions orthogonal to 1_M); in the Gaussian case with M >= 2 it equals 1/sigma^2. The
    reduced walk's curvatures 1/(sigma^2 + M lambda_i) are no stiffer, so the bound covers it too.
    """
    sigma = _check_sigma(sigma)
    return aboba_max_step(1.0 / (sigma * sigma), u)


# --------------------------------------------------------------------------------------------
# Suggestion
# --------------------------------------------------------------------------------------------

@dataclass
class Suggestion:
    """A suggested (M, sigma, delta) and the numbers behind it."""
    M: int
    sigma: float
    sigma_eff: float
    delta: float
    delta_max: float          # stability bound of A-B-O-B-A on the stiffest direction
    kappa: float              # condition number of the M-density (full walk)
    kappa_ybar: float         # condition number of the reduced walk's target
    target_kappa: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


def data_scale(eigenvalues: Iterable[float]) -> float:
    """Rough per-coordinate range of the data: 4 x the RMS per-coordinate std, sqrt(trace/d).

    For images in [0, 1] this is close to 1 (per-pixel std ~0.25-0.3), the scale at which MMGM
    used sigma = 1. A heuristic, not a statistic with guarantees.
    """
    lam = _check_eigenvalues(eigenvalues)
    return 4.0 * math.sqrt(float(lam.mean()))


def suggest(eigenvalues: Iterable[float], target_kappa: float = DEFAULT_TARGET_KAPPA,
            sigma: float | None = None, u: float = 1.0, delta_fraction: float = 0.5,
            max_M: int = 64) -> Suggestion:
    """Suggest (M, sigma, delta) for data with these covariance eigenvalues.

    Heuristic (Gaussian analysis of THEORY section 7; honest, not optimal):

    1. sigma_eff is the smallest noise whose M-density kappa, 1 + lambda_max / sigma_eff^2, is at most
       ``target_kappa``: sigma_eff = sqrt(lambda_max / (target_kappa - 1)). Smaller sigma_eff means
       sharper jumps (they approach p_X as sigma_eff -> 0) but a worse conditioned walk (more steps
       to cross the widest direction, roughly sqrt(kappa) for underdamped Langevin).
    2. sigma is the per-channel noise: the given ``sigma``, else ``data_scale`` (MMGM used sigma = 1
       for data in [0, 1]); each channel alone is then very noisy and smooth.
    3. M = floor((sigma / sigma_eff)^2), at least 1, so the realised sigma / sqrt(M) is >= sigma_eff and
       kappa stays <= target. At a fixed sigma, larger M means sharper jumps and a worse kappa
       (1 + M lambda_max / sigma^2); at a fixed sigma_eff, larger M does not change kappa (M >= 2)
       but costs more memory in full-dimensional walks. If sigma < sigma_eff, sigma is raised to
       sigma_eff and M = 1. M is capped at ``max_M`` (MMGM used M <= 16; full-dimensional walks
       and MDAE/MEM^2 networks cost memory linear in M); a cap only lowers kappa.
    4. delta = delta_fraction * sigma (MMGM default 0.5 sigma), capped at half of the A-B-O-B-A
       stability bound 2 sigma / sqrt(u) (``walk_max_step``).

    Degenerate data (all eigenvalues 0): conditioning does not limit M; M = 1 is returned with a note.
    """
    lam = _check_eigenvalues(eigenvalues)
    try:
        target = float(target_kappa)
    except (TypeError, ValueError):
        raise ValueError(f"target_kappa: must be a number > 1, got {target_kappa!r}") from None
    if not math.isfinite(target) or target <= 1.0:
        raise ValueError(f"target_kappa: must be a finite number > 1, got {target_kappa!r}")
    u = _check_sigma(u, "u")
    frac = _check_sigma(delta_fraction, "delta_fraction")
    max_M = _check_M(max_M, "max_M")
    notes: list[str] = []
    lmax = float(lam.max())
    sig = _check_sigma(sigma) if sigma is not None else None

    if lmax == 0.0:
        sig = sig if sig is not None else 1.0
        M = 1
        notes.append("all eigenvalues are 0: the data is a point, every (M, sigma) has kappa 1")
    else:
        se_min = math.sqrt(lmax / (target - 1.0))
        if sig is None:
            sig = data_scale(lam)
            notes.append(f"sigma = data scale 4*sqrt(trace/d) = {sig:.4g} (pass --sigma to choose it)")
        if sig < se_min:
            notes.append(f"sigma {sig:.4g} < sigma_eff {se_min:.4g} needed for the target: "
                         f"raised sigma to sigma_eff, M = 1")
            sig = se_min
        M = max(1, int(math.floor((sig / se_min) ** 2 * (1 + 1e-12))))
        # guard against round-off at the floor: kappa must not exceed the target
        while M > 1 and condition_number(lam, M, sig) > target * (1 + 1e-12):
            M -= 1
        if M > max_M:
            notes.append(f"M capped at max_M = {max_M} (uncapped {M}); kappa is below the target")
            M = max_M

    delta_max = walk_max_step(sig, u)
    delta = frac * sig
    if delta > 0.5 * delta_max:
        notes.append(f"delta {delta:.4g} capped at half the stability bound {delta_max:.4g}")
        delta = 0.5 * delta_max
    return Suggestion(M=M, sigma=sig, sigma_eff=sig / math.sqrt(M), delta=delta, delta_max=delta_max,
                      kappa=condition_number(lam, M, sig), kappa_ybar=ybar_condition_number(lam, M, sig),
                      target_kappa=target, notes=notes)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def covariance_eigenvalues_from_data(x: Any, chunk: int = 4096) -> np.ndarray:
    """Sample-covariance eigenvalues of a data set (N, ...) -> (d,), float64, descending, clipped at 0.

    Accepts a numpy array or a torch tensor; flattens each example. Accumulates the centred X^T X in
    float64 chunks so a large float32 data set is never copied whole to float64.
    """
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(f"data: need at least 2 examples, got shape {x.shape}")
    n = x.shape[0]
    x = x.reshape(n, -1)
    d = x.shape[1]
    # two passes (mean, then centred products): no cancellation when |mean| >> spread
    total = np.zeros(d)
    for i in range(0, n, chunk):
        total += x[i:i + chunk].astype(np.float64).sum(axis=0)
    mean = total / n
    gram = np.zeros((d, d))
    for i in range(0, n, chunk):
        b = x[i:i + chunk].astype(np.float64) - mean
        gram += b.T @ b
    cov = gram / (n - 1)
    cov = 0.5 * (cov + cov.T)
    if not np.all(np.isfinite(cov)):
        raise ValueError("data: covariance is not finite (NaN or inf in the data)")
    ev = np.linalg.eigvalsh(cov)[::-1]
    return np.clip(ev, 0.0, None)


def eigenvalues_of_dataset(name: str, path: str | None = None) -> np.ndarray:
    """Sample-covariance eigenvalues of a shipped data set (``mmgm condition --data NAME``)."""
    # imported here: the data loaders need torch, and `mmgm condition --eigenvalues` must not pay for it
    from mmgm_ray.config import DataConfig
    from mmgm_ray.data import load_dataset

    cfg = DataConfig(name=name, path=path)
    cfg.validate()  # unknown name / missing path -> ValueError naming data.name / data.path
    return covariance_eigenvalues_from_data(load_dataset(cfg).x)


# --------------------------------------------------------------------------------------------
# Report (what `mmgm condition` prints)
# --------------------------------------------------------------------------------------------

def report(eigenvalues: Sequence[float], M: int | None = None, sigma: float | None = None,
           target_kappa: float | None = None) -> dict[str, Any]:
    """Everything ``mmgm condition`` prints, as a JSON-ready dict.

    The analysed (M, sigma) are the given ones; a missing one is taken from the suggestion
    (which itself uses the given sigma when there is one).
    """
    lam = _check_eigenvalues(eigenvalues)
    if M is not None:
        _check_M(M)
    if sigma is not None:
        _check_sigma(sigma)
    target = DEFAULT_TARGET_KAPPA if target_kappa is None else target_kappa
    sug = suggest(lam, target_kappa=target, sigma=sigma)
    M_a = sug.M if M is None else int(M)
    s_a = sug.sigma if sigma is None else float(sigma)
    se = s_a / math.sqrt(M_a)
    return {
        "eigenvalues": {"d": int(lam.size), "max": float(lam.max()), "min": float(lam.min()),
                        "mean": float(lam.mean())},
        "M": M_a,
        "sigma": s_a,
        "sigma_eff": se,
        "from_suggestion": [k for k, v in (("M", M), ("sigma", sigma)) if v is None],
        "spectrum": [[v, k] for v, k in spectrum_multiplicities(lam, M_a, s_a)],
        "kappa_m_density": condition_number(lam, M_a, s_a),
        "kappa_ybar": ybar_condition_number(lam, M_a, s_a),
        "kappa_fixed_sigma_eff": condition_number_fixed_sigma_eff(lam, se),
        "delta_max": walk_max_step(s_a),
        "suggestion": sug.to_dict(),
    }


def _fmt_spectrum(spec: list[list[float]], head: int = 6, tail: int = 2) -> list[str]:
    rows = [f"    {v:.6g}  x{k}" for v, k in spec]
    if len(rows) > head + tail + 1:
        rows = rows[:head] + [f"    ... ({len(rows) - head - tail} more distinct values)"] + rows[-tail:]
    return rows


def format_report(rep: dict[str, Any]) -> str:
    """The human-readable form of :func:`report` (plus its ``source`` line)."""
    e, s = rep["eigenvalues"], rep["suggestion"]
    picked = f" ({', '.join(rep['from_suggestion'])} from the suggestion)" if rep["from_suggestion"] else ""
    lines = [
        f"source: {rep.get('source', 'eigenvalues')}; d = {e['d']}, lambda_max = {e['max']:.6g}, "
        f"lambda_min = {e['min']:.6g}",
        f"M = {rep['M']}, sigma = {rep['sigma']:.6g}, sigma_eff = sigma/sqrt(M) = {rep['sigma_eff']:.6g}{picked}",
        "Cov(Y) eigenvalues (value x multiplicity):",
        *_fmt_spectrum(rep["spectrum"]),
        f"kappa of the M-density (full walk): {rep['kappa_m_density']:.6g}",
        f"kappa of the ybar walk (density at sigma_eff): {rep['kappa_ybar']:.6g}",
        f"1 + lambda_max/sigma_eff^2 (M-density kappa for any M >= 2 at this sigma_eff): "
        f"{rep['kappa_fixed_sigma_eff']:.6g}",
        f"A-B-O-B-A stability bound on delta: {rep['delta_max']:.6g}",
        f"suggestion for target kappa {s['target_kappa']:.6g}: M = {s['M']}, sigma = {s['sigma']:.6g}, "
        f"delta = {s['delta']:.6g} (sigma_eff = {s['sigma_eff']:.6g}, kappa = {s['kappa']:.6g}, "
        f"ybar kappa = {s['kappa_ybar']:.6g})",
        *[f"  note: {n}" for n in s["notes"]],
    ]
    return "\n".join(lines)
