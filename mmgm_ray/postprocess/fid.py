"""FID and KID of a run's samples at cluster scale: Inception on a Ray Data actor pool, exact sums.

The math (FID, KID, mergeable float64 statistics, the ``"uint8-nv-bilinear-299"`` preprocessing,
cached reference statistics) lives in :mod:`mmgm_ray.diagnostics.fid` (``docs/THEORY.md`` section 8);
this module runs it over a run's committed view:

1. **Selection** (:mod:`mmgm_ray.postprocess.selection`): the last jump of each chain, or ``n``
   jumps spread over chains and time, plus one spread selection per jump window (early / middle /
   late), from a chain index; a filter pushed down to the Parquet scan and an exact row test.
2. **Features**: Ray Data ``map_batches`` with :class:`FeatureBlocks` on an actor pool (GPU actors,
   ``num_gpus`` each, when the cluster has GPUs), after a streaming repartition into blocks of
   exactly ``block_rows`` rows (a multiple of the batch) so that every actor gets work. Every
   forward pass holds exactly ``batch_size`` images (``min(batch_size, images)``; the job's last
   pass padded with copies), here and on Ray alike, so a sample's features do not depend on where
   a block boundary fell.
3. **Sums**: a task stage turns every ``stats_rows`` rows into per-group sums (n, sum x,
   sum x x^T in float64) and, for KID, the features of a bounded subset of the main selection (rows
   whose rank is a multiple of ``kid_stride``). The driver merges the sums
   (:meth:`FeatureStats.merge`): it receives one (d x d) sum per block and group and the KID subset,
   never all the features (driver memory: a few blocks of sums, not N x 2048).

With ``local=True`` the same selection, transform classes and reduction run in this process over
``CommittedView.batches`` (no Ray): for small stores, and as the reference the Ray path is tested
against. Given the same features, the two agree to float64 summation order; at N < 2048 the
covariance is singular and FID amplifies that round-off to ~1e-9 relative (~1e-13 at N >= 2048).
The features themselves are float32 network outputs whose convolutions sum in an order that
depends on the batch size (fixed here), the number of intra-op threads and the device: a 1-thread
and a 2-thread CPU pass differ by ~1e-4 relative on pool3 features (FID to a similar degree).
"""
from __future__ import annotations

import io
import math
import posixpath
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Iterable, Iterator, Optional

import fsspec
import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from mmgm_ray.cluster import require_ray
from mmgm_ray.config import DataConfig, from_dict
from mmgm_ray.data import load_dataset
from mmgm_ray.diagnostics.fid import (FeatureStats, cached_reference_stats, fid_between, fid_per_window, kid,
                                      reference_cache_path)
from mmgm_ray.diagnostics.inception import (FEATURE_DIM, PREPROCESSING, InceptionFeatures, quantize_uint8,
                                            require_weights, weights_sha256)
from mmgm_ray.postprocess.selection import FidSelection, chain_index, plan_fid
from mmgm_ray.postprocess.source import CommittedView, open_committed
from mmgm_ray.preflight import ResourceRequest, ensure_resources
from mmgm_ray.progress import Stage
from mmgm_ray.store.fsutil import atomic_write

DEVICES = ("auto", "cpu", "cuda")
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000   # Bińkowski et al. (2018): 100 subsets of 1,000


