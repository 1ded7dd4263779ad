"""FID and KID on TF Inception-v3 pool3 features; mergeable statistics; cached reference statistics.

* Heusel, Ramsauer, Unterthiner, Nessler & Hochreiter (2017), "GANs trained by a two time-scale
  update rule converge to a local Nash equilibrium", NeurIPS (FID).
* Bińkowski, Sutherland, Arbel & Gretton (2018), "Demystifying MMD GANs", ICLR (KID: unbiased
  MMD^2 with the kernel k(x, y) = (x.y/d + 1)^3, averaged over subsets).

Features come from :class:`~mmgm_ray.diagnostics.inception.InceptionFeatures` under the preprocessing
``"uint8-nv-bilinear-299"`` (uint8 quantization, NVIDIA/TF1 bilinear resize to 299: the convention
behind published FIDs, see that module). Every :class:`FeatureStats` records its preprocessing name
and the sha256 of the weights; FIDs refuse to compare statistics whose labels differ. Definitions
and the published numbers to compare with: ``docs/THEORY.md`` section 8.

FID is biased upward at small N: compare at equal N (CIFAR-10 convention: 50,000 samples against
the training set's statistics). KID's estimator is unbiased and can be compared across N.

Statistics are sums (n, sum x, sum x x^T) in float64, so partial statistics from many workers merge
exactly (:meth:`FeatureStats.merge`): a Ray pool computes features per block, the driver adds.
On disk they are the usual ``mu``/``sigma``/``n`` .npz plus ``meta_*`` labels.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from typing import Callable, Iterable, Iterator, Mapping

import fsspec
import numpy as np

from mmgm_ray.diagnostics.inception import (
    FEATURE_DIM,
    INCEPTION_SIZE,
    PREPROCESSING,
    InceptionFeatures,
    default_weights_path,
    require_weights,
    weights_sha256,
)
from mmgm_ray.data import load_dataset
from mmgm_ray.diagnostics.store_stats import iter_sample_batches
from mmgm_ray.store.fsutil import atomic_write

__all__ = ["InceptionFeatures", "FeatureStats", "PREPROCESSING", "FEATURE_DIM", "INCEPTION_SIZE",
           "default_weights_path", "weights_sha256", "frechet_distance", "fid_between", "fid_from_features",
           "kid", "feature_stats", "reference_stats", "reference_cache_path", "cached_reference_stats",
           "fid_per_window", "jump_windows", "window_stats_from_store", "fid_from_store",
           "load_stats", "save_stats"]


class FeatureStats:
    """Sums of feature vectors in float64: ``n``, ``sum`` (d,), ``sum_outer`` (d, d) = sum x x^T.

    ``update`` adds a batch, ``merge`` adds another FeatureStats: the result is the one-shot
    statistic up to float64 addition order (~1e-16 relative), whatever the split into batches or
    workers. Raw (unshifted) sums lose about log10(|mean|^2 / var) digits in ``cov``; for
    Inception pool3 features (post-ReLU averages with mean/std ~1) that is about one digit of 16.

    ``preprocessing`` and ``weights_sha256`` label the features (None for ad-hoc features); they
    travel through ``merge``/``save``/``load`` and are checked wherever two statistics meet.
    """

    def __init__(self, dim: int | None = None, *, preprocessing: str | None = None,
                 weights_sha256: str | None = None):
        self.dim = None if dim is None else int(dim)
        self.preprocessing = preprocessing
        self.weights_sha256 = weights_sha256
        self.n = 0
        self.sum = None if dim is None else np.zeros(self.dim)
        self.sum_outer = None if dim is None else np.zeros((self.dim, self.dim))

    def _allocate(self, dim: int) -> None:
        if self.dim is None:
            self.dim = dim
        if dim != self.dim:
            raise ValueError(f"feature dim {dim} != {self.dim}")
        if self.sum is None:
            self.sum, self.sum_outer = np.zeros(dim), np.zeros((dim, dim))

    def update(self, feats) -> "FeatureStats":
        """Add a batch of features (N, d)."""
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, dim), got {f.shape}")
        if f.shape[0] == 0:
            return self
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or inf")
        self._allocate(f.shape[1])
        self.sum += f.sum(axis=0)
        self.sum_outer += f.T @ f
        self.n += f.shape[0]
        return self

    def labels(self) -> dict:
        return {"preprocessing": self.preprocessing, "weights_sha256": self.weights_sha256}

    def check_compatible(self, other: "FeatureStats", what: str = "statistics") -> None:
        """ValueError if the two statistics have different dims or labels."""
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise ValueError(f"{what}: feature dim {other.dim} != {self.dim}")
        for key, mine in self.labels().items():
            theirs = other.labels()[key]
            if mine != theirs:
                raise ValueError(f"{what}: {key} {theirs!r} != {mine!r}")

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add ``other``'s sums into this one (in place; returns self)."""
        self.check_compatible(other, "merge")
        if other.n == 0:
            return self
        self._allocate(other.dim)
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        self.n += other.n
        return self

    @classmethod
    def merged(cls, parts: Iterable["FeatureStats"]) -> "FeatureStats":
        """One FeatureStats from partial ones (e.g. one per Ray worker); labels from the first."""
        parts = list(parts)
        if not parts:
            raise ValueError("no statistics to merge")
        out = cls(parts[0].dim, **parts[0].labels())
        for p in parts:
            out.merge(p)
        return out

    @classmethod
    def from_moments(cls, mu, sigma, n: int, **labels) -> "FeatureStats":
        """The sums behind a mean, an unbiased (ddof = 1) covariance and a count (exact algebra:
        sum = n mu, sum_outer = (n - 1) sigma + n mu mu^T)."""
        if int(n) < 2:
            raise ValueError(f"statistics need a count n >= 2 next to mu and sigma, got {n}")
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        st = cls(mu.size, **labels)
        st.n = int(n)
        st.sum = st.n * mu
        st.sum_outer = (st.n - 1) * sigma + st.n * np.outer(mu, mu)
        return st

    @property
    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("no feature vectors: the mean is undefined")
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased sample covariance (ddof = 1)."""
        if self.n < 2:
            raise ValueError("need at least 2 feature vectors for a covariance")
        c = (self.sum_outer - np.outer(self.sum, self.sum) / self.n) / (self.n - 1)
        return 0.5 * (c + c.T)

    def save(self, path: str, **meta) -> None:
        """Write ``mu``, ``sigma`` (ddof = 1), ``n``, the labels and string/number ``meta`` as .npz
        (:func:`save_stats`: the mu/sigma layout other FID tools read; no pickle; atomic).
        :meth:`load` rebuilds the sums with :meth:`from_moments`, so loaded statistics still merge
        (to ~1e-15 relative)."""
        labels = {k: v for k, v in self.labels().items() if v is not None}
        save_stats(path, self.mean, self.cov, self.n, **{**meta, **labels})

    @classmethod
    def load(cls, path: str, *, dim: int | None = None, preprocessing: str | None = None,
             weights_sha256: str | None = None) -> "FeatureStats":
        """Read an .npz from :meth:`save` / :func:`save_stats`. Each expectation given (``dim``,
        ``preprocessing``, ``weights_sha256``) is checked: a one-line ValueError naming the file
        otherwise (a file without labels fails any label expectation)."""
        z = load_stats(path)
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(f"{path}: inconsistent shapes: mu {mu.shape}, sigma {sigma.shape}")
        if z["n"] < 2:
            raise ValueError(f"{path}: statistics without a count n >= 2 (n = {z['n']})")
        labels = {k: str(z[f"meta_{k}"]) if f"meta_{k}" in z else None for k in ("preprocessing", "weights_sha256")}
        st = cls.from_moments(mu, sigma, z["n"], **labels)
        _check_expected(path, st, dim=dim, preprocessing=preprocessing, weights_sha256=weights_sha256)
        return st


def _check_expected(path: str, st: FeatureStats, **expected) -> None:
    for key, want in expected.items():
        have = getattr(st, key)
        if want is not None and have != want:
            raise ValueError(f"{path}: {key} is {have!r}, expected {want!r}"
                             + (" (recompute the reference statistics)" if key != "dim" else ""))


def _write_npz(path: str, arrays: dict, meta: dict) -> None:
    extra = {f"meta_{k}": np.asarray(v if isinstance(v, (int, float)) else str(v)) for k, v in meta.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays, **extra)
    fs, p = fsspec.core.url_to_fs(str(path))
    atomic_write(fs, p, lambda f: f.write(buf.getvalue()))  # the store's temp + rename / single PUT


def _read_npz(path: str) -> dict:
    with fsspec.open(str(path), "rb") as f:
        data = f.read()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None


def save_stats(path: str, mu, sigma, n: int, **meta) -> None:
    """Save a mean and covariance as .npz: ``mu`` (d,), ``sigma`` (d, d), ``n`` and ``meta_*``
    scalars/strings (pass ``preprocessing=`` and ``weights_sha256=`` to label them). Loadable with
    ``np.load(allow_pickle=False)``, :func:`load_stats` and :meth:`FeatureStats.load`."""
    _write_npz(path, {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
                      "n": np.asarray(int(n))}, meta)


def load_stats(path: str) -> dict:
    """``mu``, ``sigma``, ``n`` and the ``meta_*`` entries of an .npz from :func:`save_stats` or
    :meth:`FeatureStats.save`."""
    z = _read_npz(path)
    for key in ("mu", "sigma"):
        if key not in z:
            raise ValueError(f"{path}: not a feature-statistics file (no {key!r})")
    z["n"] = int(z.get("n", 0))
    return z


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sqrt(sigma1) sigma2 sqrt(sigma1))^(1/2))
    (Dowson & Landau 1982; Heusel et al. 2017; ``docs/THEORY.md`` section 8).

    tr sqrt(sigma1 sigma2) is computed on the symmetric PSD matrix sqrt(s1) s2 sqrt(s1) (same
    eigenvalues as s1 s2) with two symmetric eigendecompositions, instead of scipy.linalg.sqrtm on
    the non-symmetric product: ~10x faster at 2048-d and no complex round-off to discard.
    Tiny negative eigenvalues from round-off are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_between(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two labelled statistics (ValueError if their dims or labels differ)."""
    a.check_compatible(b, "FID")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def fid_from_features(f1, f2) -> float:
    """FID between two feature sets (N1, d) and (N2, d)."""
    return fid_between(FeatureStats().update(f1), FeatureStats().update(f2))


