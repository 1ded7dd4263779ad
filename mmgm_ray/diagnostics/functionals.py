"""Per-jump functionals: each stored jump turned into a few float64 scalars, batch by batch.

Mixing diagnostics need scalars per (chain, jump); a 784-d sample is reduced to them as soon as
its record batch is read. The functionals of one jump (columns of the functionals table,
``mmgm_ray.postprocess.table``):

* ``score_norm``, ``kinetic``: the store's own columns (float32, widened);
* ``mean_intensity``: the mean of the decoded sample;
* ``pc_0 .. pc_{k-1}``: ``(x - mean) . v_i`` on the data's leading principal components (a
  :class:`PCABasis` fitted once on the training data and saved with the run);
* ``proj_0 .. proj_{m-1}``: ``x . u_i`` on fixed random unit directions drawn from ``seed``;
* ``class_label`` (int64) and ``class_conf`` (its softmax probability): a trained classifier
  (``mmgm_ray.diagnostics.classifier``) for labelled data.

Same value whatever the batching: Ray Data hands :class:`Functionals` batches of its own making,
the in-process loop others, and rank-normalized R-hat turns a one-ulp difference between two
tied jumps into a visible one. So the linear functionals are computed EXACTLY: directions are
stored on a 2^-20 grid, uint8 samples enter as their integer codes, float samples as 24-bit
integers relative to the row's largest power of two (split into two 12-bit halves); every product
and partial sum is then an integer multiple of a power of two below 2^53 (for events of fewer
than 2^21 values, e.g. 1024 x 682 x 3), which float64 holds exactly in any summation order, BLAS
or machine. The one rounding left is the final scaling, done row by row. The classifier (float32 network) runs on fixed-size zero-padded chunks, so every
call sees the same shapes and kernels.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from mmgm_ray.data import ImageDataset
from mmgm_ray.diagnostics.classifier import classifier_from_bytes, sha256_bytes
from mmgm_ray.store import dequantize

__all__ = ["SCALARS", "FunctionalsRequest", "FunctionalsSpec", "PCABasis", "Functionals", "functionals_batch",
           "raw_samples", "random_directions", "exact_project", "row_means", "sha256_bytes", "quantize_directions"]

SCALARS = ("score_norm", "kinetic", "mean_intensity")
STORED_SCALARS = ("score_norm", "kinetic")
FORMAT_VERSION = 1
DIRECTION_BITS = 20     # directions on a 2^-20 grid: products with 8- or 12-bit integers stay exact
FLOAT_BITS = 24         # float samples: 24-bit integers relative to the row's largest power of two
HALF_BITS = 12          # ... split in two halves so each product fits 32 bits and each sum 53
CHUNK_ROWS = 256        # classifier inputs: fixed-size chunks, zero-padded
SLICE_ROWS = 4096       # rows decoded at once (bounds the float64 copies of a batch)
INPUT_COLUMNS = ("chain_id", "jump_index", "step", "score_norm", "kinetic", "sample")
INDEX_COLUMNS = ("chain_id", "jump_index", "step")


@dataclass(frozen=True)
class FunctionalsRequest:
    """What the functionals table should hold (what a user asks for; artifacts are resolved later).

    ``data`` is a ``DataConfig`` as a dict (the run's training data): the principal components
    (``n_pcs`` of them) and the classifier (``classes``) are fitted on it. ``classifier`` holds
    :class:`mmgm_ray.diagnostics.classifier.ClassifierConfig` fields as a dict.
    """
    scalars: tuple = SCALARS
    n_random: int = 4
    seed: int = 0
    n_pcs: int = 0
    data: Optional[dict] = None
    classes: bool = False
    classifier: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "scalars", tuple(self.scalars))
        unknown = set(self.scalars) - set(SCALARS)
        if unknown:
            raise ValueError(f"unknown functionals {sorted(unknown)}; known: {', '.join(SCALARS)}, pc, proj")
        for name in ("n_random", "n_pcs"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.n_pcs or self.classes) and self.data is None:
            raise ValueError("principal components and classes are fitted on a data set: give its config "
                             "(data), or set n_pcs=0 and classes=False")

    def to_dict(self) -> dict:
        return {**asdict(self), "scalars": list(self.scalars)}


@dataclass(frozen=True)
class FunctionalsSpec:
    """A resolved request: the request, the store's sample layout and the artifacts (run-relative
    path + sha256 + what the table needs of them). Its :meth:`digest` names a functionals table:
    a table made under another digest is stale."""
    request: FunctionalsRequest
    event_shape: tuple
    sample_dtype: str
    pca: Optional[dict] = None         # {"path", "sha256", "k"}
    classifier: Optional[dict] = None  # {"path", "sha256", "num_classes", "accuracy", "class_frequencies"}

    def columns(self) -> list[str]:
        """Functional columns, in table order (after chain_id, jump_index, step)."""
        cols = list(self.request.scalars)
        cols += [f"pc_{i}" for i in range(self.pca["k"] if self.pca else 0)]
        cols += [f"proj_{i}" for i in range(self.request.n_random)]
        if self.classifier:
            cols += ["class_label", "class_conf"]
        return cols

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "request": self.request.to_dict(),
                "event_shape": list(self.event_shape), "sample_dtype": self.sample_dtype,
                "pca": self.pca, "classifier": self.classifier}

    @classmethod
    def from_dict(cls, d: dict) -> "FunctionalsSpec":
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"functionals spec format {d.get('format_version')!r}, this code reads {FORMAT_VERSION}")
        return cls(FunctionalsRequest(**d["request"]), tuple(d["event_shape"]), d["sample_dtype"], d.get("pca"),
                   d.get("classifier"))

    def digest(self) -> str:
        return sha256_bytes(json.dumps(self.to_dict(), sort_keys=True).encode())


# ---- exact linear functionals ---------------------------------------------------------------------

def quantize_directions(u: np.ndarray) -> np.ndarray:
    """Directions (d, k) with |u| <= 1 rounded to multiples of 2^-DIRECTION_BITS (float64)."""
    scale = float(1 << DIRECTION_BITS)
    return np.rint(np.asarray(u, np.float64) * scale) / scale


def random_directions(d: int, k: int, seed: int) -> np.ndarray:
    """``k`` fixed random unit directions in R^d (columns), on the exact grid: a projection on a
    generic direction is a generic linear statistic of the sample."""
    g = np.random.default_rng(seed).standard_normal((d, k))
    return quantize_directions(g / np.sqrt((g * g).sum(axis=0, keepdims=True)))


def _float_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float rows -> (integer codes N (n, d) int64 with |N| <= 2^24, per-row scale 2^(e-24)):
    x ~= N * scale, rounded relative to the row's largest power of two."""
    x = np.asarray(x, np.float64)
    top = np.abs(x).max(axis=1)
    _, e = np.frexp(np.where(top > 0, top, 1.0))      # top < 2^e
    scale = np.ldexp(1.0, e - FLOAT_BITS)
    return np.rint(x / scale[:, None]).astype(np.int64), scale


