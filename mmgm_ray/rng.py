"""Counter-based randomness by chain block.

The noise a chain sees is a pure function of (run seed, block id, step, stream): a generator is
re-seeded from a splitmix64 hash of those keys for every block and every step. Nothing about the
RNG needs saving (the step counter is the state), and which blocks share a batch, or which process
or actor runs them, cannot change the draws. Draws are made per block with a fixed per-block shape,
so they are identical whatever the batch layout (on the same device type).
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1

# Streams: independent noise sources of one chain block.
STREAM_INIT_X = 1        # x0 of the chains
STREAM_INIT_EPS = 2      # measurement noise of the initial y
STREAM_WALK = 3          # Langevin noise xi of each walk step
STREAM_INIT_INDEX = 4    # which data point initializes a chain (init = "data")


def splitmix64(x: int) -> int:
    """One round of splitmix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*keys: int) -> int:
    """Hash a tuple of non-negative integers to a 63-bit seed (order matters)."""
    h = 0x243F6A8885A308D3
    for k in keys:
        if k < 0:
            raise ValueError(f"seed keys must be >= 0, got {k}")
        h = splitmix64(h ^ (k & _MASK64))
    return h >> 1  # torch.Generator.manual_seed takes any 64-bit value; keep it positive


class BlockRNG:
    """Draws per-block noise keyed by (run seed, block id, step, stream) on one device."""

    def __init__(self, run_seed: int, device: torch.device | str = "cpu"):
        if run_seed < 0:
            raise ValueError(f"run seed must be >= 0, got {run_seed}")
        self.run_seed = int(run_seed)
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)

    def generator(self, block_id: int, step: int, stream: int) -> torch.Generator:
        """The (re-seeded) generator for one block, step and stream."""
        self._gen.manual_seed(derive_seed(self.run_seed, block_id, step, stream))
        return self._gen

    def normal(self, block_ids: list[int], step: int, stream: int, block_shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normals of shape (len(block_ids) * block_shape[0], *block_shape[1:])."""
        parts = [torch.randn(block_shape, generator=self.generator(b, step, stream),
                             device=self.device, dtype=dtype) for b in block_ids]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def uniform(self, block_ids: list[int], step: int, stream: int, block_shape: tuple[int, ...],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U[0, 1) draws, laid out as in ``normal``."""
        parts = [torch.rand(block_shape, generator=self.generator(b, step, stream),
                            device=self.device, dtype=dtype) for b in block_ids]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def randint(self, block_ids: list[int], step: int, stream: int, high: int, n_per_block: int) -> torch.Tensor:
        """Integers in [0, high), ``n_per_block`` per block."""
        parts = [torch.randint(high, (n_per_block,), generator=self.generator(b, step, stream),
                               device=self.device) for b in block_ids]
        return torch.cat(parts)