def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    # unbiased: drop the diagonal of the within-set kernels (U-statistic)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kid(f1, f2, n_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial
    kernel k(x, y) = (x.y/d + 1)^3, averaged over ``n_subsets`` random subsets of ``subset_size``
    drawn without replacement from each set (100 subsets of 1,000 by convention; the subset size is
    capped at the smaller set's size when N is small). Returns ``{"kid", "std", "subset_size",
    "n_subsets"}``. KID needs the features themselves: it does not reduce to mergeable sums."""
    x, y = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors per set")
    rng = np.random.default_rng(seed)
    vals = np.array([_mmd2_unbiased_poly(x[rng.choice(x.shape[0], m, replace=False)],
                                         y[rng.choice(y.shape[0], m, replace=False)])
                     for _ in range(int(n_subsets))])
    return {"kid": float(vals.mean()), "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
            "subset_size": m, "n_subsets": int(n_subsets)}


def new_stats(features: Callable) -> FeatureStats:
    """Empty statistics labelled like ``features`` (ad-hoc callables carry no labels)."""
    return FeatureStats(getattr(features, "dim", None), preprocessing=getattr(features, "preprocessing", None),
                        weights_sha256=getattr(features, "weights_sha256", None))


def _stats_of_batches(batches: Iterable, features: Callable) -> FeatureStats:
    st = new_stats(features)
    for b in batches:
        st.update(features(b))
    return st


def feature_stats(images, features: Callable | None = None, batch_size: int = 256) -> FeatureStats:
    """Statistics of an image array (N, [C,] H, W), uint8 or floats in [0, 1], in batches of
    ``batch_size``; ``features`` defaults to :class:`InceptionFeatures` on the CPU."""
    feats = features if features is not None else InceptionFeatures()
    return _stats_of_batches((images[i:i + batch_size] for i in range(0, len(images), batch_size)), feats)


def _images_of(data):
    """The image array of a ``DataConfig``, an ``ImageDataset`` or an array."""
    if hasattr(data, "name") and hasattr(data, "split") and not hasattr(data, "x"):
        data = load_dataset(data)
    return data.x if hasattr(data, "x") else data


def reference_stats(data, features: Callable | None = None, limit: int | None = None,
                    batch_size: int = 256, path: str | None = None) -> FeatureStats:
    """Feature statistics of a data set: ``data`` is a ``DataConfig``, an ``ImageDataset`` (see
    :func:`mmgm_ray.data.load_dataset`) or an array of images. ``features`` defaults to
    :class:`InceptionFeatures`; ``limit`` keeps the first N examples; ``path`` also saves .npz.
    See :func:`cached_reference_stats` for statistics computed once and reused."""
    x = _images_of(data)
    x = x if limit is None else x[:limit]
    st = feature_stats(x, features, batch_size)
    if path is not None:
        st.save(path)
    return st


def _data_key(data) -> str:
    """``name[-<path hash>]-split`` of a DataConfig-like object (data sets read from a path, e.g.
    ``parquet``, are told apart by the sha256 of the path string)."""
    name, split, path = str(data.name), str(getattr(data, "split", "train")), getattr(data, "path", None)
    tag = f"-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}" if path else ""
    return f"{name}{tag}-{split}"


def reference_cache_path(cache_dir: str, data, n: int, preprocessing: str, weights_sha256: str) -> str:
    """Where :func:`cached_reference_stats` keeps the statistics of the first ``n`` images of
    ``data`` (a ``DataConfig``: name, split, path) for a preprocessing and a weights hash."""
    return (f"{str(cache_dir).rstrip('/')}/ref-{_data_key(data)}-n{int(n)}-{preprocessing}"
            f"-{weights_sha256[:16]}.npz")


def cached_reference_stats(data, n: int, cache_dir: str, features: Callable | None = None, *,
                           weights_path: str | None = None, device: str = "cpu",
                           batch_size: int = 256, compute: Callable | None = None) -> FeatureStats:
    """Statistics of the first ``n`` images of a data set (``DataConfig``: name, split, path),
    computed once and cached as .npz under ``cache_dir`` (local path or fsspec URL), keyed by
    data set, split, ``n``, preprocessing and weights sha256 (:func:`reference_cache_path`).

    A cache hit loads the file and runs neither Inception nor the data loader; the file's labels
    and dim are checked (one-line ValueError naming it otherwise). ``features`` (default: an
    :class:`InceptionFeatures` built on a miss only, from ``weights_path`` on ``device``) must
    carry ``preprocessing`` and ``weights_sha256`` attributes. ValueError if the data set has
    fewer than ``n`` images. ``compute`` (images -> FeatureStats with the same labels, e.g. features
    on a Ray actor pool, ``mmgm_ray.postprocess.fid``) replaces the in-process computation on a miss."""
    if features is not None:
        prep, sha, dim = (getattr(features, k, None) for k in ("preprocessing", "weights_sha256", "dim"))
        if prep is None or sha is None:
            raise ValueError("cached_reference_stats: features need 'preprocessing' and 'weights_sha256' "
                             "attributes (the cache key)")
    else:  # hash the file only: a cache hit never loads the network
        weights_path = require_weights(weights_path)
        prep, sha, dim = PREPROCESSING, weights_sha256(weights_path), FEATURE_DIM
    path = reference_cache_path(cache_dir, data, n, prep, sha)
    fs, p = fsspec.core.url_to_fs(path)
    if fs.exists(p):
        st = FeatureStats.load(path, dim=dim, preprocessing=prep, weights_sha256=sha)
        if st.n != int(n):
            raise ValueError(f"{path}: holds statistics of {st.n} images, expected {int(n)}")
        return st
    x = _images_of(data)
    if len(x) < int(n):
        raise ValueError(f"data set {_data_key(data)} has {len(x)} images, fewer than the {int(n)} requested")
    if compute is not None:
        st = compute(x[:int(n)])
        _check_expected(path, st, dim=dim, preprocessing=prep, weights_sha256=sha)
    else:
        feats = features if features is not None else InceptionFeatures(weights_path, device, batch_size=32)
        st = feature_stats(x[:int(n)], feats, batch_size)
    st.save(path, dataset=_data_key(data), n_images=int(n))
    return st


def _as_reference(reference, features: Callable | None) -> FeatureStats:
    """A FeatureStats from a FeatureStats, a dict with mu/sigma[/n] or an .npz path; a path is
    checked against ``features``' labels and dim when it has them."""
    if isinstance(reference, FeatureStats):
        return reference
    if isinstance(reference, (str, os.PathLike)):
        return FeatureStats.load(str(reference), dim=getattr(features, "dim", None),
                                 preprocessing=getattr(features, "preprocessing", None),
                                 weights_sha256=getattr(features, "weights_sha256", None))
    return FeatureStats.from_moments(reference["mu"], reference["sigma"], int(reference.get("n", 0)),
                                     preprocessing=getattr(features, "preprocessing", None),
                                     weights_sha256=getattr(features, "weights_sha256", None))


