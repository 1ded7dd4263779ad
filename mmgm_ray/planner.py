"""Memory plan of a chain actor: how many chains its device holds, how many go through the network
in one evaluation (the micro-batch), and how many jump rows its writer gathers on the host before
converting them, from the free memory and the sample size (docs/GPU.md, "Memory").

The figures, in bytes (``plan_memory`` computes exactly these; the tests redo them by hand)::

    device budget   B = floor(fraction * device_share * free device memory)
    chain state     S = 4 * ((STEP_TENSORS + noise_draws) * n_state + n_event)
                        n_state: elements of one chain's y (d for the reduced walk, M d for the full walk);
                        STEP_TENSORS float32 chain-sized tensors are alive during one integrator step
                        (y, v, the half-step y, psi, the new v, the new y, one temporary), plus the
                        step's noise draws and the chain's jump (THEORY sections 4-5)
    chain score     A = working memory of one chain's score evaluation (``measure_score_bytes``)
    micro-batch     m = min(chains, floor((B - W - chains * S) / A)), W the weights; whole blocks
                        (a multiple of block_size) once m >= block_size
    max chains      floor((B - W - A * min(block_size, chains)) / S): chains this device holds while
                        still evaluating one block per network call
    host budget     H = floor(fraction * host_share * available host memory)
    row             R = 4 n_event + 40: float32 xhat, four int64 ids, two float32 statistics (a JumpBatch row)
    fixed host      F = (queue_size + jumps_per_checkpoint) * chains * R: jumps waiting in the queue, and
                        the rows of one checkpoint interval the block writers hold until the checkpoint
    gather rows     G = min(MAX_GATHER_ROWS, floor((H - F) / (GATHER_COPIES * R)) - chains): a flush
                        holds the gathered rows, their block-sorted copy and their Arrow conversion
                        (GATHER_COPIES), and the buffer overshoots G by at most one step (chains rows)
    stretch         K = min(MAX_STRETCH, 1 + floor((H - peak) / (jumps_per_checkpoint * chains * R))):
                        checkpoint intervals whose rows the writers may hold uncommitted, i.e. the
                        boundaries an actor may pass by (``pool.checkpoint_min_interval_s``): each
                        further interval adds one interval's rows to F

A plan that cannot hold the actor's chains with one block per network call, or one step of jumps
on the host, raises ValueError naming the figures. The micro-batch is a memory bound: a faster
smaller one may be used (it must stay fixed within a run, see ``WalkJumpEngine.micro_batch``).

Pure PyTorch; no Ray.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch

STEP_TENSORS = 7
GATHER_COPIES = 3
MAX_GATHER_ROWS = 1 << 18
MAX_STRETCH = 64                    # checkpoint intervals an actor may run without committing
ROW_FIXED_BYTES = 4 * 8 + 2 * 4     # chain_id, block_id, step, jump_index (int64); score_norm, kinetic (float32)
DEFAULT_FRACTION = 0.8              # of the free memory; the rest is headroom (allocator slack, fragmentation)
_GIB = float(1 << 30)


@dataclass(frozen=True)
class MemoryPlan:
    """One actor's memory figures (bytes unless named otherwise); see the module docstring."""
    device: str                 # device type the chains run on ("cuda" | "cpu")
    chains: int                 # chains the actor holds (padding of the last block included)
    block_size: int
    device_free: int            # free device memory measured at start
    device_budget: int          # B
    weights_bytes: int          # W
    state_bytes: int            # S, per chain
    score_bytes: int            # A, per chain
    micro_batch: int            # m: chains per network evaluation
    max_chains: int             # chains the device could hold (one block per evaluation)
    host_free: int              # available host memory measured at start
    host_budget: int            # H
    row_bytes: int              # R
    fixed_host_bytes: int       # F
    gather_rows: int            # G
    host_peak_bytes: int        # F + GATHER_COPIES * (G + chains) * R
    checkpoint_stretch: int = 1  # K

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for stderr at actor start."""
        return (f"memory plan: {self.chains} chains on {self.device} (device budget {self.device_budget / _GIB:.2f} "
                f"of {self.device_free / _GIB:.2f} GiB free; state {self.state_bytes} B + score {self.score_bytes} B "
                f"per chain; at most {self.max_chains} chains), micro-batch {self.micro_batch}, writer gathers "
                f"{self.gather_rows} rows of {self.row_bytes} B (host peak {self.host_peak_bytes / _GIB:.2f} of "
                f"{self.host_budget / _GIB:.2f} GiB budget)")


def plan_memory(*, chains: int, block_size: int, state_numel: int, event_numel: int, noise_draws: int,
                score_bytes: int, weights_bytes: int, device: str, device_free: int, host_free: int,
                queue_size: int, jumps_per_checkpoint: int, fraction: float = DEFAULT_FRACTION,
                device_share: float = 1.0, host_share: float = 1.0) -> MemoryPlan:
    """The memory plan of an actor holding ``chains`` chains (module docstring for the formulas).

    ``device_share`` / ``host_share``: this actor's share of the device / host when several actors
    share it (e.g. ``gpus_per_actor`` = 0.5: two actors on one GPU, each planning with half).
    Raises ValueError when the chains, or one step of their jumps, do not fit.
    """
    for name, v in (("chains", chains), ("block_size", block_size), ("state_numel", state_numel),
                    ("event_numel", event_numel), ("noise_draws", noise_draws), ("score_bytes", score_bytes)):
        if v < 1:
            raise ValueError(f"plan_memory: {name} must be >= 1, got {v}")
    if not (0.0 < fraction <= 1.0 and 0.0 < device_share <= 1.0 and 0.0 < host_share <= 1.0):
        raise ValueError(f"plan_memory: fraction and shares must be in (0, 1], got {fraction}, "
                         f"{device_share}, {host_share}")
    budget = int(fraction * device_share * device_free)
    state = 4 * ((STEP_TENSORS + noise_draws) * state_numel + event_numel)
    first = min(block_size, chains)
    max_chains = (budget - weights_bytes - score_bytes * first) // state
    if max_chains < chains:
        raise ValueError(
            f"an actor with {chains} chains needs {(weights_bytes + chains * state + score_bytes * first) / _GIB:.2f} "
            f"GiB on {device} ({state} B of state per chain, {score_bytes} B per chain in a network call, "
            f"{weights_bytes} B of weights); its budget is {budget / _GIB:.2f} GiB ({fraction:g} x "
            f"{device_share:g} x {device_free / _GIB:.2f} GiB free): use more actors (pool.num_actors) or fewer chains")
    micro = min(chains, (budget - weights_bytes - chains * state) // score_bytes)
    if micro >= block_size:
        micro -= micro % block_size
    row = 4 * event_numel + ROW_FIXED_BYTES
    host_budget = int(fraction * host_share * host_free)
    fixed = (queue_size + jumps_per_checkpoint) * chains * row
    gather = min(MAX_GATHER_ROWS, (host_budget - fixed) // (GATHER_COPIES * row) - chains)
    if gather < chains:
        raise ValueError(
            f"one step of jumps of {chains} chains ({chains * row} B) does not fit the writer's host budget: "
            f"{host_budget / _GIB:.2f} GiB ({fraction:g} x {host_share:g} x {host_free / _GIB:.2f} GiB available), "
            f"of which {fixed / _GIB:.2f} GiB are queued or uncommitted rows: use more actors or lower "
            f"pool.queue_size / pool.checkpoint_every")
    peak = fixed + GATHER_COPIES * (gather + chains) * row
    stretch = min(MAX_STRETCH, 1 + (host_budget - peak) // (jumps_per_checkpoint * chains * row))
    return MemoryPlan(device, chains, block_size, int(device_free), budget, int(weights_bytes), state,
                      int(score_bytes), int(micro), int(max_chains), int(host_free), host_budget, row, fixed,
                      int(gather), int(peak), int(stretch))


# ---- measuring what the plan needs ---------------------------------------------------------------

def available_host_memory() -> int:
    """Bytes of host memory available to new allocations (Linux MemAvailable: free + reclaimable cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux: free pages only (a lower bound)
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_memory(device: torch.device | str) -> int:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on CUDA, available host memory on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_host_memory()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (an oracle's precomputed factors included)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def measure_score_bytes(module: torch.nn.Module, score_fn: Callable, y: torch.Tensor) -> int:
    """Working memory of one chain's score evaluation, from one evaluation of ``score_fn`` on the
    probe batch ``y`` (its first dimension: chains).

    CUDA: the allocator's peak above what was allocated before the call. CPU (no allocator
    statistics): the bytes of every output of ``module``'s submodules during the call, an upper
    bound of a forward pass's live activations, doubled when autograd records them for a backward
    inside the score (MEM^2 keeps them for it and allocates as much for gradients); at least eight
    float64 chain-sized temporaries (closed-form oracles, which have no submodules).
    """
    n = int(y.shape[0])
    if y.device.type == "cuda":
        torch.cuda.synchronize(y.device)
        torch.cuda.reset_peak_memory_stats(y.device)
        base = torch.cuda.memory_allocated(y.device)
        with torch.no_grad():  # as the engine evaluates it (MEM^2 turns gradients on inside)
            score_fn(y)
        torch.cuda.synchronize(y.device)
        return max(1, math.ceil((torch.cuda.max_memory_allocated(y.device) - base) / n))
    total, backward = 0, False

    def count(_mod, _inp, output) -> None:
        nonlocal total, backward
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
                backward |= t.requires_grad   # recorded for a backward inside the score (MEM^2)

    hooks = [m.register_forward_hook(count) for m in module.modules() if m is not module]
    try:
        with torch.no_grad():
            score_fn(y)
    finally:
        for h in hooks:
            h.remove()
    floor = 8 * 8 * y[0].numel()
    return max(floor, math.ceil(total * (2 if backward else 1) / n))
