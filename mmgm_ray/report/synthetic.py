"""A small, fully known :class:`ReportInputs` for tests and for looking at the report's layout.

Chains walk between the ten classes of scikit-learn's 8x8 digits (shipped with the package, no
download): each chain's class is a Markov chain that stays with probability ``1 - switch`` and
otherwise jumps to a uniformly drawn class, and each jump shows a digit image of its class. The
functionals are AR(1) processes with coefficient ``rho`` around a class-dependent mean, so
``mixed=False`` (no class switches: each chain keeps its start class) makes R-hat large exactly
as chains stuck in modes do.
"""
from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from mmgm_ray.diagnostics import transitions
from mmgm_ray.report.inputs import ReportInputs

__all__ = ["synthetic_inputs"]

_K = 10


def _class_paths(rng: np.random.Generator, chains: int, draws: int, switch: float) -> np.ndarray:
    lab = np.empty((chains, draws), dtype=np.int64)
    lab[:, 0] = rng.integers(0, _K, chains)
    for t in range(1, draws):
        move = rng.random(chains) < switch
        lab[:, t] = np.where(move, rng.integers(0, _K, chains), lab[:, t - 1])
    return lab


def _ar1(rng: np.random.Generator, mean: np.ndarray, rho: float) -> np.ndarray:
    # stationary AR(1) around a moving mean: x_t - m_t = rho (x_{t-1} - m_{t-1}) + sqrt(1-rho^2) e_t
    e = rng.standard_normal(mean.shape)
    dev = np.empty_like(mean)
    dev[:, 0] = e[:, 0]
    for t in range(1, mean.shape[1]):
        dev[:, t] = rho * dev[:, t - 1] + np.sqrt(1.0 - rho ** 2) * e[:, t]
    return mean + dev


def _digit_of(rng: np.random.Generator, images: np.ndarray, targets: np.ndarray, lab: np.ndarray) -> np.ndarray:
    by_class = [np.flatnonzero(targets == k) for k in range(_K)]
    pick = np.array([rng.choice(by_class[k]) for k in lab.ravel()])
    return images[pick].reshape(*lab.shape, 1, 8, 8)


def _report(rng, chains: int, draws: int, lab: np.ndarray, ref: np.ndarray, *, fid: bool,
            in_progress: bool) -> dict:
    steps = np.arange(50, 2001, 50)
    loss = 0.05 + 0.4 * np.exp(-steps / 400.0) * np.exp(0.05 * rng.standard_normal(steps.size))
    history = [{"step": int(s), "loss": float(v), **({"ema_loss": float(v * 0.95)} if s % 500 == 0 else {})}
               for s, v in zip(steps, loss)]
    report = {
        "name": "synthetic-digits",
        "train": {"history": history, "steps": 2000, "final_loss": float(loss[-1])},
        "sample": {"status": "running" if in_progress else "done", "rows": int(chains * draws),
                   "samples": int(chains * draws), "divergences": 0},
        "diagnostics": {"chains": chains, "chains_used": chains, "draws": draws, "burn_in": 0},
        "config": {"name": "synthetic-digits", "seed": 0, "noise": {"kind": "gaussian", "sigma": 1.0, "M": 16},
                   "pool": {"num_chains": chains, "num_steps": draws * 10},
                   "store": {"url": "runs", "storage_options": {"secret": "s3cr3t"}}},
        "seeds": {"run": 0, "data": 0},
        "model_hash": "sha256:0123456789abcdef",
        "code_version": {"package": "0.1.0", "git_commit": "0" * 40},
    }
    if lab is not None:
        report["diagnostics"]["transitions"] = transitions.transition_report(lab, _K, ref)
    if fid and not in_progress:
        edges = np.linspace(0, draws, 5).astype(int)
        report["fid"] = {"fid": 21.5, "real_floor": 9.8, "n": 200, "n_reference": 500,
                         "reference": "first 500 digits train images",
                         "windows": [{"start": int(a), "end": int(b), "fid": float(40.0 * np.exp(-i) + 21.0), "n": 200}
                                     for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]}
    return report


def synthetic_inputs(*, chains: int = 8, draws: int = 300, frames: int = 10, n_final: int = 36,
                     labels: bool = True, fid: bool = True, in_progress: bool = False, mixed: bool = True,
                     rho: float = 0.3, switch: float = 0.5, seed: int = 0) -> ReportInputs:
    """Report inputs of a made-up digits run (see the module docstring).

    ``labels=False`` drops every class statistic (unlabelled data); ``fid=False`` drops the FID
    section; ``in_progress=True`` marks sampling as still running (no FID either); ``mixed=False``
    keeps every chain in its first class."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    lab = _class_paths(rng, chains, draws, switch if mixed else 0.0)
    offsets = rng.standard_normal((4, _K)) * 1.5  # class means of the projections
    functionals = {f"proj_{i}": _ar1(rng, offsets[i][lab], rho) for i in range(4)}
    functionals["mean_intensity"] = _ar1(rng, 0.3 + 0.02 * lab, rho)
    functionals["score_norm"] = np.abs(_ar1(rng, np.full(lab.shape, 10.0), rho))
    cols = np.linspace(0, draws - 1, frames).astype(int)
    strip = min(chains, 5)
    ref = np.bincount(digits.target, minlength=_K) / digits.target.size
    occ = transitions.class_occupancy(lab, ref, _K)
    return ReportInputs(
        report=_report(rng, chains, draws, lab if labels else None, ref, fid=fid, in_progress=in_progress),
        functionals=functionals,
        chain_ids=np.arange(100, 100 + chains),
        jump_index=np.arange(draws),
        filmstrip=_digit_of(rng, images, digits.target, lab[:strip, cols]),
        filmstrip_labels=lab[:strip, cols] if labels else None,
        filmstrip_chain_ids=np.arange(100, 100 + strip),
        filmstrip_jumps=cols,
        final_jumps=_digit_of(rng, images, digits.target, lab[np.arange(n_final) % chains, -1][None])[0],
        transition_matrix=transitions.transition_matrix(lab, _K) if labels else None,
        class_frequencies=occ["occupancy"] if labels else None,
        data_class_frequencies=ref if labels else None,
        class_names=[str(k) for k in range(_K)] if labels else None,
    )