@dataclass(frozen=True)
class FeatureSettings:
    """Where and how features are computed.

    ``device``: ``auto`` (CUDA when the cluster -- or, with ``local``, this machine -- has GPUs),
    ``cpu``, ``cuda``. ``batch_size``: images per forward pass. ``actors``: size of the actor pool
    (default: one per ``gpus_per_actor`` GPUs; on CPUs, the cluster's CPUs less one over
    ``cpus_per_actor``, default 2). ``block_rows``: rows per block fed to the pool; ``stats_rows``:
    rows per partial sum. ``extractor``: a class with :class:`InceptionFeatures`' constructor
    (weights_path, device, batch_size, ...), ``features(images) -> (N, dim)`` and ``dim`` /
    ``preprocessing`` / ``weights_sha256`` attributes (default InceptionFeatures).
    """
    device: str = "auto"
    batch_size: int = 64
    local: bool = False
    actors: Optional[int] = None
    gpus_per_actor: float = 1.0
    cpus_per_actor: Optional[float] = None
    block_rows: int = 256
    stats_rows: int = 4096
    weights_path: Optional[str] = None
    extractor: Optional[type] = None
    extractor_kwargs: dict = field(default_factory=dict)
    progress: bool = True
    scale_timeout_s: float = 900.0

    def validate(self) -> "FeatureSettings":
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {list(DEVICES)} (or cuda:N), got {self.device!r}")
        for key in ("batch_size", "block_rows", "stats_rows"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if not self.gpus_per_actor > 0 or (self.cpus_per_actor is not None and not self.cpus_per_actor > 0):
            raise ValueError("gpus_per_actor and cpus_per_actor must be > 0")
        return self


@dataclass(frozen=True)
class Labels:
    """What identifies features: their dimension, preprocessing and weights hash."""
    dim: int
    preprocessing: Optional[str]
    weights_sha256: Optional[str]

    def stats(self) -> FeatureStats:
        return FeatureStats(self.dim, preprocessing=self.preprocessing, weights_sha256=self.weights_sha256)


def feature_labels(settings: FeatureSettings) -> Labels:
    """The labels of the features ``settings`` compute; Inception's come from the weights file alone
    (hashed, the network is not loaded)."""
    if settings.extractor is None:
        return Labels(FEATURE_DIM, PREPROCESSING, weights_sha256(require_weights(settings.weights_path)))
    net = settings.extractor(settings.weights_path, "cpu", settings.batch_size, **settings.extractor_kwargs)
    return Labels(int(net.dim), getattr(net, "preprocessing", None), getattr(net, "weights_sha256", None))


# ---- the transforms (Ray Data map_batches, or a loop here) -------------------------------------------

class FeatureBlocks:
    """Features of a batch's ``sample`` column (raw store values, reshaped to ``event_shape``);
    ``groups`` and ``rank`` pass through. Forward passes of exactly ``batch_size`` images."""

    def __init__(self, settings: FeatureSettings, device: str, event_shape: tuple, threads: Optional[int] = None):
        if threads:
            torch.set_num_threads(int(threads))  # Ray actors inherit OMP_NUM_THREADS=1 otherwise
        cls = settings.extractor or InceptionFeatures
        self.net = cls(settings.weights_path, device, settings.batch_size, **settings.extractor_kwargs)
        self.batch_size, self.event_shape = int(settings.batch_size), tuple(event_shape)

    def __call__(self, batch: dict) -> dict:
        x = batch["sample"]
        x = np.stack(x) if x.dtype == object else np.asarray(x)
        x = x.reshape(len(x), *self.event_shape)
        n = len(x)
        pad = (-n) % self.batch_size
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        feats = np.asarray(self.net.features(x), dtype=np.float64)[:n]
        return {"features": feats, "groups": np.asarray(batch["groups"]), "rank": np.asarray(batch["rank"])}


def _lists(rows: list[np.ndarray], dtype) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int32)
    values = np.concatenate([r.ravel() for r in rows]) if rows else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(dtype)))