def exact_project(raw: np.ndarray, directions: np.ndarray, sample_dtype: str) -> np.ndarray:
    """``x . u`` for every row of stored samples ``raw`` (n, d) and grid directions (d, k), float64,
    exact up to one final rounding per value (module docstring)."""
    if sample_dtype == "uint8":
        s = raw.astype(np.float64) @ directions       # integers (< 2^8) times grid values: exact
        return s / 255.0
    codes, scale = _float_codes(raw)
    hi = np.floor_divide(codes, 1 << HALF_BITS)
    lo = codes - hi * (1 << HALF_BITS)                # 0 <= lo < 2^12, |hi| <= 2^12
    s = (hi.astype(np.float64) @ directions) * float(1 << HALF_BITS) + lo.astype(np.float64) @ directions
    return s * scale[:, None]


def row_means(raw: np.ndarray, sample_dtype: str) -> np.ndarray:
    """Mean of each decoded row, from an exact integer sum (uint8 codes or float codes)."""
    d = raw.shape[1]
    if sample_dtype == "uint8":
        return raw.sum(axis=1, dtype=np.int64) / (255.0 * d)
    codes, scale = _float_codes(raw)
    return codes.sum(axis=1) * scale / d


# ---- principal components -------------------------------------------------------------------------

@dataclass(frozen=True)
class PCABasis:
    """The leading principal components of a data set, on the exact grid.

    ``components`` (d, k) unit eigenvectors of the sample covariance (largest eigenvalue first,
    sign fixed so each column's largest entry is positive), ``offsets`` (k,) = mean . v_i (stored,
    so every worker subtracts the same numbers), ``variances`` (k,) eigenvalues, ``data`` the
    data config it was fitted on."""
    components: np.ndarray
    offsets: np.ndarray
    variances: np.ndarray
    data: dict

    @classmethod
    def fit(cls, dataset: ImageDataset, k: int, data: dict) -> "PCABasis":
        x = dataset.x.reshape(len(dataset), -1).double().numpy()
        k = min(int(k), x.shape[1])
        mean = x.mean(axis=0)
        xc = x - mean
        cov = xc.T @ xc / max(len(x) - 1, 1)
        w, v = np.linalg.eigh(cov)
        w, v = w[::-1][:k], v[:, ::-1][:, :k]
        sign = np.sign(v[np.abs(v).argmax(axis=0), np.arange(k)])
        comps = quantize_directions(v * sign)
        return cls(comps, mean @ comps, w.copy(), dict(data))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, components=self.components, offsets=self.offsets, variances=self.variances,
                 data=np.array(json.dumps(self.data, sort_keys=True)))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> "PCABasis":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return cls(z["components"], z["offsets"], z["variances"], json.loads(str(z["data"])))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{what} is not a principal-components file ({type(e).__name__}: {e})") from None


