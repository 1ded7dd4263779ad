"""PNG grids of samples (Pillow), written to a local path or any fsspec URL."""
from __future__ import annotations

import io
import math
from typing import Optional

import fsspec
import numpy as np
import torch
from PIL import Image


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) view of a batch; vectors (N, d) become square images when d is a square,
    else 1-pixel-high strips."""
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        n, d = x.shape
        s = math.isqrt(d)
        return x.reshape(n, 1, s, s) if s * s == d else x.reshape(n, 1, 1, d)
    raise ValueError(f"save_grid needs (N, C, H, W) or (N, d), got shape {tuple(x.shape)}")


def make_grid(x: torch.Tensor, nrow: int = 8, padding: int = 1, scale: int = 1,
              pad_value: float = 1.0) -> np.ndarray:
    """uint8 array (H, W, 3) or (H, W) tiling the batch row by row, ``nrow`` images per row.

    Values are clamped to [0, 1]; ``scale`` enlarges every pixel (nearest) so 8x8 images are
    visible; ``padding`` pixels of ``pad_value`` separate the tiles.
    """
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError("nrow and scale must be >= 1 and padding >= 0")
    imgs = _as_images(x.detach().float().cpu()).clamp(0.0, 1.0)
    n, c, h, w = imgs.shape
    if n == 0:
        raise ValueError("save_grid got an empty batch")
    if c not in (1, 3):
        raise ValueError(f"save_grid needs 1 or 3 channels, got {c}")
    if scale > 1:
        imgs = imgs.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = imgs[i]
    arr = (grid * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return arr[:, :, 0] if c == 1 else arr


def grid_size(n: int, image_hw: tuple[int, int], nrow: int = 8, padding: int = 1, scale: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of the grid ``save_grid`` writes for ``n`` images of ``image_hw``."""
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    h, w = image_hw[0] * scale, image_hw[1] * scale
    return cols * (w + padding) + padding, rows * (h + padding) + padding


def save_grid(x: torch.Tensor, path: str, nrow: int = 8, padding: int = 1, scale: int = 1,
              pad_value: float = 1.0, fs: Optional[fsspec.AbstractFileSystem] = None) -> str:
    """Write a batch x (N, C, H, W) or (N, d) with values in [0, 1] as one PNG grid.

    ``path`` is a local path or fsspec URL (parent folders are created). Returns the path.
    """
    arr = make_grid(x, nrow, padding, scale, pad_value)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    if fs is None:
        fs, p = fsspec.core.url_to_fs(str(path))
    else:
        p = str(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(p, "wb") as f:
        f.write(buf.getvalue())
    return str(path)
