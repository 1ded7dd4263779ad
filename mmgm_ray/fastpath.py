"""The sampler's forward at its best: how the one network evaluation of a walk step is computed.

A walk step costs one score evaluation on every chain (THEORY sections 4-5); the rest (noise,
integrator, divergence checks) is a few elementwise passes over the chain state. So the sampler
runs at the network's speed once the network runs at its best on the device. The options:

- ``autocast``: the network under ``torch.autocast`` in bfloat16 (or float16) where the device
  computes it natively. The chain state, psi and xhat stay float32 (the outputs are cast back), so
  only the network's round-off changes (unit round-off 2^-8 instead of 2^-24).
- ``channels_last``: NHWC activations for conv nets (the input is converted; convolutions
  propagate the layout; the model's weights are not touched).
- ``compile``: ``torch.compile`` (Inductor kernels); falls back to eager with one warning when
  compilation is unavailable or fails, and the options then say ``compile=False``.
- ``cuda_graphs``: on CUDA, ``torch.compile(mode="reduce-overhead")`` replays the forward as one
  CUDA graph at its fixed shape (no per-kernel launch cost).
- ``micro_batch``: chains per forward. An engine holding 10,000 chains need not run them as one
  batch: the forward runs over equal chunks of ``micro_batch`` chains (a short last chunk is padded
  with zeros when compiled, so a graph only ever sees one shape).

Reproducibility: the options decide the round-off. The default, ``sampler.fast="auto"``, resolves
them without any timing (``resolve_options``): float32 eager on a CPU, so a fresh run's rows depend
on (run seed, chain id) only and never on the machine's load. ``fast="on"`` measures (micro-batch,
and on a CPU bf16 vs float32) at start-up; a run records whatever set it resolved (engine state dict
hence the block checkpoints, and the manifest's ``fast_path``) and a resume reuses the recorded set.
With one option set on one device the trajectory is bitwise the same: the chunks hold the same rows
in the same order and compiled CPU kernels are deterministic.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from mmgm_ray.config import SamplerConfig
from mmgm_ray.integrators import ScoreFn, ScoreOutput
from mmgm_ray.models import EnergyScoreModel

AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
# torch.compile's CUDA graphs (cudagraph trees) keep their state in thread-local storage that only
# the importing thread has before torch 2.13: a compiled function called on another Python thread
# (a Ray actor's methods run on its executor threads) fails an assertion (pytorch issue 123177)
CUDA_GRAPHS_ACROSS_THREADS = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 13)
MIN_MICRO_BATCH = 16
# chain-steps a CUDA run must take before ``compile="auto"`` compiles: a count, not a timing (the
# choice decides the round-off). Inductor takes about a minute on a GPU for 2-4x; 10^6 chain-steps of
# a 33M-parameter U-Net at CIFAR size take 40-200 s on one H200 (measured 4,700 images/s float32
# eager, 28,000 bf16 compiled)
COMPILE_MIN_CHAIN_STEPS = 10 ** 6


@dataclass(frozen=True)
class FastOptions:
    """A resolved option set for the score evaluation (see the module docstring)."""
    autocast: str = "float32"        # "float32" (no autocast) | "bfloat16" | "float16"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False        # compile with mode="reduce-overhead" (CUDA only)
    micro_batch: int = 0             # chains per forward; 0 = all chains in one forward

    def __post_init__(self):
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)}, got {self.autocast!r}")
        if isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int) or self.micro_batch < 0:
            raise ValueError(f"micro_batch must be an integer >= 0, got {self.micro_batch!r}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile (CUDA graphs come from torch.compile mode='reduce-overhead')")

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype (None: float32, no autocast)."""
        return AUTOCAST_DTYPES[self.autocast]

    def as_dict(self) -> dict:
        """Plain JSON-able dict (what runs record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FastOptions":
        """Inverse of :meth:`as_dict`; ValueError names unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names:
            raise ValueError(f"fast-path options must be a mapping with keys from {sorted(names)}, got {d!r}")
        return cls(**d)


OFF = FastOptions()


def autocast_name(dtype: Optional[torch.dtype]) -> str:
    """The ``FastOptions.autocast`` name of a dtype (None and float32: "float32")."""
    names = {v: k for k, v in AUTOCAST_DTYPES.items()}
    names[torch.float32] = "float32"
    if dtype not in names:
        raise ValueError(f"autocast dtype must be one of {sorted(AUTOCAST_DTYPES)}, got {dtype}")
    return names[dtype]