# ---- the batch transform -------------------------------------------------------------------------

def raw_samples(batch, d: int) -> np.ndarray:
    """The ``sample`` column of a batch as stored values ``(n, d)`` (uint8 codes or floats).

    Accepts an Arrow batch/table or the numpy dict Ray Data's ``map_batches`` hands a transform
    (where ``sample`` arrives as an object or 2-d array of the fixed-size lists)."""
    col = batch["sample"]
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        flat = col.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slice offsets
    else:
        flat = np.stack(col) if col.dtype == object else np.asarray(col)
    return flat.reshape(-1, d)


def _column(batch, name: str) -> np.ndarray:
    col = batch[name]
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array) else np.asarray(col)


class Functionals:
    """Rows of the store -> rows of the functionals table (a callable class: Ray Data builds one
    per worker with ``fn_constructor_kwargs`` and calls it per batch; a plain loop does the same).

    Args:
        spec: :meth:`FunctionalsSpec.to_dict` of the table's spec.
        artifacts: run-relative artifact path -> file bytes (already hash-checked by the caller
            that read them; checked again here).
        device: torch device of the classifier (``"cuda"`` with ``num_gpus`` on a GPU worker).
    """

    def __init__(self, spec: dict, artifacts: dict, device: str = "cpu"):
        self.spec = FunctionalsSpec.from_dict(spec)
        self.columns = self.spec.columns()
        self.d = math.prod(self.spec.event_shape)
        dirs, offsets = [], []
        if self.spec.pca:
            pca = PCABasis.from_bytes(_checked(artifacts, self.spec.pca), self.spec.pca["path"])
            dirs.append(pca.components)
            offsets.append(pca.offsets)
        if self.spec.request.n_random:
            dirs.append(random_directions(self.d, self.spec.request.n_random, self.spec.request.seed))
            offsets.append(np.zeros(self.spec.request.n_random))
        self.directions = np.concatenate(dirs, axis=1) if dirs else None
        self.offsets = np.concatenate(offsets) if offsets else None
        self.device = torch.device(device)
        self.model = None
        if self.spec.classifier:
            self.model, _ = classifier_from_bytes(_checked(artifacts, self.spec.classifier),
                                                  self.spec.classifier["path"], self.device)

    def __call__(self, batch) -> dict:
        out = {c: _column(batch, c).astype(np.int64, copy=False) for c in INDEX_COLUMNS}
        for c in STORED_SCALARS:
            if c in self.spec.request.scalars:
                out[c] = _column(batch, c).astype(np.float64)
        if "mean_intensity" in self.spec.request.scalars or self.directions is not None or self.model:
            self._from_samples(raw_samples(batch, self.d), out)
        return {c: out[c] for c in (*INDEX_COLUMNS, *self.columns)}

    def _from_samples(self, raw: np.ndarray, out: dict) -> None:
        # slices of SLICE_ROWS bound the float64 working copies whatever the batch size (Ray Data
        # hands whole Parquet row groups to a map fused with the read)
        n, dtype = len(raw), self.spec.sample_dtype
        names = [c for c in self.columns if c.startswith(("pc_", "proj_"))]
        if "mean_intensity" in self.spec.request.scalars:
            out["mean_intensity"] = np.concatenate([row_means(raw[i:i + SLICE_ROWS], dtype)
                                                    for i in range(0, n, SLICE_ROWS)] or [np.zeros(0)])
        if self.directions is not None:
            p = np.empty((n, self.directions.shape[1]))
            for i in range(0, n, SLICE_ROWS):
                p[i:i + SLICE_ROWS] = exact_project(raw[i:i + SLICE_ROWS], self.directions, dtype) - self.offsets
            for i, c in enumerate(names):
                out[c] = np.ascontiguousarray(p[:, i])
        if self.model is not None:
            out["class_label"], out["class_conf"] = self._classify(raw)

    @torch.no_grad()
    def _classify(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(raw)
        labels, conf = np.empty(n, np.int64), np.empty(n, np.float64)
        chunk = np.zeros((CHUNK_ROWS, *self.spec.event_shape), np.float32)
        for lo in range(0, n, CHUNK_ROWS):
            m = min(CHUNK_ROWS, n - lo)
            chunk[:m] = dequantize(raw[lo:lo + m], self.spec.sample_dtype).reshape(m, *self.spec.event_shape)
            chunk[m:] = 0.0
            p = torch.softmax(self.model(torch.from_numpy(chunk).to(self.device)).float(), dim=1)
            top, arg = p.max(dim=1)
            labels[lo:lo + m] = arg[:m].cpu().numpy()
            conf[lo:lo + m] = top[:m].cpu().numpy()
        return labels, conf


_PER_PROCESS: dict = {}


def functionals_batch(batch, spec: dict, artifacts: dict, device: str = "cpu") -> dict:
    """:class:`Functionals` of ``spec`` applied to ``batch``, the instance built once per process
    (for task-based ``map_batches``, where a worker process runs many tasks)."""
    key = (json.dumps(spec, sort_keys=True), device)
    fn = _PER_PROCESS.get(key)
    if fn is None:
        _PER_PROCESS.clear()  # one spec at a time: a new pass drops the previous instance
        fn = _PER_PROCESS[key] = Functionals(spec, artifacts, device)
    return fn(batch)


def _checked(artifacts: dict, ref: dict) -> bytes:
    data = artifacts.get(ref["path"])
    if data is None:
        raise ValueError(f"artifact {ref['path']} was not handed to the functionals")
    got = sha256_bytes(data)
    if got != ref["sha256"]:
        raise ValueError(f"artifact {ref['path']} is corrupt: sha256 {got[:16]}... != recorded {ref['sha256'][:16]}...")
    return data
