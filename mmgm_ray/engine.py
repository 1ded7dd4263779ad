"""Walk-jump engine: a batch of long-run chains on one device (THEORY sections 4-5).

The chains are grouped in fixed-size *blocks*; chain ``c`` is index ``c % block_size`` of block
``c // block_size``. Blocks are the unit of checkpointing and storage, not of randomness: every
draw comes from ``mmgm_ray.rng.ChainRNG`` keyed by (run seed, chain id, step, stream, element), in
one vectorized call for all the engine's chains. A chain's trajectory therefore depends only on
(run seed, chain id): a restart, another actor count, another block size or another grouping of
blocks into batches sees the same noise (and, on one device with a batch-invariant score model,
the same bits).

Walks:
- ``"reduced"``: the exact reduced walk on (ybar, vbar) in R^{2d} (universal models only), with
  psi_bar = (g(ybar) - ybar) / sigma^2 and xi_bar ~ N(0, I/M); state M times smaller.
- ``"full"``: the walk on (y, v) in R^{2Md} for any score model (MDAE, MEM^2, universal).

Every ``jump_every`` steps the engine emits the jump xhat computed by that step's score evaluation
(for A-B-O-B-A at the half-step position, for Cheng and ULA at the step's start). With
``sampler.jump_at="full"`` an A-B-O-B-A jump is instead evaluated at the full-step position, one
extra network call per jump step: on a Gaussian target the full-step position has the exact
stationary law at any stable delta, the half-step one a variance bias of O(delta^2) (THEORY
section 4), and the integrators stay pure (the extra call lives here). A chain whose
state, score or jump becomes non-finite, or whose |y|_inf exceeds the threshold, is *diverged*: it
is reported once as a ``DivergenceEvent``, its state is zeroed and frozen, and it never emits again.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch

from mmgm_ray import rng as rng_mod
from mmgm_ray.config import SamplerConfig
from mmgm_ray.integrators import (NOISE_DRAWS, IntegratorParams, LangevinState, ScoreOutput,
                                  get_integrator)
from mmgm_ray.jumps import DivergenceEvent, JumpBatch
from mmgm_ray.models import ScoreModel

STATE_VERSION = 2  # 2: noise keyed per chain; resuming a version-1 state would switch noise mid-trajectory


class EngineState(NamedTuple):
    """The exact state of an engine's chains at one walk step (THEORY section 4).

    The noise needs no state: it is counter-based (``mmgm_ray.rng``), keyed by the step.
    """
    y: torch.Tensor       # positions: (N, *event) for the reduced walk, (N, M, *event) for the full walk
    v: torch.Tensor       # velocities, shaped like y
    alive: torch.Tensor   # bool (N,): False for diverged chains and for padding past num_chains
    step: int             # walk steps taken so far

    @property
    def langevin(self) -> LangevinState:
        """What the integrators step: (y, v)."""
        return LangevinState(self.y, self.v)


class WalkJumpEngine:
    """Many walk-jump chains in one batch.

    Args:
        model: a score model (``mmgm_ray.models`` / ``mmgm_ray.oracles``); put it on ``device`` first.
        sampler: integrator, walk, delta, gamma, u, friction, jump_every, init, block_size, threshold,
            jump_at.
        event_shape: shape of one sample x, e.g. (1, 8, 8) or (d,).
        run_seed: the run's seed in [0, 2^63); with the chain ids it determines every draw.
        block_ids: the blocks this engine holds, in batch order (any order, any subset); chain ids
            must stay below 2^32.
        device: where the state lives and noise is drawn (the draws are the same on every device).
        autocast_dtype: e.g. torch.bfloat16 to evaluate the network under autocast (state stays fp32).
        num_chains: the run's total chain count; chains with id >= num_chains (padding in the last
            block) are computed with their block but never emitted nor reported. None = all chains.
        micro_batch: chains per score evaluation (None = all in one), slices of the batch in order.
            Cut at whole blocks (as ``mmgm_ray.planner`` cuts), the results on the CPU are bitwise
            those of one evaluation; much smaller slices may round differently (oneDNN, like cuDNN,
            picks its kernels by problem size). So a run keeps one micro-batch: it is saved with
            the state and a restored engine adopts it.
    """

    def __init__(self, model: ScoreModel, sampler: SamplerConfig, event_shape: Sequence[int],
                 run_seed: int, block_ids: Sequence[int], device: str | torch.device = "cpu",
                 autocast_dtype: Optional[torch.dtype] = None,
                 num_chains: Optional[int] = None, micro_batch: Optional[int] = None):
        sampler.validate()
        if not getattr(model, "samplable", True):
            raise ValueError(f"{type(model).__name__} has no score: walk-jump sampling needs a Gaussian MNM model")
        self.model = model
        self.cfg = sampler
        self.event_shape = tuple(int(s) for s in event_shape)
        if not self.event_shape or any(s < 1 for s in self.event_shape):
            raise ValueError(f"event_shape must be non-empty positive sizes, got {event_shape!r}")
        if getattr(model, "event_shape", None) not in (None, self.event_shape):
            raise ValueError(f"event_shape {self.event_shape} does not match the model's {model.event_shape}")
        self.block_ids = [int(b) for b in block_ids]
        if not self.block_ids or len(set(self.block_ids)) != len(self.block_ids) or min(self.block_ids) < 0:
            raise ValueError(f"block_ids must be distinct non-negative integers, got {list(block_ids)!r}")
        if sampler.walk == "reduced" and not model.universal:
            raise ValueError("walk='reduced' needs a universal model; use walk='full' for MDAE / MEM^2")
        self.sigma, self.M = model.sigma, model.M
        self.params = IntegratorParams.create(sampler.resolved_delta(self.sigma), sampler.gamma,
                                              sampler.u, sampler.friction)
        self.integrator = get_integrator(sampler.integrator)
        self.n_draws = NOISE_DRAWS[sampler.integrator]
        self.device = torch.device(device)
        self.rng = rng_mod.ChainRNG(run_seed, self.device)
        self.run_seed = self.rng.run_seed
        self.bs = sampler.block_size
        if (max(self.block_ids) + 1) * self.bs > rng_mod.KEY_LIMIT:
            raise ValueError(f"chain ids must stay below 2**32: block {max(self.block_ids)} "
                             f"of block_size {self.bs} goes past it")
        self.autocast_dtype = autocast_dtype
        self.n_chains = self.bs * len(self.block_ids)
        blocks = torch.tensor(self.block_ids, dtype=torch.int64, device=self.device)
        self.block_of_chain = blocks.repeat_interleave(self.bs)
        self.chain_ids = self.block_of_chain * self.bs + torch.arange(self.bs, device=self.device).repeat(len(self.block_ids))
        if num_chains is not None and num_chains < 1:
            raise ValueError(f"num_chains must be >= 1, got {num_chains}")
        self.num_chains = num_chains
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.micro_batch = micro_batch
        self.state: Optional[EngineState] = None
        self._reset_divergence_flags(self._initial_alive())

    def _initial_alive(self) -> torch.Tensor:
        """Every chain is live, except padding past ``num_chains`` (frozen, silent)."""
        if self.num_chains is None:
            return torch.ones(self.n_chains, dtype=torch.bool, device=self.device)
        return self.chain_ids < self.num_chains

    # ---- state ----------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Walk steps taken (0 before ``initialize``)."""
        return self.state.step if self.state is not None else 0

    @property
    def alive(self) -> torch.Tensor:
        """bool (N,): chains still running (not diverged, not padding)."""
        return self.state.alive if self.state is not None else self._initial_alive()

    # ---- shapes ---------------------------------------------------------------------------
    @property
    def reduced(self) -> bool:
        return self.cfg.walk == "reduced"

    def _chain_shape(self) -> tuple[int, ...]:
        return self.event_shape if self.reduced else (self.M, *self.event_shape)

    def state_bytes_per_chain(self) -> int:
        """Bytes of (y, v) per chain."""
        return 2 * 4 * math.prod(self._chain_shape())

    # ---- initialization -------------------------------------------------------------------
    def initialize(self, data: Optional[torch.Tensor] = None) -> None:
        """Chains start at x0 (uniform on [0,1]^d as in MMGM's code, data points, or 0), y_m = x0 + sigma eps_m, v = 0."""
        init = self.cfg.init
        if init == "uniform":
            x0 = self.rng.uniform(self.chain_ids, 0, rng_mod.STREAM_INIT_X, self.event_shape)
        elif init == "zeros":
            x0 = torch.zeros(self.n_chains, *self.event_shape, device=self.device)
        elif init == "data":
            if data is None or data.shape[0] == 0:
                raise ValueError("sampler.init='data' needs a non-empty data tensor")
            if tuple(data.shape[1:]) != self.event_shape:
                raise ValueError(f"data shape {tuple(data.shape[1:])} does not match event_shape {self.event_shape}")
            idx = self.rng.randint(self.chain_ids, 0, rng_mod.STREAM_INIT_INDEX, data.shape[0])
            # index where the data lives: only the chosen rows travel to the device
            x0 = data[idx.to(data.device)].to(self.device, torch.float32)
        else:
            raise ValueError(f"unknown sampler.init {init!r}")
        eps = self.rng.normal(self.chain_ids, 0, rng_mod.STREAM_INIT_EPS, self._chain_shape())
        if self.reduced:
            y = x0 + self.model.noise.sigma_eff * eps
        else:
            y = x0.unsqueeze(1) + self.sigma * eps
        self.state = EngineState(y.contiguous(), torch.zeros_like(y), self._initial_alive(), 0)
        self._reset_divergence_flags(self.state.alive)

    # ---- one step -------------------------------------------------------------------------
    def _noise(self, step: int) -> torch.Tensor:
        """The walk noise of ``step``: N(0, I) per chain element, N(0, I/M) for the reduced walk.

        Each chain draws (draws, *chain shape) standard normals on ``STREAM_WALK``; returned as
        (draws, N, *shape) for Cheng's two draws, (N, *shape) otherwise.
        """
        xi = self.rng.normal(self.chain_ids, step, rng_mod.STREAM_WALK, (self.n_draws, *self._chain_shape()))
        if self.reduced:
            xi = xi / math.sqrt(self.M)
        return xi.movedim(1, 0) if self.n_draws > 1 else xi.squeeze(1)

    def _score_fn(self) -> Callable[[torch.Tensor], ScoreOutput]:
        fn = self.model.reduced_score if self.reduced else self.model.score
        if self.autocast_dtype is not None:
            fn = _autocast(fn, self.device.type, self.autocast_dtype)
        return _micro_batched(fn, self.micro_batch) if self.micro_batch is not None else fn

    def _check_divergence(self, out: ScoreOutput) -> None:
        """Flag chains whose state, score or jump is non-finite or whose |y|_inf explodes.

        Runs on the device with no host synchronization (a GPU keeps running ahead); flagged
        chains are turned into ``DivergenceEvent``s lazily by ``_collect_divergences``.
        """
        y, v, alive, step = self.state
        n = self.n_chains
        finite = (torch.isfinite(y.reshape(n, -1)).all(1) & torch.isfinite(v.reshape(n, -1)).all(1)
                  & torch.isfinite(out.xhat.reshape(n, -1)).all(1) & torch.isfinite(out.psi.reshape(n, -1)).all(1))
        big = y.reshape(n, -1).abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).amax(1)
        bad = (~finite | (big > self.cfg.divergence_threshold)) & alive
        self._div_step = torch.where(bad, step, self._div_step)
        self._div_nonfinite = torch.where(bad, ~finite, self._div_nonfinite)
        alive = alive & ~bad
        # Freeze diverged chains at 0 so NaN/inf never reaches the batch's arithmetic again.
        mask = alive.reshape(-1, *([1] * (y.dim() - 1)))
        self.state = EngineState(torch.where(mask, y, 0.0), torch.where(mask, v, 0.0), alive, step)

    def _collect_divergences(self) -> None:
        """Turn newly flagged chains into events (one host sync)."""
        pending = (self._div_step >= 0) & ~self._div_reported
        if not bool(pending.any()):
            return
        idx = torch.nonzero(pending).flatten()
        for i, c, b, st, nf in zip(idx.tolist(), self.chain_ids[idx].tolist(), self.block_of_chain[idx].tolist(),
                                   self._div_step[idx].tolist(), self._div_nonfinite[idx].tolist()):
            self._divergences.append(DivergenceEvent(c, b, st, "non-finite" if nf else "exploding"))
        self._div_reported |= pending

    @property
    def divergences(self) -> list[DivergenceEvent]:
        """Every divergence since ``initialize`` / restore, in detection order (a copy)."""
        self._collect_divergences()
        return list(self._divergences)

    def drain_divergences(self) -> list[DivergenceEvent]:
        """Divergences detected since the previous call, in detection order."""
        self._collect_divergences()
        new = self._divergences[self._drained:]
        self._drained = len(self._divergences)
        return new

    def _reset_divergence_flags(self, alive: torch.Tensor) -> None:
        self._div_step = torch.full((self.n_chains,), -1, dtype=torch.int64, device=self.device)
        self._div_nonfinite = torch.zeros(self.n_chains, dtype=torch.bool, device=self.device)
        self._div_reported = ~alive      # chains already dead at restore were reported before
        self._divergences: list[DivergenceEvent] = []
        self._drained = 0

    def step_once(self) -> Optional[JumpBatch]:
        """Advance every chain one walk step; return the jumps if this step is a jump step."""
        if self.state is None:
            raise RuntimeError("call initialize() or load_state_dict() first")
        noise = self._noise(self.step + 1)
        with torch.no_grad():
            new, out = self.integrator(self.state.langevin, self._score_fn(), self.params, noise)
        self.state = EngineState(new.y, new.v, self.state.alive, self.state.step + 1)
        jump_now = self.step % self.cfg.jump_every == 0
        if jump_now and self.cfg.jump_at == "full":
            with torch.no_grad():
                out = self._score_fn()(self.state.y)
        self._check_divergence(out)
        if not jump_now:
            return None
        self._collect_divergences()
        keep = self.alive
        psi = out.psi.reshape(self.n_chains, -1)
        v = self.state.v.reshape(self.n_chains, -1)
        n = int(keep.sum())
        step_t = torch.full((n,), self.step, dtype=torch.int64, device=self.device)
        return JumpBatch(
            chain_id=self.chain_ids[keep],
            block_id=self.block_of_chain[keep],
            step=step_t,
            jump_index=step_t // self.cfg.jump_every - 1,
            xhat=out.xhat.detach()[keep].float(),
            score_norm=psi[keep].norm(dim=1).float(),
            kinetic=(0.5 / self.params.u) * v[keep].pow(2).sum(1).float(),
        )

    def run(self, n_steps: int) -> Iterator[JumpBatch]:
        """Advance ``n_steps`` walk steps, yielding each jump batch as it is produced."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        for _ in range(n_steps):
            jb = self.step_once()
            if jb is not None:
                yield jb

    def run_collect(self, n_steps: int) -> Optional[JumpBatch]:
        """Advance ``n_steps`` and return all jumps concatenated (None if there were none)."""
        batches = list(self.run(n_steps))
        return JumpBatch.cat(batches) if batches else None

    # ---- save / restore -------------------------------------------------------------------
    def header(self) -> dict:
        """What a saved state must match to be restored here (seed, block size, walk, M, shape)."""
        return {"version": STATE_VERSION, "run_seed": self.run_seed, "block_size": self.bs,
                "walk": self.cfg.walk, "M": self.M, "event_shape": list(self.event_shape)}

    def state_dict(self, block_ids: Optional[Sequence[int]] = None) -> dict:
        """Exact chain state of the engine, or of ``block_ids`` only (per-block checkpoints).

        A plain dict (``torch.save`` / ``weights_only`` safe): the header, ``step``, ``block_ids``
        and the :class:`EngineState` tensors of those blocks' chains, on the CPU.
        """
        if self.state is None:
            raise RuntimeError("engine not initialized")
        blocks = self.block_ids if block_ids is None else [int(b) for b in block_ids]
        rows = self._rows(blocks)
        return {**self.header(), "step": self.step, "block_ids": blocks, "micro_batch": self.micro_batch,
                "y": self.state.y[rows].cpu().clone(), "v": self.state.v[rows].cpu().clone(),
                "alive": self.state.alive[rows].cpu().clone()}

    def _rows(self, blocks: Sequence[int]) -> torch.Tensor:
        pos = {b: i for i, b in enumerate(self.block_ids)}
        missing = [b for b in blocks if b not in pos]
        if missing:
            raise ValueError(f"blocks {missing} are not held by this engine")
        return torch.cat([torch.arange(pos[b] * self.bs, (pos[b] + 1) * self.bs, device=self.device)
                          for b in blocks])

    def load_state_dict(self, sd: dict | Sequence[dict]) -> None:
        """Restore a state written by ``state_dict``: of the whole engine, of some of its blocks,
        or a list of such dicts (e.g. one per block, as the pool's block checkpoints hold them).

        All restored blocks must share one step, and a fresh engine (no ``initialize``) needs
        every block it holds. The header (seed, block size, walk, M, shape) must match, or
        ValueError says which field differs.
        """
        sd = _join_state_dicts(sd) if isinstance(sd, (list, tuple)) else sd
        for key, val in self.header().items():
            if sd.get(key) != val:
                raise ValueError(f"checkpoint {key}={sd.get(key)!r} does not match engine {key}={val!r}")
        blocks, step = [int(b) for b in sd["block_ids"]], int(sd["step"])
        if "micro_batch" in sd:  # the state was computed with it: keep the round-off of the run
            self.micro_batch = sd["micro_batch"]
        if self.state is None:
            if sorted(blocks) != sorted(self.block_ids):
                raise ValueError("restore into a fresh engine needs every block it holds")
            zeros = torch.zeros((self.n_chains, *self._chain_shape()), device=self.device)
            self.state = EngineState(zeros, zeros.clone(), self._initial_alive(), step)
        elif step != self.step:
            raise ValueError(f"checkpoint is at step {step}, engine at step {self.step}")
        rows = self._rows(blocks)
        expect = (len(rows), *self._chain_shape())
        if tuple(sd["y"].shape) != expect or tuple(sd["v"].shape) != expect:
            raise ValueError(f"checkpoint state shape {tuple(sd['y'].shape)} != expected {expect}")
        y, v, alive = self.state.y.clone(), self.state.v.clone(), self.state.alive.clone()
        y[rows] = sd["y"].to(self.device, y.dtype)
        v[rows] = sd["v"].to(self.device, v.dtype)
        alive[rows] = sd["alive"].to(self.device)
        self.state = EngineState(y, v, alive, step)
        self._div_reported[rows] = ~alive[rows]
        self._div_step[rows] = -1


def _autocast(fn: Callable[[torch.Tensor], ScoreOutput], device_type: str, dtype: torch.dtype):
    """``fn`` evaluated under autocast; the score and jump come back in float32 (the state's dtype)."""
    def wrapped(y):
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = fn(y)
        return ScoreOutput(out.psi.float(), out.xhat.float())
    return wrapped


def _micro_batched(fn: Callable[[torch.Tensor], ScoreOutput], size: int):
    """``fn`` applied to consecutive slices of at most ``size`` chains, outputs concatenated in order."""
    def wrapped(y):
        if y.shape[0] <= size:
            return fn(y)
        outs = [fn(part) for part in y.split(size)]
        return ScoreOutput(torch.cat([o.psi for o in outs]), torch.cat([o.xhat for o in outs]))
    return wrapped


def _join_state_dicts(sds: Sequence[dict]) -> dict:
    """One state dict from several (same header and step), blocks in the given order."""
    if not sds:
        raise ValueError("no state dicts to restore")
    first = sds[0]
    for sd in sds[1:]:
        for key in (*first.keys() - {"block_ids", "y", "v", "alive"},):
            if sd.get(key) != first.get(key):
                raise ValueError(f"block states disagree on {key}: {first.get(key)!r} vs {sd.get(key)!r}")
    return {**first, "block_ids": [b for sd in sds for b in sd["block_ids"]],
            **{k: torch.cat([sd[k] for sd in sds]) for k in ("y", "v", "alive")}}


def chain_blocks(num_chains: int, block_size: int) -> list[int]:
    """Block ids covering ``num_chains`` chains (the last block may hold a few extra chains)."""
    if num_chains < 1 or block_size < 1:
        raise ValueError("num_chains and block_size must be >= 1")
    return list(range(math.ceil(num_chains / block_size)))
