"""Small image stores for the post-processing tests, written block by block without a pool, and a
cheap exact feature map standing in for Inception.

Ray workers cannot import this module (pytest puts tests/ on the driver's path only): tests that
send ``PixelFeatures`` to Ray register it with ``ray.cloudpickle.register_pickle_by_value``."""
from __future__ import annotations

import glob

import numpy as np
import pyarrow.parquet as pq
import torch

from mmgm_ray.jumps import DivergenceEvent, JumpBatch
from mmgm_ray.store import create_run, update_manifest


def image_run(root, name: str = "img", chains: int = 10, jumps: int = 8, shape=(1, 4, 4), dtype: str = "float32",
              block_size: int = 6, jump_every: int = 2, diverge=(3, 4), seed: int = 0) -> str:
    """A finished run: ``chains`` chains in blocks of ``block_size``, ``jumps`` jumps each at steps
    ``jump_every * (j + 1)``, samples ``clip(0.3 + 0.04 j + 0.15 noise, 0, 1)`` (drifting with j),
    two jumps per part file. Chain ``diverge[0]`` diverges at jump ``diverge[1]``: a divergence row,
    then no more rows. The manifest records ``sampler.jump_every``, ``pool.num_chains`` and the
    digits data set (the reference ``mmgm fid`` uses by default)."""
    rng = np.random.default_rng(seed)
    config = {"sampler": {"jump_every": jump_every}, "pool": {"num_chains": chains}, "data": {"name": "digits"}}
    store = create_run(str(root), name, event_shape=shape, sample_dtype=dtype, config=config)
    entries = {}
    for b, lo in enumerate(range(0, chains, block_size)):
        ids = np.arange(lo, min(chains, lo + block_size))
        w = store.writer(b)
        for j in range(jumps):
            dead = diverge is not None and j >= diverge[1]
            alive = ids[ids != diverge[0]] if dead else ids
            if diverge is not None and j == diverge[1] and diverge[0] in ids:
                w.add_divergences([DivergenceEvent(int(diverge[0]), b, jump_every * (j + 1), "exploding")])
            x = np.clip(0.3 + 0.04 * j + 0.15 * rng.standard_normal((len(alive), *shape)), 0.0, 1.0)
            t = torch.as_tensor(alive)
            w.add(JumpBatch(chain_id=t, block_id=torch.full_like(t, b), step=torch.full_like(t, jump_every * (j + 1)),
                            jump_index=torch.full_like(t, j), xhat=torch.as_tensor(x, dtype=torch.float32),
                            score_norm=torch.ones(len(alive)), kinetic=torch.ones(len(alive))))
            if j % 2 == 1:
                w.flush()
        w.flush()
        entries[b] = w.manifest_entry("done")
    update_manifest(store, blocks=entries)
    return store.url


def add_uncommitted_part(url: str) -> None:
    """A copy of a committed part under a new name: on storage, not in the manifest (what a block
    writes after its last checkpoint)."""
    src = sorted(glob.glob(f"{url}/samples/block=000000/part-*.parquet"))[-1]
    pq.write_table(pq.read_table(src), f"{url}/samples/block=000000/part-000999.parquet")


class PixelFeatures:
    """Flattened pixels in [0, 1] as features (exact, independent of batching): the feature map the
    distributed reduction is tested with. Same constructor as ``InceptionFeatures``."""
    preprocessing = "pixels"
    weights_sha256 = "0" * 64

    def __init__(self, weights_path=None, device="cpu", batch_size=32, dim: int = 16):
        self.dim = dim

    def features(self, x) -> np.ndarray:
        x = np.asarray(x)
        scale = 255.0 if x.dtype == np.uint8 else 1.0
        return (x.astype(np.float64) / scale).reshape(len(x), -1)


def write_run(root, run_id, levels, n_jumps, seed, shape=(1, 4, 4), block_size=8, diverge_chain=None,
              dtype="uint8"):
    """A run whose chain c emits samples ~ clip(levels[c] + 0.15 noise) at every jump."""
    rng = np.random.default_rng(seed)
    store = create_run(str(root), run_id, event_shape=shape, sample_dtype=dtype)
    c, d = len(levels), int(np.prod(shape))
    for b in range((c + block_size - 1) // block_size):
        w = store.writer(b)
        ids = np.arange(b * block_size, min(c, (b + 1) * block_size))
        for j in range(n_jumps):
            alive = ids if diverge_chain is None or j < n_jumps // 2 else ids[ids != diverge_chain]
            k = alive.size
            x = np.clip(np.asarray(levels)[alive][:, None] + 0.15 * rng.standard_normal((k, d)), 0, 1)
            w.add(JumpBatch(torch.as_tensor(alive), torch.full((k,), b), torch.full((k,), 2 * (j + 1)),
                            torch.full((k,), j), torch.as_tensor(x, dtype=torch.float32).reshape(k, *shape),
                            torch.as_tensor(rng.random(k), dtype=torch.float32),
                            torch.as_tensor(rng.random(k), dtype=torch.float32)))
        if diverge_chain is not None and diverge_chain in ids:
            w.add_divergences([DivergenceEvent(int(diverge_chain), b, n_jumps + 1, "non-finite")])
        w.flush()
        update_manifest(store, blocks={b: w.manifest_entry("done")})
    return store.url
