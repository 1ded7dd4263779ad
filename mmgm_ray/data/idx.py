"""MNIST / Fashion-MNIST in the IDX format (raw or gzipped), from a local path or any fsspec URL.

IDX layout: a 4-byte magic (two zero bytes, an element-type code, the number of dimensions), one
big-endian uint32 per dimension, then the elements in C order. Images are magic 0x00000803
(uint8, 3 dims), labels 0x00000801 (uint8, 1 dim). Every header is checked against the file length
so a truncated or mislabelled download fails loudly, naming the file.
"""
from __future__ import annotations

import gzip
import os
import posixpath
import shutil
import struct
import subprocess
import sys
import zlib
from typing import Optional

import numpy as np
import torch

from .base import ImageDataset, read_all, url_to_fs

# element-type code -> numpy dtype (big-endian where it matters)
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}

# Where Debian's ``dataset-fashion-mnist`` package puts the four .gz files (checked with dpkg -L).
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "MMGM_FASHION_MNIST_DIR"


def decode_idx(raw: bytes, name: str, expect_ndim: Optional[int] = None) -> np.ndarray:
    """Parse IDX bytes (already gunzipped) into an array; ValueError naming ``name`` if malformed."""
    if len(raw) < 4:
        raise ValueError(f"{name}: {len(raw)} bytes is too short for an IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{name}: bad magic number 0x{magic:08x}; not an IDX file "
                         f"(expected 0x00000803 for images or 0x00000801 for labels)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if expect_ndim is not None and ndim != expect_ndim:
        what = {3: "images", 1: "labels"}.get(expect_ndim, f"{expect_ndim}-d")
        raise ValueError(f"{name}: magic 0x{magic:08x} declares {ndim} dimension(s); an IDX {what} "
                         f"file has {expect_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) < expected:
        raise ValueError(f"{name}: truncated: header declares shape {tuple(dims)} = {expected} bytes, "
                         f"file has only {len(raw)}")
    if len(raw) > expected:
        raise ValueError(f"{name}: wrong shape: header declares {tuple(dims)} = {expected} bytes but the "
                         f"file has {len(raw) - expected} extra bytes")
    return np.frombuffer(raw, dtype=dtype, count=expected - header, offset=header).reshape(dims)


def read_idx(fs, p: str, display: str, expect_ndim: Optional[int] = None) -> np.ndarray:
    """Read one IDX file through fsspec; gzip is detected from its magic bytes, not the suffix."""
    raw = read_all(fs, p, display)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{display}: corrupt or truncated gzip data ({e})") from e
    return decode_idx(raw, display, expect_ndim)


def _candidates(prefix: str, kind: str) -> list[str]:
    # standard names, and the "train-images.idx3-ubyte" spelling some mirrors use
    stem = {"images": "idx3", "labels": "idx1"}[kind]
    names = [f"{prefix}-{kind}-{stem}-ubyte", f"{prefix}-{kind}.{stem}-ubyte"]
    return [n + suffix for n in names for suffix in (".gz", "")]


def _find(fs, root: str, names: list[str]) -> Optional[str]:
    for n in names:
        p = posixpath.join(root.rstrip("/"), n)
        if fs.isfile(p):
            return p
    return None


def _display(fs, p: str) -> str:
    """Name a file the way the user would: a plain path locally, the full URL otherwise."""
    protos = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return p if "file" in protos else fs.unstrip_protocol(p)


def default_fashion_mnist_dir() -> Optional[str]:
    """Folder holding Fashion-MNIST when no path is given.

    Order: $MMGM_FASHION_MNIST_DIR, Debian's ``dataset-fashion-mnist`` location, the same under
    sys.prefix / /usr/local, then wherever ``dpkg -L dataset-fashion-mnist`` says the files are
    (covers a future package that moves them). None if nothing is found.
    """
    cands = [os.environ.get(FASHION_MNIST_ENV), FASHION_MNIST_DEBIAN_DIR,
             "/usr/local/share/datasets/fashion-mnist", os.path.join(sys.prefix, "share/datasets/fashion-mnist")]
    for c in cands:
        if c and any(os.path.isfile(os.path.join(c, n)) for n in _candidates("train", "images")):
            return c
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True,
                                 timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            if line.strip().endswith(("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")):
                return os.path.dirname(line.strip())
    return None


def load_idx_dataset(name: str, path: Optional[str], split: str = "train") -> ImageDataset:
    """MNIST-style data set from ``path``: a folder with the standard file names or one images file.

    In folder mode ``split`` picks train-* or t10k-* and both images and labels must be there. With a
    single images file ``split`` is ignored and labels are read from the sibling labels file if it
    exists (None otherwise). Images are uint8 (N, H, W) -> float32 (N, 1, H, W) / 255.
    """
    if path is None:
        if name != "fashion_mnist":
            raise ValueError(f"data set {name!r} needs data.path (folder or images file)")
        path = default_fashion_mnist_dir()
        if path is None:
            raise ValueError("fashion_mnist: no data.path given and the files were not found in "
                             f"${FASHION_MNIST_ENV} or {FASHION_MNIST_DEBIAN_DIR}; install them with "
                             "`apt-get install -y dataset-fashion-mnist` or set data.path")
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"{name}: split must be 'train' or 'test', got {split!r}")
    fs, root = url_to_fs(path)
    if fs.isdir(root):
        prefix = _SPLIT_PREFIX[split]
        img_p = _find(fs, root, _candidates(prefix, "images"))
        lab_p = _find(fs, root, _candidates(prefix, "labels"))
        for kind, p in (("images", img_p), ("labels", lab_p)):
            if p is None:
                raise ValueError(f"{path}: missing {split} {kind} file; looked for "
                                 f"{_candidates(prefix, kind)}")
    elif fs.isfile(root):
        img_p = root
        base, folder = posixpath.basename(root), posixpath.dirname(root)
        lab_p = None
        for a, b in (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1")):
            if a in base:
                stem = base.replace(a, b)
                stem = stem[:-3] if stem.endswith(".gz") else stem
                lab_p = _find(fs, folder, [stem + ".gz", stem])
                break
    else:
        raise ValueError(f"{path}: no such file or folder")

    img_name, lab_name = _display(fs, img_p), (_display(fs, lab_p) if lab_p else None)
    images = read_idx(fs, img_p, img_name, expect_ndim=3)
    if images.dtype != np.uint8:
        raise ValueError(f"{img_name}: images must be uint8, got {images.dtype}")
    labels = None
    if lab_p is not None:
        lab = read_idx(fs, lab_p, lab_name, expect_ndim=1)
        if lab.shape[0] != images.shape[0]:
            raise ValueError(f"{lab_name}: {lab.shape[0]} labels but {img_name} holds "
                             f"{images.shape[0]} images")
        labels = torch.from_numpy(lab.astype(np.int64))
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    return ImageDataset(name, x, labels, tuple(x.shape[1:]), img_name)
