"""What one run's report is made of: :class:`ReportInputs`.

Contract
--------
``report`` is the run's JSON report as ``mmgm run`` writes it (every key optional; a missing one
makes its section say why it is missing instead of failing):

* ``name``: the run's name (page title).
* ``train``: ``{"history": [{"step", "loss", "ema_loss"?, ...}, ...], ...}`` (metrics.jsonl records).
* ``sample``: ``{"status": "done" | "running" | ..., "rows", "samples", "divergences", ...}``;
  a status other than ``done`` marks the whole report as a run still in progress.
* ``diagnostics``: :func:`mmgm_ray.postprocess.diagnose` output: ``stats`` {functional: {rhat,
  ess_bulk, ess_tail, ...}} (list values, e.g. ``proj``, are one functional per entry:
  ``proj_0``, ``proj_1``, ...), ``draws``, ``chains_used``, ``burn_in``, ``transitions``
  (:func:`mmgm_ray.diagnostics.transition_report`).
* ``fid``: ``{"fid", "real_floor", "n", "n_reference"?, "reference"?, "windows"?}`` where each
  window is ``{"start", "end", "fid", "n"?}``: the FID of the jumps with ``start <= jump_index <
  end`` (chain-length windows show whether sample quality still changes along the chains).
* ``config`` (the run's config dict), ``seeds`` (dict), ``model_hash``, ``code_version``.

The arrays are what the JSON cannot hold: per-jump functionals (the store's functionals table:
one float column per functional, pivoted to ``(chains, draws)``), a filmstrip of a few chains'
successive jumps, the final jumps, and the class statistics of labelled data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["ReportInputs"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"ReportInputs: {msg}")


@dataclass
class ReportInputs:
    """Everything :func:`mmgm_ray.report.render_report` shows for one run (see the module docstring).

    Attributes:
        report: the run's JSON report (sections described above).
        functionals: name -> float array ``(chains, draws)``; NaN marks a missing jump. Every
            functional has the same shape. Traces, rank plots and autocorrelations come from
            here, and so do R-hat / ESS of functionals the report's ``diagnostics`` lacks.
        chain_ids: ``(chains,)`` ids of the functionals' rows (default 0..chains-1).
        jump_index: ``(draws,)`` jump index of each functional column (default 0..draws-1).
        filmstrip: ``(chains, frames, C, H, W)`` successive jumps of a few chains, in [0, 1].
        filmstrip_labels: ``(chains, frames)`` int class of each frame, -1 when unknown.
        filmstrip_chain_ids: ``(chains,)`` chain id of each filmstrip row.
        filmstrip_jumps: ``(frames,)`` jump index of each filmstrip column.
        final_jumps: ``(n, C, H, W)`` the chains' last jumps, in [0, 1].
        transition_matrix: ``(K, K)`` class transition probabilities (row i: from class i); when
            None, taken from ``report["diagnostics"]["transitions"]`` if there.
        class_frequencies: ``(K,)`` fraction of sampled jumps in each class (same fallback).
        data_class_frequencies: ``(K,)`` the data set's class frequencies (same fallback).
        class_names: ``K`` display names (default "0".."K-1").
        rhat_threshold, min_ess: the mixing criterion of the verdict: every functional has R-hat
            below ``rhat_threshold`` and bulk ESS of at least ``min_ess``.
    """

    report: dict = field(default_factory=dict)
    functionals: Mapping[str, np.ndarray] = field(default_factory=dict)
    chain_ids: Optional[np.ndarray] = None
    jump_index: Optional[np.ndarray] = None
    filmstrip: Optional[np.ndarray] = None
    filmstrip_labels: Optional[np.ndarray] = None
    filmstrip_chain_ids: Optional[np.ndarray] = None
    filmstrip_jumps: Optional[np.ndarray] = None
    final_jumps: Optional[np.ndarray] = None
    transition_matrix: Optional[np.ndarray] = None
    class_frequencies: Optional[np.ndarray] = None
    data_class_frequencies: Optional[np.ndarray] = None
    class_names: Optional[Sequence[str]] = None
    rhat_threshold: float = 1.05
    min_ess: float = 400.0

    def __post_init__(self) -> None:
        _check(isinstance(self.report, dict), f"report must be a dict, got {type(self.report).__name__}")
        _check(self.rhat_threshold > 1.0, f"rhat_threshold must be > 1, got {self.rhat_threshold}")
        _check(self.min_ess > 0, f"min_ess must be > 0, got {self.min_ess}")
        self.functionals = {str(k): np.asarray(v, dtype=np.float64) for k, v in self.functionals.items()}
        shapes = {k: v.shape for k, v in self.functionals.items()}
        _check(all(len(s) == 2 for s in shapes.values()),
               f"functionals must be (chains, draws) arrays, got shapes {shapes}")
        _check(len(set(shapes.values())) <= 1, f"functionals must share one shape, got {shapes}")
        chains, draws = next(iter(shapes.values())) if shapes else (0, 0)
        self.chain_ids = self._vector("chain_ids", self.chain_ids, chains)
        self.jump_index = self._vector("jump_index", self.jump_index, draws)
        self._check_images()
        self._check_classes()

    @staticmethod
    def _vector(name: str, v, n: int) -> np.ndarray:
        if v is None:
            return np.arange(n, dtype=np.int64)
        v = np.asarray(v)
        _check(v.shape == (n,), f"{name} must have shape ({n},), got {v.shape}")
        return v

    def _check_images(self) -> None:
        if self.filmstrip is not None:
            f = self.filmstrip = np.asarray(self.filmstrip, dtype=np.float32)
            _check(f.ndim == 5 and f.shape[2] in (1, 3),
                   f"filmstrip must be (chains, frames, C, H, W) with C in (1, 3), got {f.shape}")
            c, t = f.shape[:2]
            if self.filmstrip_labels is not None:
                lab = self.filmstrip_labels = np.asarray(self.filmstrip_labels)
                _check(lab.shape == (c, t) and np.issubdtype(lab.dtype, np.integer),
                       f"filmstrip_labels must be int ({c}, {t}), got {lab.dtype} {lab.shape}")
            self.filmstrip_chain_ids = self._vector("filmstrip_chain_ids", self.filmstrip_chain_ids, c)
            self.filmstrip_jumps = self._vector("filmstrip_jumps", self.filmstrip_jumps, t)
        else:
            _check(self.filmstrip_labels is None, "filmstrip_labels given without a filmstrip")
        if self.final_jumps is not None:
            x = self.final_jumps = np.asarray(self.final_jumps, dtype=np.float32)
            _check(x.ndim == 4 and x.shape[1] in (1, 3) and len(x) > 0,
                   f"final_jumps must be a non-empty (n, C, H, W) with C in (1, 3), got {x.shape}")

    def _check_classes(self) -> None:
        for name in ("transition_matrix", "class_frequencies", "data_class_frequencies"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, np.asarray(v, dtype=np.float64))
        if self.transition_matrix is not None:
            k = self.transition_matrix.shape[0]
            _check(self.transition_matrix.shape == (k, k),
                   f"transition_matrix must be square, got {self.transition_matrix.shape}")
        for name in ("class_frequencies", "data_class_frequencies"):
            v = getattr(self, name)
            _check(v is None or v.ndim == 1, f"{name} must be a vector, got shape {None if v is None else v.shape}")

    @property
    def in_progress(self) -> bool:
        """True while sampling has not finished (``report["sample"]["status"]`` other than done)."""
        return (self.report.get("sample") or {}).get("status") != "done"