def partial_stats(batch: dict, n_groups: int, kid_stride: int) -> pa.Table:
    """Per-group float64 sums of a batch of features (rows ``group = g``), plus one row ``group = -1``
    with the batch's row count and the KID subset (features and ranks of the main group's rows whose
    rank is a multiple of ``kid_stride``)."""
    f = np.asarray(batch["features"], dtype=np.float64)
    f = np.stack(f) if f.dtype == object else f
    bits, rank = np.asarray(batch["groups"]), np.asarray(batch["rank"])
    group, n, sums, outer = [], [], [], []
    for g in range(n_groups):
        st = FeatureStats(f.shape[1]).update(f[((bits >> g) & 1).astype(bool)])
        group.append(g), n.append(st.n), sums.append(st.sum), outer.append(st.sum_outer)
    kid_rows = np.flatnonzero((bits & 1).astype(bool) & (rank % kid_stride == 0)) if kid_stride else []
    group.append(-1), n.append(len(f)), sums.append(np.zeros(0)), outer.append(np.zeros(0))
    empty = [np.zeros(0)] * n_groups
    return pa.table({"group": np.asarray(group, np.int64), "n": np.asarray(n, np.int64),
                     "sum": _lists(sums, np.float64), "sum_outer": _lists(outer, np.float64),
                     "kid": _lists(empty + [f[kid_rows]], np.float64),
                     "kid_rank": _lists([np.zeros(0)] * n_groups + [rank[kid_rows]], np.int64)})


def _select_rows(batch: pa.Table, plan: FidSelection) -> pa.Table:
    return plan.select(batch)


# ---- executors -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Pool:
    device: str
    actors: int = 0
    num_cpus: float = 0.0
    num_gpus: float = 0.0


