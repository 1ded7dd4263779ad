"""The in-memory data set container shared by every loader, plus small helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import fsspec
import torch


@dataclass
class ImageDataset:
    """A whole data set held in memory.

    ``x`` is float32, shaped (N, C, H, W) for images (values in [0, 1]) or (N, d) for vectors.
    ``labels`` is int64 (N,) or None. ``event_shape`` is the shape of one example (``x.shape[1:]``).
    ``source`` says where it came from (file, URL or generator). ``gmm`` holds the mixture parameters
    (``means`` (K, d), ``covs`` (K, d, d), ``weights`` (K,), float32 tensors) for the synthetic
    Gaussian mixture so the closed-form oracle denoiser can be built; None for real data.
    """
    name: str
    x: torch.Tensor
    labels: Optional[torch.Tensor]
    event_shape: tuple
    source: str
    gmm: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32:
            raise ValueError(f"{self.name}: x must be float32, got {self.x.dtype}")
        if tuple(self.x.shape[1:]) != tuple(self.event_shape):
            raise ValueError(f"{self.name}: x has shape {tuple(self.x.shape)}, "
                             f"event_shape says {tuple(self.event_shape)}")
        if self.labels is not None and (self.labels.dtype != torch.int64
                                        or self.labels.shape != (self.x.shape[0],)):
            raise ValueError(f"{self.name}: labels must be int64 of shape ({self.x.shape[0]},), got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")
        self.event_shape = tuple(int(s) for s in self.event_shape)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def is_image(self) -> bool:
        """True for (C, H, W) events, False for vectors."""
        return len(self.event_shape) == 3

    def head(self, n: Optional[int]) -> "ImageDataset":
        """The first ``n`` examples (all of them when ``n`` is None or larger than the set)."""
        if n is None or n >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:n].clone()
        return ImageDataset(self.name, self.x[:n].clone(), labels, self.event_shape, self.source, self.gmm)


def channel_stats(ds: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (float32 tensors of shape (C,) or (d,)).

    Images are reduced over (N, H, W); vector data treats each coordinate as a channel.
    Accumulated in float64 so 60k-image sums do not lose precision.
    """
    x = ds.x.double()
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    return x.mean(dim=dims).float(), x.std(dim=dims, unbiased=False).float()


def url_to_fs(path: str):
    """(fsspec filesystem, path inside it) for a local path or any fsspec URL."""
    return fsspec.core.url_to_fs(str(path))


def read_all(fs, p: str, display: str) -> bytes:
    """Read a whole file; a missing file becomes a ValueError naming it."""
    try:
        with fs.open(p, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise ValueError(f"{display}: file not found") from e
    except IsADirectoryError as e:
        raise ValueError(f"{display}: is a folder, expected a file") from e
