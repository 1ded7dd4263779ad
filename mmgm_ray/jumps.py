"""What the walk-jump engine emits: jumped samples and divergence events (plain data, no Ray)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class _JumpFields(NamedTuple):
    chain_id: torch.Tensor
    block_id: torch.Tensor
    step: torch.Tensor
    jump_index: torch.Tensor
    xhat: torch.Tensor
    score_norm: torch.Tensor
    kinetic: torch.Tensor


class JumpBatch(_JumpFields):
    """Jumps xhat emitted by one engine call, one row per (chain, jump). Only healthy chains appear.

    All tensors share the first dimension n. ``step`` is the walk step (1-based) whose score
    evaluation produced ``xhat``; ``jump_index`` = step // jump_every - 1 counts jumps from 0.
    """
    # chain_id: int64 (n,)  global chain id = block_id * block_size + index in block
    # block_id: int64 (n,)
    # step: int64 (n,)
    # jump_index: int64 (n,)
    # xhat: float32 (n, *event_shape)
    # score_norm: float32 (n,)  |psi| of the (reduced) score at the jump
    # kinetic: float32 (n,)  |v|^2 / (2 u) at the jump

    @property
    def num_rows(self) -> int:
        """Number of (chain, jump) rows."""
        return int(self.chain_id.shape[0])

    def __len__(self) -> int:
        """Number of rows (not the field count: iterate ``_fields`` for that)."""
        return self.num_rows

    __slots__ = ()

    # NamedTuple's _make/_replace check len() against the field count; build directly instead.
    @classmethod
    def _make(cls, iterable) -> "JumpBatch":
        return cls(*iterable)

    def _replace(self, **changes) -> "JumpBatch":
        return JumpBatch(*(changes.pop(f, getattr(self, f)) for f in self._fields))

    def to(self, device, non_blocking: bool = False) -> "JumpBatch":
        return JumpBatch(*(t.to(device, non_blocking=non_blocking) for t in self))

    @staticmethod
    def cat(batches: list["JumpBatch"]) -> "JumpBatch":
        return JumpBatch(*(torch.cat(ts) for ts in zip(*batches)))


class DivergenceEvent(NamedTuple):
    """A chain stopped because its state became non-finite or exceeded the threshold."""
    chain_id: int
    block_id: int
    step: int        # walk step at which it was detected
    reason: str      # "non-finite" | "exploding"