def fid_per_window(window_stats: Mapping[str, FeatureStats], reference: FeatureStats) -> dict:
    """FID of each window's statistics against one reference: ``{name: {"fid", "n"}}``, in the
    windows' order. Windows are typically ranges of jump indices (:func:`jump_windows`): FID that
    still falls from the early to the late window says the chains have not reached stationarity
    (or that the sampler drifts). Compare windows at equal ``n`` (FID's small-N bias)."""
    out = {}
    for name, st in window_stats.items():
        if st.n < 2:
            raise ValueError(f"window {name!r}: fewer than 2 samples for FID")
        out[name] = {"fid": fid_between(st, reference), "n": st.n}
    return out


def jump_windows(num_jumps: int, n_windows: int = 3, width: int | None = None) -> dict[str, tuple[int, int]]:
    """``n_windows`` windows of jump indices ``(first, last)`` (inclusive) over ``0 .. num_jumps - 1``:
    contiguous and covering every jump when ``width`` is None; else ``width`` jumps each, evenly
    spaced, the first starting at jump 0 and the last ending at the final jump (one window: the
    last ``width`` jumps). Three windows are named early/middle/late, others w0, w1, ..."""
    if num_jumps < 1 or not 1 <= n_windows <= num_jumps:
        raise ValueError(f"need 1 <= n_windows ({n_windows}) <= num_jumps ({num_jumps})")
    if width is not None and not 1 <= width <= num_jumps:
        raise ValueError(f"width must be in 1..{num_jumps}, got {width}")
    names = ("early", "middle", "late") if n_windows == 3 else tuple(f"w{i}" for i in range(n_windows))
    if width is None:
        bounds = [round(i * num_jumps / n_windows) for i in range(n_windows + 1)]
        return {nm: (bounds[i], bounds[i + 1] - 1) for i, nm in enumerate(names)}
    free = num_jumps - width
    starts = [free] if n_windows == 1 else [round(i * free / (n_windows - 1)) for i in range(n_windows)]
    return {nm: (st, st + width - 1) for nm, st in zip(names, starts)}