def _pool(settings: FeatureSettings) -> _Pool:
    """Device and actor pool for ``settings`` on this cluster (or in this process)."""
    if settings.local:
        if settings.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {settings.device!r}: this machine has no CUDA device (torch sees none)")
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        return _Pool(auto if settings.device == "auto" else settings.device)
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0.0)), float(res.get("CPU", 1.0))
    cuda = settings.device.startswith("cuda") or (settings.device == "auto" and gpus >= settings.gpus_per_actor)
    if cuda:  # a cluster that never has the GPUs fails in the pre-flight check; one that scales waits
        per_cpu = settings.cpus_per_actor or 1.0
        actors = settings.actors or max(1, int(gpus // settings.gpus_per_actor))
        return _Pool("cuda", actors, per_cpu, settings.gpus_per_actor)  # an actor sees its GPUs as cuda:0..
    per_cpu = settings.cpus_per_actor or min(2.0, max(1.0, cpus - 1))
    return _Pool("cpu", settings.actors or max(1, int((cpus - 1) // per_cpu)), per_cpu)


def _sized(settings: FeatureSettings, rows: int) -> FeatureSettings:
    """``settings`` for at most ``rows`` images: forward passes of ``min(batch_size, rows)`` images
    (a handful of images is not padded to 64), blocks a multiple of that (every actor task then
    holds whole passes; only the last block of the job pads)."""
    batch = max(1, min(settings.batch_size, int(rows)))
    return replace(settings, batch_size=batch, block_rows=max(1, settings.block_rows // batch) * batch)


def _features_on_ray(ds: ray.data.Dataset, settings: FeatureSettings, pool: _Pool, event_shape: tuple,
                     n_groups: int, kid_stride: int) -> Iterator[pa.Table]:
    ensure_resources(ResourceRequest.uniform(pool.actors, {"CPU": pool.num_cpus, "GPU": pool.num_gpus}, "SPREAD",
                                             what=f"FID feature actors ({pool.device})"),
                     timeout_s=settings.scale_timeout_s)
    ds = ds.repartition(target_num_rows_per_block=settings.block_rows, strict=True)
    extra = {"num_gpus": pool.num_gpus} if pool.num_gpus else {}
    ds = ds.map_batches(FeatureBlocks, fn_constructor_kwargs={
        "settings": settings, "device": pool.device, "event_shape": event_shape,
        "threads": None if pool.num_gpus else max(1, int(pool.num_cpus))},
        batch_size=settings.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.num_cpus, **extra)
    ds = ds.map_batches(partial_stats, fn_kwargs={"n_groups": n_groups, "kid_stride": kid_stride},
                        batch_size=settings.stats_rows, batch_format="numpy")
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _numpy_batch(table: pa.Table) -> dict:
    col = table["sample"].combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slice offsets
    return {"sample": flat.reshape(table.num_rows, -1), "groups": table["groups"].to_numpy(),
            "rank": table["rank"].to_numpy()}


def _rechunk(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` in tables of exactly ``rows`` rows (the last one shorter)."""
    buf: list[pa.Table] = []
    held = 0
    for t in tables:
        buf.append(t)
        held += t.num_rows
        if held >= rows:
            whole = pa.concat_tables(buf)
            cut = held // rows * rows
            for lo in range(0, cut, rows):
                yield whole.slice(lo, rows)
            buf, held = [whole.slice(cut)], held - cut
    if held:
        yield pa.concat_tables(buf)


def _features_local(tables: Iterable[pa.Table], settings: FeatureSettings, pool: _Pool, event_shape: tuple,
                    n_groups: int, kid_stride: int) -> Iterator[pa.Table]:
    blocks = FeatureBlocks(settings, pool.device, event_shape)
    for t in tables:
        if t.num_rows:
            yield partial_stats(blocks(_numpy_batch(t)), n_groups, kid_stride)


def _collect(partials: Iterable[pa.Table], labels: Labels, n_groups: int, what: str,
             progress: bool) -> tuple[list[FeatureStats], Optional[np.ndarray], Stage]:
    """Merge partial sums into one FeatureStats per group; the KID subset sorted by rank."""
    stats = [labels.stats() for _ in range(n_groups)]
    kid_feats, kid_rank = [], []
    with Stage(what, unit="img", enabled=progress) as stage:
        for t in partials:
            for i, g in enumerate(t["group"].to_pylist()):
                if g < 0:
                    stage.update(int(t["n"][i].as_py()))
                    kid_feats.append(t["kid"][i].values.to_numpy())
                    kid_rank.append(t["kid_rank"][i].values.to_numpy())
                    continue
                part = labels.stats()
                part.n = int(t["n"][i].as_py())
                part.sum = t["sum"][i].values.to_numpy().copy()
                part.sum_outer = t["sum_outer"][i].values.to_numpy().reshape(labels.dim, labels.dim).copy()
                stats[g].merge(part)
    ranks = np.concatenate(kid_rank) if kid_rank else np.zeros(0, np.int64)
    kid_x = np.concatenate(kid_feats).reshape(-1, labels.dim) if ranks.size else None
    return stats, (kid_x[np.argsort(ranks, kind="stable")] if kid_x is not None else None), stage


# ---- images (reference data) and runs -------------------------------------------------------------------

def image_feature_stats(images, settings: FeatureSettings, kid_max: int = 0,
                        what: str = "FID reference features") -> tuple[FeatureStats, Optional[np.ndarray]]:
    """Statistics of an image array (N, [C,] H, W) (uint8, or floats in [0, 1], quantized first as
    the preprocessing does) and the features of at most ``kid_max`` of them (every
    ``ceil(N / kid_max)``-th), on the actor pool or, with ``settings.local``, in this process."""
    x = quantize_uint8(images).numpy()
    shape, n = tuple(x.shape[1:]), len(x)
    table = pa.table({"sample": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), math.prod(shape)),
                      "groups": np.ones(n, np.int64), "rank": np.arange(n, dtype=np.int64)})
    stride = max(1, math.ceil(n / kid_max)) if kid_max else 0
    settings = _sized(settings, n)
    chunks = [table.slice(lo, settings.block_rows) for lo in range(0, n, settings.block_rows)]
    labels, pool = feature_labels(settings), _pool(settings)
    if settings.local:
        parts = _features_local(chunks, settings, pool, shape, 1, stride)
    else:
        require_ray("FID features on the cluster")
        parts = _features_on_ray(ray.data.from_arrow(chunks), settings, pool, shape, 1, stride)
    stats, kid_x, _ = _collect(parts, labels, 1, what, settings.progress)
    return stats[0], kid_x


@dataclass(frozen=True)
class RunSelection:
    """A run's committed view and the rows FID reads from it."""
    view: CommittedView
    plan: FidSelection
    shape: tuple
    local: bool


def _image_shape(view: CommittedView) -> tuple:
    shape = tuple(view.info["shape"])
    if not (len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))):
        raise ValueError(f"{view.run_url}: FID needs images (C, H, W) with C = 1 or 3, or (H, W); "
                         f"the run's samples have shape {list(shape)}")
    return shape


def select_run(run_url: str, n: int, *, select: str = "auto", min_jump: int = 0, windows: int = 0,
               window_n: Optional[int] = None, kid_max: int = 0, clip: bool = False, local: bool = False,
               storage_options: Optional[dict] = None) -> RunSelection:
    """Open a run's committed view and plan the FID selection (``mmgm_ray.postprocess.selection``):
    cheap (a chain index from two integer columns), so every bad input fails here, before any
    Inception pass or cache write."""
    if not local:
        require_ray("FID on the cluster")
    view = open_committed(run_url, storage_options)
    shape = _image_shape(view)
    index = chain_index(view, on_ray=not local)
    plan = plan_fid(index, int(n), select=select, min_jump=int(min_jump), windows=int(windows),
                    window_n=window_n, kid_max=int(kid_max), clip=clip, where=view.run_url)
    return RunSelection(view, plan, shape, local)


def run_feature_stats(sel: RunSelection, settings: FeatureSettings) -> tuple[list[FeatureStats], Optional[np.ndarray], int]:
    """Statistics of each selection group (main first, then the windows), the KID subset and the
    number of images that went through the network (a row in several groups counts once)."""
    cols = ["chain_id", "jump_index", "sample"]
    labels, pool = feature_labels(settings), _pool(settings)
    plan, n_groups = sel.plan, len(sel.plan.groups)
    settings = _sized(settings, sum(g.n for g in plan.groups))  # the same passes here and on Ray
    if sel.local:
        tables = (plan.select(pa.Table.from_batches([b]))
                  for b in sel.view.batches(cols, filter=plan.pushdown().to_pyarrow(), batch_rows=settings.stats_rows))
        parts = _features_local(_rechunk(tables, settings.block_rows), settings, pool, sel.shape, n_groups,
                                plan.kid_stride)
    else:
        ds = sel.view.ray_dataset(cols, filter=plan.pushdown()).map_batches(
            _select_rows, fn_kwargs={"plan": plan}, batch_format="pyarrow", batch_size=None)
        parts = _features_on_ray(ds, settings, pool, sel.shape, n_groups, plan.kid_stride)
    stats, kid_x, stage = _collect(parts, labels, n_groups, "FID sample features", settings.progress)
    return stats, kid_x, stage.count


def score_run(sel: RunSelection, reference: FeatureStats, settings: FeatureSettings,
              kid_reference: Optional[np.ndarray] = None) -> dict:
    """FID of the selection (and of each window) against ``reference``; KID against the reference
    features when given. The reference's dimension and labels are checked before any feature is
    computed (one-line ValueError)."""
    labels = feature_labels(settings)
    if reference.dim != labels.dim:
        raise ValueError(f"reference statistics have feature dim {reference.dim}; these features have {labels.dim}")
    reference.check_compatible(labels.stats(), "reference statistics")
    t0 = time.perf_counter()
    stats, kid_x, images = run_feature_stats(sel, settings)
    seconds = time.perf_counter() - t0
    main = stats[0]
    if main.n < 2:
        raise ValueError(f"{sel.view.run_url}: fewer than 2 samples selected for FID (chains diverged?)")
    groups = sel.plan.groups
    per_window = fid_per_window({g.name.removeprefix("window "): st for g, st in zip(groups[1:], stats[1:])},
                                reference)
    # the report's layout (mmgm_ray.report.inputs): jumps start <= jump_index < end
    windows = [{"name": name, "start": g.lo, "end": g.hi + 1, **w} for (name, w), g in zip(per_window.items(), groups[1:])]
    out = {"fid": fid_between(main, reference), "n": main.n, "n_requested": groups[0].n, "select": groups[0].mode,
           "jumps": list(groups[0].jumps), "n_reference": reference.n, "windows": windows or None, "kid": None,
           "preprocessing": labels.preprocessing, "weights_sha256": labels.weights_sha256,
           "executor": "local" if sel.local else "ray", "device": _pool(settings).device,
           "images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 2) if seconds > 0 else None}
    if kid_reference is not None and kid_x is not None:
        out["kid"] = kid(kid_x, kid_reference, n_subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE)
        out["kid"]["n"], out["kid"]["n_reference"] = len(kid_x), len(kid_reference)
    return out


# ---- reference data ---------------------------------------------------------------------------------------

def data_reference(data_cfg, images) -> SimpleNamespace:
    """A data set for :func:`cached_reference_stats`: the cache key of ``data_cfg`` (name, split,
    path), the images already loaded."""
    return SimpleNamespace(name=data_cfg.name, split=data_cfg.split, path=data_cfg.path, x=images)


def reference_stats(data, n: int, cache_dir: str, settings: FeatureSettings) -> FeatureStats:
    """Statistics of the first ``n`` images of ``data`` (:func:`data_reference`), computed once on
    the actor pool (or here) and cached under ``cache_dir`` (``cached_reference_stats``)."""
    feats = settings.extractor(settings.weights_path, "cpu", settings.batch_size,
                               **settings.extractor_kwargs) if settings.extractor else None
    return cached_reference_stats(data, int(n), cache_dir, feats, weights_path=settings.weights_path,
                                  compute=lambda x: image_feature_stats(x, settings)[0])


def reference_kid_features(data, m: int, cache_dir: str, settings: FeatureSettings) -> np.ndarray:
    """Features of the first ``m`` images of ``data`` for KID, cached as ``kid-features-*.npz``
    next to the reference statistics (same key: data set, split, m, preprocessing, weights hash)."""
    labels = feature_labels(settings)
    ref_path = reference_cache_path(cache_dir, data, int(m), labels.preprocessing or "none",
                                    labels.weights_sha256 or "none")
    path = posixpath.join(posixpath.dirname(ref_path), "kid-features-" + posixpath.basename(ref_path)[4:])
    fs, p = fsspec.core.url_to_fs(path)
    if fs.exists(p):
        feats = _load_kid_features(path)
        if feats.shape != (int(m), labels.dim):
            raise ValueError(f"{path}: holds features of shape {list(feats.shape)}, expected [{int(m)}, {labels.dim}]")
        return feats
    if len(data.x) < int(m):
        raise ValueError(f"data set {data.name} has {len(data.x)} images, fewer than the {int(m)} KID needs")
    _, feats = image_feature_stats(data.x[:int(m)], settings, kid_max=int(m), what="KID reference features")
    buf = io.BytesIO()
    np.savez(buf, features=feats)
    atomic_write(fs, p, lambda f: f.write(buf.getvalue()))
    return feats


def _load_kid_features(path: str) -> np.ndarray:
    """The ``features`` array of a ``kid-features-*.npz`` (no pickle)."""
    with fsspec.open(path, "rb") as f:
        data = f.read()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return z["features"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a KID feature file ({type(e).__name__}: {e})") from None


def load_reference(path: str, settings: FeatureSettings) -> FeatureStats:
    """Reference statistics from an .npz (``FeatureStats.save`` / ``save_stats``), checked against the
    features' dimension, preprocessing and weights hash (one-line ValueError naming the file)."""
    labels = feature_labels(settings)
    return FeatureStats.load(path, dim=labels.dim, preprocessing=labels.preprocessing,
                             weights_sha256=labels.weights_sha256)


def held_out_floor(images, reference: FeatureStats, settings: FeatureSettings) -> float:
    """FID of real images (held out from the reference) against ``reference``: the floor at their N."""
    st, _ = image_feature_stats(images, settings, what="FID held-out real features")
    return fid_between(st, reference)



# ---- mmgm fid ---------------------------------------------------------------------------------------------

def run_data_config(view: CommittedView) -> DataConfig:
    """The data set a run was trained on (its manifest's config), for reference statistics."""
    data = (view.manifest.get("config") or {}).get("data")
    if not data:
        raise ValueError(f"{view.run_url}: the run records no data config; pass the reference data set "
                         f"(--data) or statistics (--ref)")
    return from_dict(DataConfig, data)


def fid_report(run_url: str, n: int, settings: FeatureSettings, *, select: str = "auto", min_jump: int = 0,
               windows: int = 0, window_n: Optional[int] = None, with_kid: bool = False, kid_max: int = 5000,
               ref: Optional[str] = None, data: Optional[DataConfig] = None, ref_n: Optional[int] = None,
               cache_dir: Optional[str] = None, storage_options: Optional[dict] = None) -> dict:
    """``mmgm fid``: FID (and per-window FID, KID) of a run's samples against reference statistics:
    an .npz (``ref``) or the first ``ref_n`` images (default all, at most 50,000) of ``data``
    (default: the run's data set), computed once and cached under ``cache_dir`` (default
    ``{root}/fid-cache`` beside the run). KID compares at most ``kid_max`` sampled features with
    as many reference images' (cached too). Nothing is computed or written before the selection,
    the reference file and the data set are checked."""
    settings.validate()
    sel = select_run(run_url, n, select=select, min_jump=min_jump, windows=windows, window_n=window_n,
                     kid_max=kid_max if with_kid else 0, local=settings.local, storage_options=storage_options)
    reference = load_reference(ref, settings) if ref else None
    cfg = data or run_data_config(sel.view)
    cache = cache_dir or posixpath.join(posixpath.dirname(sel.view.run_url), "fid-cache")
    images = load_dataset(cfg).x if reference is None or with_kid else None
    if reference is None:
        n_ref = int(ref_n or min(len(images), 50_000))
        reference = reference_stats(data_reference(cfg, images), n_ref, cache, settings)
        described = f"first {n_ref} {cfg.name} {cfg.split} images"
    else:
        described = ref
    kid_ref = None
    if with_kid:
        kid_ref = reference_kid_features(data_reference(cfg, images), min(int(kid_max), len(images)), cache, settings)
    out = score_run(sel, reference, settings, kid_ref)
    return {"run": sel.view.run_url, "reference": described, "cache": None if ref else cache, **out}


def format_fid(rep: dict) -> str:
    """Human-readable lines of a :func:`fid_report` result."""
    lines = [f"FID {rep['fid']:.3f} at N={rep['n']} ({rep['select']}: jumps {rep['jumps'][0]}..{rep['jumps'][1]}) "
             f"against {rep['reference']} (N={rep['n_reference']})"]
    for w in rep.get("windows") or []:
        lines.append(f"  window {w['name']:>6} (jumps {w['start']}..{w['end'] - 1}): FID {w['fid']:.3f} at N={w['n']}")
    if rep.get("kid"):
        k = rep["kid"]
        lines.append(f"KID {k['kid']:.5f} +- {k['std']:.5f} ({k['n_subsets']} subsets of {k['subset_size']}; "
                     f"{k['n']} sampled, {k['n_reference']} reference features)")
    lines.append(f"{rep['executor']} on {rep['device']}: {rep['seconds']} s ({rep['images_per_s']} img/s); "
                 f"{rep['preprocessing']}, weights sha256 {str(rep['weights_sha256'])[:16]}")
    return "\n".join(lines)
