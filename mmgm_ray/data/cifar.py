"""CIFAR-10 in the standard python format (``cifar-10-python.tar.gz``).

The archive holds ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``: pickled dicts with
b"data" (uint8 array (n, 3072), R then G then B planes of a 32x32 image) and b"labels" (list of int).
``path`` is the archive (local or fsspec URL) or an extracted folder (``cifar-10-batches-py`` itself
or its parent).

Why a restricted unpickler: the batches are pickles, and plain ``pickle.load`` executes whatever
callable a file names, so a tampered download or a wrong path could run arbitrary code. The standard
archive only needs dicts, lists, ints, bytes (plain opcodes) and numpy arrays, so ``find_class``
allows exactly the numpy reconstruction helpers (and ``_codecs.encode``, which Python 3 uses for
bytes in protocol-2 pickles) and refuses every other global.
"""
from __future__ import annotations

import importlib
import io
import pickle
import posixpath
import struct
import tarfile
import zlib

import numpy as np
import torch

from .base import ImageDataset, read_all, url_to_fs

TRAIN_MEMBERS = [f"data_batch_{i}" for i in range(1, 6)]
TEST_MEMBERS = ["test_batch"]
FOLDER = "cifar-10-batches-py"

# (module, name) pairs a CIFAR batch may reference: numpy's array/dtype reconstruction under both
# the numpy 1 (numpy.core) and numpy 2 (numpy._core) module names, for protocols 2..5.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_ALLOWED`` (see module docstring)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core") or module.startswith("numpy._core"):
            # resolve under whichever name this numpy has, without importing the deprecated alias
            sub = module.split(".", 2)[2]
            for base in ("numpy._core", "numpy.core"):
                try:
                    return getattr(importlib.import_module(f"{base}.{sub}"), name)
                except (ImportError, AttributeError):
                    continue
            raise pickle.UnpicklingError(f"cannot resolve {module}.{name} in this numpy")
        return super().find_class(module, name)


def restricted_loads(raw: bytes):
    """Unpickle CIFAR batch bytes with the restricted unpickler (py2 str keys decoded as bytes)."""
    return RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()


def _decode_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = restricted_loads(raw)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{where}: refused or corrupt pickle ({e})") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error) as e:
        raise ValueError(f"{where}: corrupt pickle ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{where}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data, labels = d[b"data"], np.asarray(d[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise ValueError(f"{where}: b'data' must be a uint8 array (n, 3072), got "
                         f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{where}: {labels.shape} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{where}: labels outside 0..9")
    return data, labels.astype(np.int64)


def _members_from_archive(raw: bytes, display: str, wanted: list[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
            for m in tar:
                base = posixpath.basename(m.name)
                if m.isfile() and base in wanted and base not in out:
                    f = tar.extractfile(m)
                    data = f.read() if f is not None else b""
                    if len(data) != m.size:
                        raise ValueError(f"{display}: member {m.name} is truncated "
                                         f"({len(data)} of {m.size} bytes)")
                    out[base] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{display}: corrupt or truncated archive ({type(e).__name__}: {e})") from e
    return out


def load_cifar10(path: str, split: str = "train") -> ImageDataset:
    """CIFAR-10 ``split`` ('train': data_batch_1..5, 'test': test_batch) as (N, 3, 32, 32) in [0, 1]."""
    if split not in ("train", "test"):
        raise ValueError(f"cifar10: split must be 'train' or 'test', got {split!r}")
    wanted = TRAIN_MEMBERS if split == "train" else TEST_MEMBERS
    fs, root = url_to_fs(path)
    display = path
    if fs.isdir(root):
        folder = posixpath.join(root, FOLDER) if fs.isdir(posixpath.join(root, FOLDER)) else root
        members = {}
        for w in wanted:
            p = posixpath.join(folder, w)
            if fs.isfile(p):
                members[w] = read_all(fs, p, p)
    elif fs.isfile(root):
        members = _members_from_archive(read_all(fs, root, display), display, wanted)
    else:
        raise ValueError(f"{path}: no such file or folder")
    missing = [w for w in wanted if w not in members]
    if missing:
        raise ValueError(f"{display}: missing CIFAR-10 batch(es) {missing} for split {split!r} "
                         f"(truncated archive or wrong path?)")
    xs, ys = [], []
    for w in wanted:
        data, labels = _decode_batch(members[w], f"{display}:{w}")
        xs.append(data)
        ys.append(labels)
    data = np.concatenate(xs)
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32)).div_(255.0)
    return ImageDataset("cifar10", x, torch.from_numpy(np.concatenate(ys)), (3, 32, 32), display)