# ---- what the device and the model support ----------------------------------------------------------------

def native_low_precision(device: torch.device | str) -> str:
    """"bfloat16" where the device computes it natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX),
    else "float32" (emulated bf16 is slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return "bfloat16" if any(p is not None and p() for p in probes) else "float32"
    return "float32"


def _has_network(model: nn.Module) -> bool:
    """False for the closed-form oracles (buffers only): nothing for the fast path to speed up."""
    return any(True for _ in model.parameters())


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def chain_shape(model, walk: str, event_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of one chain's y: the event for the reduced walk, (M, *event) for the full walk."""
    return tuple(event_shape) if walk == "reduced" else (model.M, *event_shape)


def score_function(model, walk: str) -> ScoreFn:
    """The score the engine evaluates: ``reduced_score`` for the reduced walk, ``score`` otherwise."""
    return model.reduced_score if walk == "reduced" else model.score


def balanced_micro_batch(n_chains: int, micro_batch: int) -> int:
    """The smallest chunk size that splits ``n_chains`` into as many chunks as ``micro_batch`` does
    (equal chunks, at most one row of padding per chunk)."""
    if micro_batch <= 0 or micro_batch >= n_chains:
        return n_chains
    chunks = math.ceil(n_chains / micro_batch)
    return math.ceil(n_chains / chunks)


# ---- the score evaluation ---------------------------------------------------------------------------------

