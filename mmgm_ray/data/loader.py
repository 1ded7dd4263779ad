"""Deterministic, rank-sharded mini-batches from an in-memory data set (for training workers).

Why not Ray Data here: the training sets (digits, MNIST, CIFAR-10, a GMM) are a few hundred MB at
most, so each worker holds the whole tensor and slices batches itself. That keeps the accelerator fed
with no per-batch inter-process traffic or object-store copies; Ray Data is for the big Parquet
sample stores that do not fit one process.

Sharding follows torch's DistributedSampler: every rank draws the same permutation from
(seed, epoch) and takes every world_size-th index starting at its rank, so shards are disjoint and
reproducible with no communication.
"""
from __future__ import annotations

from typing import Iterator, Optional, Union

import numpy as np
import torch

from .base import ImageDataset


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of range(n) every rank uses in ``epoch`` (a pure function of seed, epoch)."""
    # SeedSequence mixes (seed, epoch) so nearby pairs do not give related streams
    s = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(1)[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(s))


class ShardedLoader:
    """Iterable over (x, labels) float32 / int64 batches of one rank's shard for one epoch.

    drop_last=True (training): every rank gets floor(N / world_size) indices and only full batches,
    so all ranks run the same number of steps (DDP all-reduces must match); the few dropped indices
    change every epoch. drop_last=False (evaluation): rank r gets perm[r::world_size], so across ranks
    every index appears exactly once; shard sizes differ by at most one.
    hflip: flip each image left-right with probability 1/2 (seeded by seed, epoch, rank).
    """

    def __init__(self, ds: Union[ImageDataset, torch.Tensor], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 drop_last: bool = True, hflip: bool = False, device: Optional[Union[str, torch.device]] = None):
        if isinstance(ds, ImageDataset):
            self.x, self.labels = ds.x, ds.labels
        else:
            self.x, self.labels = ds, None
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if hflip and self.x.dim() != 4:
            raise ValueError("hflip needs image data (N, C, H, W)")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.drop_last, self.hflip, self.device = drop_last, hflip, device
        if drop_last and len(self) == 0:
            raise ValueError(f"{len(self.x)} examples over {world_size} rank(s) do not fill one batch "
                             f"of {batch_size}; lower the batch size or use drop_last=False")

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (call before iterating, like DistributedSampler)."""
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in visiting order."""
        n = self.x.shape[0]
        perm = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
        if self.drop_last:
            per_rank = n // self.world_size
            perm = perm[: per_rank * self.world_size]
        return perm[self.rank::self.world_size]

    def __len__(self) -> int:
        n = self.x.shape[0]
        if self.drop_last:
            return (n // self.world_size) // self.batch_size
        mine = len(range(self.rank, n, self.world_size))
        return -(-mine // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        idx = self.indices()
        nb = len(self)
        flip_gen = None
        if self.hflip:
            s = int(np.random.SeedSequence([self.seed, self.epoch, self.rank, 1]).generate_state(1)[0])
            flip_gen = torch.Generator().manual_seed(s)
        for b in range(nb):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            xb = self.x.index_select(0, sel).float()
            if flip_gen is not None:
                flip = torch.rand(sel.shape[0], generator=flip_gen) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            yb = None if self.labels is None else self.labels.index_select(0, sel)
            if self.device is not None:
                xb = xb.to(self.device, non_blocking=True)
                yb = None if yb is None else yb.to(self.device, non_blocking=True)
            yield xb, yb


def make_loader(ds: Union[ImageDataset, torch.Tensor], batch_size: int, rank: int = 0, world_size: int = 1,
                seed: int = 0, epoch: int = 0, shuffle: bool = True, drop_last: bool = True,
                hflip: bool = False, device=None) -> ShardedLoader:
    """One rank's loader for one epoch (see ShardedLoader); call ``set_epoch`` to move on."""
    return ShardedLoader(ds, batch_size, rank, world_size, seed, epoch, shuffle, drop_last, hflip, device)


def infinite_batches(ds: Union[ImageDataset, torch.Tensor], batch_size: int, rank: int = 0,
                     world_size: int = 1, seed: int = 0, start_epoch: int = 0, hflip: bool = False,
                     device=None) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Endless stream of full batches for step-counted training, epoch after epoch (drop_last)."""
    loader = make_loader(ds, batch_size, rank, world_size, seed, start_epoch, True, True, hflip, device)
    epoch = start_epoch
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1
