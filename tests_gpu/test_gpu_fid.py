"""Inception features (FID) on the GPU equal the CPU's."""
from __future__ import annotations

import numpy as np
import torch

from mmgm_ray.diagnostics.fid import InceptionFeatures


def test_fid_features_gpu_equal_cpu():
    """Same TorchScript network, same images: features within 1e-4 (float32 convolutions in
    another order; TF32 is off, which alone would cost ~1e-3)."""
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cpu = InceptionFeatures(device="cpu", batch_size=8)(images)
    gpu = InceptionFeatures(device="cuda", batch_size=8)(images)
    np.testing.assert_allclose(gpu, cpu, atol=1e-4, rtol=1e-4)
