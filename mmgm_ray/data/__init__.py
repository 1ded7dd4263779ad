"""Data sets for mmgm-ray, held in memory as float32 tensors.

``load_dataset(cfg)`` returns an :class:`ImageDataset` for ``cfg.name`` in
digits | mnist | fashion_mnist | cifar10 | parquet | gmm (see ``DataConfig``). Images are
(N, C, H, W) with values in [0, 1]; vector data is (N, d).

Feeding training workers: ``make_loader`` / ``infinite_batches`` shard one in-memory tensor by rank
with a DistributedSampler-like permutation per epoch. These data sets are small (at most a few
hundred MB), so every worker keeps the whole set and slices batches locally: the accelerator is fed
without any per-batch inter-process traffic. Ray Data is meant for the large Parquet sample stores
(read them with ``ray.data.read_parquet``, or ``load_parquet`` when they fit in memory).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import ImageDataset, channel_stats
from .cifar import load_cifar10
from .idx import default_fashion_mnist_dir, load_idx_dataset
from .loader import ShardedLoader, epoch_permutation, infinite_batches, make_loader
from .parquet import load_parquet, write_parquet_dataset
from .synthetic import gmm_parameters, make_gmm

__all__ = [
    "ImageDataset", "channel_stats", "load_dataset", "load_digits", "load_idx_dataset", "load_cifar10",
    "load_parquet", "write_parquet_dataset", "make_gmm", "gmm_parameters", "make_loader",
    "infinite_batches", "ShardedLoader", "epoch_permutation", "default_fashion_mnist_dir",
]


def load_digits() -> ImageDataset:
    """scikit-learn's 8x8 digits (1797 images, shipped in the wheel): (N, 1, 8, 8), values / 16."""
    # imported here: scikit-learn takes about a second to import and only this loader needs it
    from sklearn.datasets import load_digits as _sk_digits
    d = _sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1).contiguous()
    return ImageDataset("digits", x, torch.from_numpy(d.target.astype(np.int64)), (1, 8, 8),
                        "sklearn.datasets.load_digits")


def load_dataset(cfg) -> ImageDataset:
    """Load the data set a ``DataConfig`` names, then keep the first ``cfg.limit`` examples.

    Split: train/test for mnist, fashion_mnist and cifar10; the other sets have one split and
    ignore it.
    """
    if hasattr(cfg, "validate"):
        cfg.validate()
    name = cfg.name
    if name == "digits":
        ds = load_digits()
    elif name in ("mnist", "fashion_mnist"):
        ds = load_idx_dataset(name, cfg.path, cfg.split)
    elif name == "cifar10":
        ds = load_cifar10(cfg.path, cfg.split)
    elif name == "parquet":
        ds = load_parquet(cfg.path)
    elif name == "gmm":
        ds = make_gmm(cfg.gmm_components, cfg.gmm_dim, cfg.gmm_samples, cfg.gmm_seed)
    else:
        raise ValueError(f"unknown data set {name!r}")
    return ds.head(cfg.limit)