def window_stats_from_store(run_root: str, windows: Mapping[str, tuple[int, int]],
                            features: Callable | None = None, *, max_samples: int | None = None,
                            batch_rows: int = 256, storage_options: dict | None = None) -> dict:
    """Feature statistics of a run's jumps per window ``{name: (first_jump, last_jump)}``
    (inclusive; every chain's jumps in the range, divergence rows excluded; at most
    ``max_samples`` per window, in store order). Feed the result to :func:`fid_per_window`."""
    feats = features if features is not None else InceptionFeatures()
    return {name: _stats_of_batches(iter_sample_batches(run_root, select="all", min_jump=lo, max_jump=hi,
                                                        max_samples=max_samples, batch_rows=batch_rows,
                                                        storage_options=storage_options), feats)
            for name, (lo, hi) in windows.items()}


def _store_images(run_root: str, select: str, max_samples: int | None, min_jump: int,
                  batch_rows: int, storage_options: dict | None) -> Iterator[np.ndarray]:
    yield from iter_sample_batches(run_root, select=select, max_samples=max_samples, min_jump=min_jump,
                                   batch_rows=batch_rows, storage_options=storage_options)


def fid_from_store(run_root: str, reference_stats, features: Callable | None = None, *,
                   select: str = "last", max_samples: int | None = None, min_jump: int = 0,
                   batch_rows: int = 256, storage_options: dict | None = None) -> dict:
    """FID of a run's samples against reference statistics (a :class:`FeatureStats`, a dict with
    ``mu``/``sigma`` or an .npz path from :meth:`FeatureStats.save` / :func:`save_stats`; a path
    must carry the features' preprocessing and weights hash).

    ``select``: ``last`` (the last jump of every chain, one sample per chain: the usual long-run
    chain protocol) or ``all`` (every jump with ``jump_index >= min_jump``). ``max_samples`` caps
    the count (first chains / rows in store order). Samples are streamed in batches of
    ``batch_rows``; only feature sums are kept. Returns ``{"fid", "n", "n_reference", "select",
    "preprocessing", "weights_sha256"}``."""
    feats = features if features is not None else InceptionFeatures()
    ref = _as_reference(reference_stats, feats)
    st = _stats_of_batches(_store_images(run_root, select, max_samples, min_jump, batch_rows,
                                         storage_options), feats)
    if st.n < 2:
        raise ValueError(f"{run_root}: fewer than 2 samples selected for FID")
    return {"fid": fid_between(st, ref), "n": st.n, "n_reference": ref.n, "select": select, **st.labels()}
