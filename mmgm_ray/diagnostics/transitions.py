"""Mode hopping between classes along walk-jump chains.

Input: integer labels shaped (chains, jumps), one class per jump in ``0..K-1`` (from a classifier,
the nearest class mean, or oracle responsibilities of a Gaussian mixture). A negative label means
"unknown" (e.g. a missing jump): transitions into or out of it are not counted, and it is ignored
by occupancy and visits.

Long-run walk-jump chains are meant to cross between modes (Saremi & Srivastava 2022, "Multimeasurement
generative models", ICLR; Saremi, Srivastava & Bach 2023, "Universal smoothed score functions for
generative modeling"); these counts show whether they do and how long they stay.
"""
from __future__ import annotations

import numpy as np

__all__ = ["transition_counts", "transition_matrix", "visit_fractions", "dwell_times",
           "class_occupancy", "transition_report"]


def _labels(labels, num_classes: int | None) -> tuple[np.ndarray, int]:
    lab = np.asarray(labels)
    if lab.ndim == 1:
        lab = lab[None, :]
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be an integer array shaped (chains, jumps), got {lab.dtype} {lab.shape}")
    k = int(lab.max()) + 1 if num_classes is None else int(num_classes)
    if lab.size and lab.max() >= k:
        raise ValueError(f"label {int(lab.max())} >= num_classes {k}")
    return lab.astype(np.int64, copy=False), max(k, 1)


def transition_counts(labels, num_classes: int | None = None) -> np.ndarray:
    """K x K matrix N[i, j] = number of consecutive jump pairs (t, t+1) with class i then class j,
    summed over chains. Pairs touching a negative (unknown) label are skipped."""
    lab, k = _labels(labels, num_classes)
    a, b = lab[:, :-1].ravel(), lab[:, 1:].ravel()
    ok = (a >= 0) & (b >= 0)
    return np.bincount(a[ok] * k + b[ok], minlength=k * k).reshape(k, k)


def transition_matrix(labels, num_classes: int | None = None) -> np.ndarray:
    """Row-normalized transition counts: the maximum-likelihood estimate of the class-level
    transition matrix P[i, j] = Pr(class j at jump t+1 | class i at jump t). Rows of classes never
    left from are NaN."""
    n = transition_counts(labels, num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n / n.sum(axis=1, keepdims=True)


def visit_fractions(labels, num_classes: int | None = None) -> np.ndarray:
    """f[k] = fraction of chains that visit exactly k distinct classes, k = 0..K (index = count)."""
    lab, k = _labels(labels, num_classes)
    seen = np.zeros((lab.shape[0], k), dtype=bool)
    rows = np.broadcast_to(np.arange(lab.shape[0])[:, None], lab.shape)
    ok = lab >= 0
    seen[rows[ok], lab[ok]] = True
    visits = seen.sum(axis=1)
    return np.bincount(visits, minlength=k + 1) / max(lab.shape[0], 1)


def dwell_times(labels, num_classes: int | None = None) -> dict:
    """Run lengths of consecutive jumps in one class.

    Returns ``mean`` (mean run length over all runs of known labels, in jumps), ``per_class``
    (K,) mean run length per class (NaN for classes never seen), ``runs`` (K,) run counts and
    ``censored_fraction`` (runs cut by the start or end of a chain; their true length is longer,
    so the means are lower bounds when this is large).
    """
    lab, k = _labels(labels, num_classes)
    c, n = lab.shape
    start = np.ones((c, n), dtype=bool)
    start[:, 1:] = lab[:, 1:] != lab[:, :-1]
    known = lab >= 0
    start &= known
    runs = np.bincount(lab[start], minlength=k)
    occ = np.bincount(lab[known], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = occ / runs
    total_runs = int(runs.sum())
    # runs touching the first or last jump are cut short by the chain's ends (a whole-chain run once)
    whole = known.all(axis=1) & (start.sum(axis=1) == 1)
    censored = int(known[:, 0].sum() + known[:, -1].sum() - whole.sum()) if n else 0
    return {"mean": float(occ.sum() / total_runs) if total_runs else float("nan"),
            "per_class": per_class, "runs": runs,
            "censored_fraction": censored / total_runs if total_runs else float("nan")}


def class_occupancy(labels, reference=None, num_classes: int | None = None) -> dict:
    """Fraction of jumps in each class, pooled over chains, and its distance to ``reference``
    (class probabilities, e.g. the data set's label frequencies or mixture weights).

    Returns ``occupancy`` (K,), and with a reference: ``reference`` (K,), ``tv`` (total variation
    0.5 sum|p - q|), ``max_abs_diff``, ``kl`` (KL(occupancy || reference), nats) and ``per_chain_tv``
    (mean over chains of each chain's own TV distance: large while chains are stuck in modes even
    when the pooled occupancy is right)."""
    lab, k = _labels(labels, num_classes)
    if reference is not None:
        k = max(k, len(reference))
    known = lab >= 0
    occ = np.bincount(lab[known], minlength=k).astype(np.float64)
    occ /= max(occ.sum(), 1.0)
    out = {"occupancy": occ}
    if reference is None:
        return out
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != (k,) or (ref < 0).any() or not np.isclose(ref.sum(), 1.0):
        raise ValueError(f"reference must be {k} non-negative probabilities summing to 1")
    with np.errstate(invalid="ignore", divide="ignore"):
        kl = float(np.sum(np.where(occ > 0, occ * np.log(occ / ref), 0.0)))
    rows = np.broadcast_to(np.arange(lab.shape[0])[:, None], lab.shape)
    per_chain = np.zeros((lab.shape[0], k))
    np.add.at(per_chain, (rows[known], lab[known]), 1.0)
    per_chain /= np.maximum(per_chain.sum(axis=1, keepdims=True), 1.0)
    out.update(reference=ref, tv=float(0.5 * np.abs(occ - ref).sum()),
               max_abs_diff=float(np.abs(occ - ref).max()), kl=kl,
               per_chain_tv=float(0.5 * np.abs(per_chain - ref).sum(axis=1).mean()))
    return out


def transition_report(labels, num_classes: int | None = None, reference=None) -> dict:
    """All of the above as one JSON-able dict (lists, floats)."""
    counts = transition_counts(labels, num_classes)
    k = counts.shape[0]
    occ = class_occupancy(labels, reference, k)
    dwell = dwell_times(labels, k)
    pairs = counts.sum()
    return {
        "num_classes": k,
        "transition_counts": counts.tolist(),
        "transition_matrix": np.nan_to_num(transition_matrix(labels, k), nan=0.0).tolist(),
        "switch_rate": float((pairs - np.trace(counts)) / pairs) if pairs else float("nan"),
        "visit_fractions": visit_fractions(labels, k).tolist(),
        "dwell_mean": dwell["mean"], "dwell_per_class": np.nan_to_num(dwell["per_class"], nan=0.0).tolist(),
        "dwell_censored_fraction": dwell["censored_fraction"],
        **{key: (v.tolist() if isinstance(v, np.ndarray) else v) for key, v in occ.items()},
    }