class FastScore:
    """``score_fn(y) -> ScoreOutput`` evaluated under ``options``: float32 in, float32 out.

    Args:
        fn: the model's score function (``score_function(model, walk)``).
        options: the option set; with ``compile`` the function is compiled and run once here on a
            batch of zeros (the compile cost is paid at construction). A failure warns once and
            falls back to eager: ``self.options`` are then the options actually in effect.
        device: where the chains live.
        chain_shape: shape of one chain's y (the event, or (M, *event) for the full walk).
    """

    def __init__(self, fn: ScoreFn, options: FastOptions, device: torch.device | str, chain_shape: Sequence[int]):
        self.fn = fn
        self.device = torch.device(device)
        self.chain_shape = tuple(int(s) for s in chain_shape)
        if options.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"fast-path option cuda_graphs needs a CUDA device, the chains are on {self.device}")
        if options.compile and options.micro_batch < 1:
            raise ValueError("a compiled score needs its micro_batch (the one shape it is compiled for)")
        self.options = options
        self._to_nhwc = options.channels_last and len(self.chain_shape) == 3
        self._forward: Callable = self._eager
        if options.compile:
            self._forward = self._compiled()

    def _eager(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._to_nhwc:
            y = y.contiguous(memory_format=torch.channels_last)
        dtype = self.options.dtype
        with torch.autocast(device_type=self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = self.fn(y)
        return out.psi.float(), out.xhat.float()

    def _compiled(self) -> Callable:
        """The compiled forward, warmed up on zeros; eager (and ``compile=False``) if that fails."""
        mode = "reduce-overhead" if self.options.cuda_graphs else None
        try:
            fwd = torch.compile(self._eager, mode=mode, dynamic=False)
            with torch.no_grad():
                fwd(torch.zeros(self.options.micro_batch, *self.chain_shape, device=self.device))
            return fwd
        except Exception as e:  # noqa: BLE001 - any compiler failure: run eager, say so once
            warnings.warn(f"torch.compile of the score failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          f"running eager", RuntimeWarning, stacklevel=3)
            self.options = dataclasses.replace(self.options, compile=False, cuda_graphs=False)
            return self._eager

    def __call__(self, y: torch.Tensor) -> ScoreOutput:
        n, mb = y.shape[0], self.options.micro_batch or y.shape[0]
        if n == mb or (n < mb and not self.options.compile):
            psi, xhat = self._forward(y)
            if self.options.cuda_graphs:   # the graph's output buffers are overwritten by its next replay
                return ScoreOutput(psi.clone(), xhat.clone())
            return ScoreOutput(psi.contiguous(), xhat.contiguous())
        psi = xhat = None
        for s in range(0, n, mb):
            chunk = y[s:s + mb]
            k = chunk.shape[0]
            if k < mb and self.options.compile:   # one shape for the compiled graph
                chunk = torch.cat([chunk, chunk.new_zeros(mb - k, *chunk.shape[1:])])
            p, x = self._forward(chunk)
            if psi is None:
                psi = torch.empty((n, *p.shape[1:]), dtype=torch.float32, device=p.device)
                xhat = torch.empty((n, *x.shape[1:]), dtype=torch.float32, device=x.device)
            psi[s:s + k] = p[:k]   # copied out at once: a CUDA graph reuses its output buffers
            xhat[s:s + k] = x[:k]
        return ScoreOutput(psi, xhat)


# ---- choosing the options -----------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rows_per_second(score: Callable, batch: int, chain_shape: Sequence[int], device: torch.device,
                    min_time_s: float = 0.1) -> float:
    """Forward rate (rows/s) of ``score`` at ``batch`` rows: one warm-up call, then calls for >= ``min_time_s``.

    The input is fixed (a private generator), so measuring never touches the global RNG."""
    gen = torch.Generator(device=device).manual_seed(0)
    y = torch.rand(batch, *chain_shape, generator=gen, device=device)
    with torch.no_grad():
        score(y)
        _sync(device)
        calls, t0 = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - t0 < min_time_s:
            score(y)
            calls += 1
        _sync(device)
    return batch * calls / (time.perf_counter() - t0)


def measure_micro_batch(fn: ScoreFn, options: FastOptions, device: torch.device, chain_shape: Sequence[int],
                        n_chains: int, max_micro_batch: Optional[int] = None,
                        budget_s: float = 3.0) -> tuple[int, float]:
    """(chains per forward, rows/s) that evaluate ``fn`` fastest in eager mode under ``options``.

    Candidates: powers of two from 16 up to min(n_chains, max_micro_batch), and that cap itself. A
    larger batch is kept only if it is >= 3% faster (smaller batches use less memory); the search
    stops past the knee (a rate below 80% of the best) or after ``budget_s``.
    """
    cap = max(1, min(n_chains, max_micro_batch or n_chains))
    sizes = sorted({b for b in (2 ** k for k in range(4, 31)) if b < cap} | {cap})
    best, best_rate = sizes[0], 0.0
    t_end = time.perf_counter() + budget_s
    for b in sizes:
        eager = FastScore(fn, dataclasses.replace(options, compile=False, cuda_graphs=False, micro_batch=b),
                          device, chain_shape)
        rate = rows_per_second(eager, b, chain_shape, device)
        if rate > 1.03 * best_rate:
            best, best_rate = b, rate
        elif rate < 0.8 * best_rate or time.perf_counter() > t_end:
            break
    return balanced_micro_batch(n_chains, best), best_rate


def _fastest_autocast(sampler: SamplerConfig, fn: ScoreFn, base: FastOptions, device: torch.device,
                      chain_shape: Sequence[int], n_chains: int, bound: Optional[int],
                      explicit_mb: int) -> tuple[FastOptions, int, Optional[float]]:
    """(options with their autocast, micro-batch, rows/s or None) for ``fast="on"``, measured.

    ``autocast="auto"`` is the device's native low precision (``native_low_precision``) on CUDA. On a
    CPU both float32 and the native one are measured (eager) and low precision is kept only when
    >= 3% faster: on a 2-core AVX512-BF16 CPU without AMX, eager bf16 ran the digits U-Net at half
    the float32 rate (``bench/sampler.py``, README "Performance"), the casts costing more than the
    arithmetic.
    """
    native = native_low_precision(device) if sampler.autocast == "auto" else sampler.autocast
    names = ["float32", native] if sampler.autocast == "auto" and device.type == "cpu" and native != "float32" \
        else [native]
    best = None
    for name in names:
        opts = dataclasses.replace(base, autocast=name)
        if explicit_mb and len(names) == 1:
            return opts, balanced_micro_batch(n_chains, explicit_mb), None
        if explicit_mb:
            mb = balanced_micro_batch(n_chains, explicit_mb)
            rate = rows_per_second(FastScore(fn, dataclasses.replace(opts, micro_batch=mb), device, chain_shape),
                                   mb, chain_shape, device)
        else:
            mb, rate = measure_micro_batch(fn, opts, device, chain_shape, n_chains, bound)
        if best is None or rate > 1.03 * best[2]:
            best = (opts, mb, rate)
    return best


def _auto_options(sampler: SamplerConfig, model: nn.Module, device: torch.device, nhwc: bool, n_chains: int,
                  work_chain_steps: int, mb: int) -> FastOptions:
    """``fast="auto"`` for a network: a pure function of the config, the model, the device type and
    the run's size, never of a timing (the options decide the round-off; a fresh run's rows must not
    depend on the machine's load).

    - autocast: float32 on a CPU (eager bf16 measured at half the float32 rate on the project's
      AVX512-BF16 CPU, README "Performance"), the native low precision on CUDA;
    - compile: never on a CPU (Inductor takes 1-4 minutes on 2 cores for the project's U-Nets for
      ~1.5x, and float32 eager is the reference round-off); on CUDA for runs of at least
      ``COMPILE_MIN_CHAIN_STEPS`` chain-steps, never for energy models (their score is a backward
      pass), without CUDA graphs (``CUDA_GRAPHS_ACROSS_THREADS``; ``fast="on"`` asks for them);
    - micro-batch: the caller's (explicit or the memory bound), as given.
    The explicit ``sampler.autocast`` / ``sampler.compile`` fields override.
    """
    native = native_low_precision(device) if device.type == "cuda" else "float32"
    autocast = native if sampler.autocast == "auto" else sampler.autocast
    if sampler.compile == "auto":
        compile_ = (device.type == "cuda" and not isinstance(model, EnergyScoreModel)
                    and work_chain_steps >= COMPILE_MIN_CHAIN_STEPS)
    else:
        compile_ = sampler.compile == "on"
    mb = balanced_micro_batch(n_chains, mb) if compile_ and mb else mb
    return FastOptions(autocast, nhwc, compile_, False, mb if mb < n_chains else 0)


def resolve_options(sampler: SamplerConfig, model: nn.Module, device: torch.device | str,
                    chain_shape: Sequence[int], n_chains: int, work_chain_steps: int,
                    max_micro_batch: Optional[int] = None, micro_batch: int = 0,
                    same_thread: bool = True) -> FastOptions:
    """The option set for ``sampler.fast`` / ``autocast`` / ``compile`` and ``micro_batch`` (the
    caller's explicit chains per forward, e.g. ``pool.micro_batch``; 0 = none) on ``device``.
    ``same_thread=False`` says the score may be called on another thread than the one building it
    (a Ray actor): then no CUDA graphs before torch 2.13 (``CUDA_GRAPHS_ACROSS_THREADS``).

    - ``fast="off"``: float32 eager; the micro-batch is ``micro_batch`` or the memory bound
      ``max_micro_batch`` (0 = all chains in one forward).
    - ``fast="auto"`` (the default): off for closed-form oracles (no network), else
      ``_auto_options``: nothing is measured, the options are a pure function of the config, the
      model, the device type and the run's size (``work_chain_steps``), so a fresh run's rows do not
      depend on the machine's load.
    - ``fast="on"``: every option the device supports, chosen by a short measurement at start-up:
      low precision where it is faster (``_fastest_autocast``), the fastest micro-batch within the
      memory bound, channels_last for conv nets on CUDA, compile (and CUDA graphs on CUDA); the
      explicit ``autocast`` / ``compile`` fields and ``micro_batch`` override, and with all three
      explicit nothing is measured. A measured set depends on the load at start-up, so the run
      records it (block checkpoints, manifest ``fast_path``) and a resume reuses it.
    """
    device = torch.device(device)
    bound = max_micro_batch if max_micro_batch else None
    explicit_mb = min(micro_batch, bound or micro_batch) if micro_batch else 0
    given_mb = explicit_mb or bound or 0
    if sampler.fast == "off" or (sampler.fast == "auto" and not _has_network(model)):
        return dataclasses.replace(OFF, micro_batch=given_mb if given_mb < n_chains else 0)
    # NHWC pays on GPUs (tensor cores); on CPUs oneDNN showed no gain for these nets (measured)
    nhwc = device.type == "cuda" and _has_conv(model) and len(chain_shape) == 3
    if sampler.fast == "auto":
        return _auto_options(sampler, model, device, nhwc, n_chains, work_chain_steps, given_mb)
    fn = score_function(model, sampler.walk)
    opts, mb, _ = _fastest_autocast(sampler, fn, FastOptions(channels_last=nhwc), device, chain_shape,
                                    n_chains, bound, explicit_mb)
    compile_ = sampler.compile != "off" and not (sampler.compile == "auto" and isinstance(model, EnergyScoreModel))
    graphs = compile_ and device.type == "cuda" and (same_thread or CUDA_GRAPHS_ACROSS_THREADS)
    return dataclasses.replace(opts, compile=compile_, cuda_graphs=graphs, micro_batch=mb)
