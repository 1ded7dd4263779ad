"""One typed configuration system (dataclasses + YAML) shared by the CLI, the jobs and the tests.

Every section is a dataclass with defaults; ``RunConfig`` nests them. ``from_dict`` checks key names
and value types recursively and raises ``ValueError`` naming the offending dotted key, so a bad
config fails before any worker starts. Each section's ``validate()`` checks value ranges.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

from mmgm_ray import validators as check

#: a number in exponent form without a dot (1e-6), which YAML 1.2 reads as a float and PyYAML as a string
_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Generic (de)serialisation with type checking
# --------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError:  # try the next alternative
                continue
        raise ValueError(f"config key '{key}': {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"config key '{key}': {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}': expected a list, got {type(value).__name__}")
        (elem,) = typing.get_args(tp)[:1] or (Any,)
        out = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, key)
    if tp is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-6 (no dot) as a string; YAML 1.2 reads a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key '{key}': expected a string, got {value!r}")
        return value
    return value


# Keys that moved to their own sections (0.2): named in the error so old configs are easy to fix.
_MOVED = {**{f"train.{k}": f"train.resources.{k}" for k in
             ("num_workers", "use_gpu", "cpus_per_worker", "backend", "max_failures", "num_to_keep",
              "scale_timeout_s")},
          **{f"train.preview_{k}": f"train.preview.{k}" for k in ("every", "chains", "steps", "nrow", "scale")},
          **{f"pool.{k}": f"generate.{k}" for k in ("num_samples", "burn_in", "thin")}}


def _from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    moved = {f"{prefix}.{k}": _MOVED[f"{prefix}.{k}"] for k in sorted(unknown) if f"{prefix}.{k}" in _MOVED}
    if moved:
        raise ValueError("config key(s) moved: " + ", ".join(f"{a} is now {b}" for a, b in moved.items()))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where}; allowed: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict) -> T:
    """Build dataclass ``cls`` from a plain mapping, checking names and types; then validate."""
    obj = _from_dict(cls, data or {})
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def to_dict(obj: Any) -> dict:
    """Plain-data (YAML/JSON-safe) view of a config dataclass."""
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

@dataclass
class NoiseConfig:
    """Multimeasurement noise model (THEORY section 1)."""
    kind: Literal["gaussian", "poisson"] = "gaussian"
    sigma: float = 1.0          # noise level of every channel (Gaussian MNM)
    M: int = 8                  # number of measurements

    def validate(self) -> None:
        check.positive("noise.sigma", self.sigma)
        check.at_least("noise.M", self.M, 1)


@dataclass
class SamplerConfig:
    """Walk-jump sampling (THEORY sections 4-5)."""
    integrator: Literal["aboba", "cheng", "ula"] = "aboba"
    walk: Literal["reduced", "full"] = "reduced"   # reduced = exact (ybar, vbar) walk, universal models only
    delta: Optional[float] = None    # step size; None -> 0.5 * sigma (MMGM code default)
    gamma: float = 0.5               # friction
    u: float = 1.0                   # inverse mass
    friction: Literal["scaled", "unscaled"] = "scaled"  # zeta1 = exp(-gamma*delta) or exp(-gamma)
    jump_every: int = 10             # k: one jump xhat every k walk steps
    init: Literal["uniform", "data", "zeros"] = "uniform"  # x0 ~ U[0,1]^d (MMGM code), data + noise, or 0
    block_size: int = 256            # chains per checkpoint / storage block (never changes the draws)
    divergence_threshold: float = 1e4  # |y|_inf above this (or non-finite) marks a chain diverged
    # where A-B-O-B-A evaluates the jump: "half" = the step's own (half-step) score evaluation, free;
    # "full" = one extra network call at the full-step position, exact jump law on Gaussian targets
    jump_at: Literal["half", "full"] = "half"
    # TF32 matmuls / convolutions on Ampere+ GPUs: faster, ~1e-3 relative error, rows that differ
    # from a float32 GPU's (mmgm_ray.hardware); cuDNN runs deterministic, without autotuning
    allow_tf32: bool = False
    # the sampler's forward (mmgm_ray.fastpath): "auto" = fixed per device type, never timed (CPU:
    # float32 eager; CUDA: bf16, compiled for long runs), "off" = float32 eager, "on" = every option
    # the device supports, measured at start-up and recorded. YAML's on / off booleans are accepted.
    fast: Union[bool, Literal["auto", "on", "off"]] = "auto"
    autocast: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # network dtype (state stays float32)
    compile: Union[bool, Literal["auto", "on", "off"]] = "auto"  # torch.compile (eager fallback, one warning)

    def __post_init__(self) -> None:
        # YAML 1.1 reads on / off as booleans: keep the canonical strings (configs are compared on resume)
        for key in ("fast", "compile"):
            value = getattr(self, key)
            if isinstance(value, bool):
                setattr(self, key, "on" if value else "off")

    def validate(self) -> None:
        check.one_of("sampler.fast", self.fast, ["auto", "on", "off"])
        check.one_of("sampler.compile", self.compile, ["auto", "on", "off"])
        check.positive("sampler.delta", self.delta, allow_none=True)
        check.positive("sampler.gamma", self.gamma)
        check.positive("sampler.u", self.u)
        check.positive("sampler.divergence_threshold", self.divergence_threshold)
        check.at_least("sampler.jump_every", self.jump_every, 1)
        check.at_least("sampler.block_size", self.block_size, 1)
        if self.jump_at == "full" and self.integrator != "aboba":
            raise ValueError(f"sampler.jump_at='full' applies to integrator 'aboba' only; {self.integrator!r} "
                             "already evaluates its score (and jump) at the full-step position")

    def resolved_delta(self, sigma: float) -> float:
        return float(self.delta) if self.delta is not None else 0.5 * float(sigma)


@dataclass
class DataConfig:
    """Training / reference data (mmgm_ray.data)."""
    name: str = "digits"         # digits | mnist | fashion_mnist | cifar10 | parquet | gmm
    path: Optional[str] = None   # file, folder or fsspec URL (fashion_mnist: default = Debian's dataset-fashion-mnist)
    split: str = "train"         # train | test (mnist, fashion_mnist, cifar10; the others ignore it)
    # synthetic Gaussian mixture (name == "gmm")
    gmm_components: int = 4
    gmm_dim: int = 2
    gmm_samples: int = 20000
    gmm_seed: int = 0
    limit: Optional[int] = None  # use only the first N examples (smoke runs)
    hflip: bool = False          # random left-right flips in the training loader (MMGM CIFAR-10 recipe)

    def validate(self) -> None:
        known = ["digits", "mnist", "fashion_mnist", "cifar10", "parquet", "gmm"]
        if self.name not in known:
            raise ValueError(f"data.name: unknown data set {self.name!r}; known: {known}")
        if self.name in {"mnist", "cifar10", "parquet"} and not self.path:
            raise ValueError(f"data.path is required for data set {self.name!r}")
        check.one_of("data.split", self.split, ["train", "test"])
        check.at_least("data.limit", self.limit, 1, allow_none=True)
        for key in ("gmm_components", "gmm_dim", "gmm_samples"):
            check.at_least(f"data.{key}", getattr(self, key), 1)


@dataclass
class NetConfig:
    """Network architecture (mmgm_ray.nets)."""
    arch: Literal["auto", "unet", "mlp"] = "auto"  # auto: U-Net for (C,H,W) events, MLP for vectors
    channels: int = 32                 # base width of the U-Net
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])  # width multiplier per resolution level
    num_res_blocks: int = 1            # residual blocks per level (the decoder uses one more)
    attn_resolutions: list[int] = field(default_factory=list)  # feature-map heights with self-attention
    mid_attn: bool = True              # self-attention in the U-Net bottleneck
    dropout: float = 0.0
    hidden: int = 256                  # MLP width
    depth: int = 3                     # MLP hidden layers
    zero_init_out: bool = True         # last layer starts at zero: initial output 0, whatever the input

    def validate(self) -> None:
        for key in ("channels", "hidden", "depth"):
            check.at_least(f"model.net.{key}", getattr(self, key), 1)
        check.at_least("model.net.num_res_blocks", self.num_res_blocks, 0)
        check.in_range("model.net.dropout", self.dropout, 0.0, 1.0)
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"model.net.channel_mult must be a non-empty list of integers >= 1, "
                             f"got {self.channel_mult}")
        if any(r < 1 for r in self.attn_resolutions):
            raise ValueError(f"model.net.attn_resolutions must hold resolutions >= 1, got {self.attn_resolutions}")


@dataclass
class ModelConfig:
    """Which score model parametrization (THEORY sections 2-3, 6)."""
    kind: Literal["universal", "mdae", "mem2", "muvb"] = "universal"  # with noise.kind=poisson: mem2 only
    net: NetConfig = field(default_factory=NetConfig)
    input_scaling: bool = True      # MMGM: scale network input by 1/sqrt(0.225^2 + sigma^2) (MDAE/MEM^2)
    sigmoid_output: bool = False    # MMGM: sigmoid output for data in [0, 1] (MDAE)
    precond: Literal["edm", "none"] = "edm"  # universal: g = c_skip ybar + c_out net(c_in ybar) at sigma_eff
    sigma_data: float = 0.5         # data scale used by the "edm" preconditioning
    # MUVB (THEORY section 3): latent size of the VAE and the number K of fixed reparametrization
    # draws in its ELBO (the energy is deterministic: the same K draws in training and sampling)
    latent_dim: int = 16
    elbo_samples: int = 1

    def validate(self) -> None:
        self.net.validate()
        check.positive("model.sigma_data", self.sigma_data)
        check.at_least("model.latent_dim", self.latent_dim, 1)
        check.at_least("model.elbo_samples", self.elbo_samples, 1)


@dataclass
class TrainResources:
    """Where training runs on Ray Train: workers, devices, retries (Ray's Scaling/Failure/Checkpoint configs)."""
    num_workers: int = 1            # Ray Train workers (DDP when > 1)
    use_gpu: bool = False           # one GPU per worker
    cpus_per_worker: float = 1.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # DDP backend; auto = nccl with GPUs, gloo on CPU
    max_failures: int = 2           # worker-group restarts from the latest checkpoint (-1 = forever)
    num_to_keep: int = 2            # checkpoints kept in storage
    scale_timeout_s: float = 900.0  # how long to wait for an autoscaler to add the nodes (mmgm_ray.preflight)

    def validate(self) -> None:
        check.positive("train.resources.scale_timeout_s", self.scale_timeout_s)
        check.at_least("train.resources.num_workers", self.num_workers, 1)
        check.positive("train.resources.cpus_per_worker", self.cpus_per_worker)
        check.at_least("train.resources.max_failures", self.max_failures, -1)
        check.at_least("train.resources.num_to_keep", self.num_to_keep, 1)
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("train.resources.backend='nccl' needs train.resources.use_gpu=true (NCCL is GPU-only)")


@dataclass
class PreviewConfig:
    """Preview chains drawn with the EMA model during training (a PNG grid under previews/)."""
    every: int = 0                  # steps between previews; 0 = only at the end
    chains: int = 64                # 0 = no previews
    steps: int = 200                # walk steps per preview chain
    nrow: int = 8                   # images per row
    scale: int = 1                  # pixel enlargement (8x8 digits: 4)

    def validate(self) -> None:
        for key in ("every", "chains", "steps"):
            check.at_least(f"train.preview.{key}", getattr(self, key), 0)
        check.at_least("train.preview.nrow", self.nrow, 1)
        check.at_least("train.preview.scale", self.scale, 1)


@dataclass
class TrainConfig:
    """The training loop (mmgm_ray.train.loop): optimization, EMA, logging, checkpoints."""
    steps: int = 2000
    batch_size: int = 128           # per worker
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0          # 0 = off
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    ema_decay: float = 0.999
    ema_warmup: bool = True         # EMA decay min(ema_decay, (1+t)/(10+t)): short runs get a useful EMA
    ema_eval_batch: int = 256       # fixed held-out batch for the occasional EMA loss (0 = off)
    bf16: bool = True               # autocast to bf16 on GPU under train.fast=auto (train.autocast: any device)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # in-process runs; Ray workers use their assigned device
    log_every: int = 50
    checkpoint_every: int = 500
    resources: TrainResources = field(default_factory=TrainResources)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    # numerics flags, set explicitly (mmgm_ray.hardware; GPU training resumes to round-off, docs/GPU.md)
    allow_tf32: bool = False        # TF32 matmuls / convolutions on Ampere+ GPUs (faster, ~1e-3 relative error)
    cudnn_deterministic: bool = True  # only deterministic cuDNN algorithms
    cudnn_benchmark: bool = False   # cuDNN autotuning: its pick, and the round-off, may change run to run
    # the training step's fast path (mmgm_ray.train.fast), named like sampler.fast: "auto" = fixed per
    # device type, never timed (CPU: float32 eager, fused AdamW; CUDA: bf16 when train.bf16, fused
    # AdamW), "off" = float32 eager, for-loop AdamW, "on" = auto's set compiled (checked on the first batch).
    # The resolved set is recorded in every checkpoint and a resume reuses it. YAML on / off accepted.
    fast: Union[bool, Literal["auto", "on", "off"]] = "auto"
    autocast: Literal["auto", "float32", "bfloat16"] = "auto"  # the loss's dtype (weights, grads stay float32)
    compile: Union[bool, Literal["auto", "on", "off"]] = "auto"  # torch.compile of the net (eager fallback, warns)

    def __post_init__(self) -> None:
        # YAML 1.1 reads on / off as booleans: keep the canonical strings (configs are compared on resume)
        for key in ("fast", "compile"):
            value = getattr(self, key)
            if isinstance(value, bool):
                setattr(self, key, "on" if value else "off")

    def validate(self) -> None:
        check.one_of("train.fast", self.fast, ["auto", "on", "off"])
        check.one_of("train.compile", self.compile, ["auto", "on", "off"])
        check.one_of("train.autocast", self.autocast, ["auto", "float32", "bfloat16"])
        check.positive("train.steps", self.steps)
        check.positive("train.batch_size", self.batch_size)
        check.positive("train.lr", self.lr)
        for key in ("weight_decay", "warmup_steps", "grad_clip", "ema_eval_batch"):
            check.at_least(f"train.{key}", getattr(self, key), 0)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        check.in_range("train.ema_decay", self.ema_decay, 0.0, 1.0)
        check.at_least("train.log_every", self.log_every, 1)
        check.at_least("train.checkpoint_every", self.checkpoint_every, 1)
        self.resources.validate()
        self.preview.validate()


@dataclass
class StoreConfig:
    """Parquet sample store (mmgm_ray.store)."""
    sample_dtype: Literal["uint8", "float16", "float32"] = "float32"
    rows_per_file: int = 65536      # roll a file after this many rows ...
    steps_per_file: int = 0         # ... or after this many walk steps (0 = off)
    compression: str = "zstd"       # Parquet codec: zstd | snappy | gzip | brotli | lz4 | none

    def validate(self) -> None:
        check.positive("store.rows_per_file", self.rows_per_file)
        check.at_least("store.steps_per_file", self.steps_per_file, 0)
        check.one_of("store.compression", self.compression, ["zstd", "snappy", "gzip", "brotli", "lz4", "none"])


@dataclass
class PoolConfig:
    """Ray chain pool (mmgm_ray.pool): how many chains, how long, on which actors."""
    num_chains: int = 1000
    num_steps: int = 1000
    num_actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    checkpoint_every: int = 100     # walk steps between block checkpoints (multiple of jump_every)
    max_restarts: int = 3
    device: str = "auto"            # auto | cpu | cuda
    queue_size: int = 8             # bounded queue between the chain loop and the writer
    chunk_steps: int = 0            # walk steps per advance() call (multiple of checkpoint_every; 0 = one interval)
    # memory plan of each actor (mmgm_ray.planner): chains per network call, and the share of the
    # free device / host memory the plan may use
    micro_batch: int = 0            # chains per network evaluation (0 = the largest the memory plan allows)
    memory_fraction: float = 0.8
    # how long to wait for the cluster to place the actors, autoscaler included (mmgm_ray.preflight)
    scale_timeout_s: float = 900.0
    # after Ctrl-C: how long the actors may take to reach their next checkpoint before the driver quits
    stop_timeout_s: float = 30.0
    # on resume, also compare every committed part's CRC-32 with the committed one (reads every part);
    # sizes are always compared
    verify_checksums: bool = False
    # walk seconds an actor spends at least between two checkpoints: a boundary reached sooner is
    # passed by (the rows are the same; commits, hence parts, are fewer), so a cheap score does not
    # pay a commit, i.e. two files per block (two PUTs on an object store), every few milliseconds;
    # at most as many boundaries as the actor's memory plan can hold uncommitted rows for (planner:
    # checkpoint_stretch). 0 = commit at every boundary
    checkpoint_min_interval_s: float = 10.0

    def validate(self) -> None:
        check.positive("pool.scale_timeout_s", self.scale_timeout_s)
        check.at_least("pool.checkpoint_min_interval_s", self.checkpoint_min_interval_s, 0)
        check.positive("pool.stop_timeout_s", self.stop_timeout_s)
        for key in ("num_chains", "num_steps", "num_actors", "checkpoint_every", "queue_size"):
            check.at_least(f"pool.{key}", getattr(self, key), 1)
        for key in ("cpus_per_actor", "gpus_per_actor", "max_restarts", "chunk_steps", "micro_batch"):
            check.at_least(f"pool.{key}", getattr(self, key), 0)
        check.in_range("pool.memory_fraction", self.memory_fraction, 0.0, 1.0, high_open=False)
        check.positive("pool.memory_fraction", self.memory_fraction)
        # chunks end on checkpoints, so a stop or a retry never leaves an uncommitted tail
        check.multiple_of("pool.chunk_steps", self.chunk_steps, "pool.checkpoint_every", self.checkpoint_every)
        check.pool_device(self.device, self.gpus_per_actor)

    def device_type(self) -> str:
        """Where the actors run: cuda for ``device=cuda``, or ``auto`` with a GPU share reserved; else cpu."""
        return "cuda" if self.device == "cuda" or (self.device == "auto" and self.gpus_per_actor > 0) else "cpu"


@dataclass
class GenerateConfig:
    """``mmgm generate``: which jumps of the chains become the sample data set."""
    num_samples: int = 0            # samples wanted (0 = one per chain)
    burn_in: int = 0                # walk steps discarded at the start of every chain
    thin: int = 1                   # keep every thin-th jump per chain

    def validate(self) -> None:
        check.at_least("generate.num_samples", self.num_samples, 0)
        check.at_least("generate.burn_in", self.burn_in, 0)
        check.at_least("generate.thin", self.thin, 1)


@dataclass
class EvalConfig:
    """What the main job (``mmgm run``) measures after sampling (mmgm_ray.pipeline)."""
    grid_samples: int = 64          # last jumps of the first chains shown in samples.png
    diagnose: bool = True           # R-hat / ESS / class transitions over the store
    fid_samples: int = 200          # 0 = skip FID (Inception is slow on CPUs: keep it small there)
    fid_reference: int = 500        # training images for the reference statistics
    # reference statistics cache, keyed by data set, split, N, preprocessing, weights ("" = {output}/fid-cache)
    fid_cache: str = ""
    fid_windows: int = 3            # also FID per jump window (early/middle/late) at the same N; 0 = off

    def validate(self) -> None:
        check.at_least("evaluate.grid_samples", self.grid_samples, 1)
        check.at_least("evaluate.fid_reference", self.fid_reference, 2)
        check.at_least("evaluate.fid_windows", self.fid_windows, 0)
        if self.fid_samples != 0:
            # a covariance needs two samples
            check.at_least("evaluate.fid_samples (0 = off)", self.fid_samples, 2)


@dataclass
class OracleConfig:
    """Closed-form model used instead of a trained network (THEORY section 6)."""
    kind: Literal["none", "gaussian", "gmm"] = "none"
    means: list[list[float]] = field(default_factory=list)     # K x d
    covs: list[list[list[float]]] = field(default_factory=list)  # K x d x d (or empty -> identity*var)
    var: float = 1.0
    weights: list[float] = field(default_factory=list)

    def validate(self) -> None:
        check.positive("oracle.var", self.var)
        k = len(self.means)
        if self.covs and len(self.covs) != k:
            raise ValueError(f"oracle.covs has {len(self.covs)} matrices for {k} means")
        if self.weights and (len(self.weights) != k or any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError(f"oracle.weights must be {k} non-negative numbers with a positive sum, "
                             f"got {self.weights}")
        if k and len({len(m) for m in self.means}) != 1:
            raise ValueError("oracle.means must all have the same dimension")


@dataclass
class RunConfig:
    """A whole run: what the CLI, the jobs and the tests build and record next to outputs."""
    name: str = "run"
    seed: int = 0
    output: str = "runs"             # local path or fsspec URL
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    model_path: Optional[str] = None  # trained artifact for sampling

    def validate(self) -> None:
        check.run_name("name", self.name)
        check.seed("seed", self.seed)
        for section in (self.noise, self.data, self.model, self.oracle, self.train, self.sampler, self.store,
                        self.pool, self.generate, self.evaluate):
            section.validate()
        if self.noise.kind == "poisson":
            if self.model.kind != "mem2" or self.oracle.kind != "none":
                raise ValueError(f"noise.kind='poisson' needs model.kind='mem2' (an energy model: Robbins' "
                                 f"estimator uses the unnormalized p(y)) and no oracle; got model.kind="
                                 f"{self.model.kind!r}, oracle.kind={self.oracle.kind!r}")
            return  # no walk-jump sampler for Poisson: the sampler section is not used (validate_sampling)
        if self.model.kind != "universal" and self.sampler.walk == "reduced" and self.oracle.kind == "none":
            raise ValueError(f"sampler.walk='reduced' needs a universal model (model.kind='universal'); "
                             f"use sampler.walk='full' for model.kind={self.model.kind!r}")

    def validate_sampling(self) -> None:
        """``validate`` plus what only a walk-jump sampling run needs (THEORY section 4)."""
        if self.noise.kind == "poisson":
            raise ValueError("noise.kind='poisson': walk-jump sampling needs a Gaussian MNM; a Poisson model "
                             "only denoises (mmgm_ray.denoise), it cannot be sampled")
        self.validate()

    @property
    def run_dir(self) -> str:
        """``{output}/{name}``: where the run's config, checkpoints, artifact or sample store live."""
        return f"{str(self.output).rstrip('/')}/{self.name}"


@dataclass
class CompareConfig:
    """``mmgm compare``: one base run, trained and sampled once per parametrization at the same budget."""
    name: str = "compare"                # the table goes to {output}/{name}/; variants run as {name}-{variant}
    output: str = "runs"
    base: str = "digits"                 # shipped config name or YAML path every variant starts from
    set: list[str] = field(default_factory=list)   # overrides for every variant (the shared budget)
    variants: dict[str, list[str]] = field(default_factory=dict)  # variant name -> its own overrides
    denoise_examples: int = 500          # held-out examples for the denoising MSE

    def validate(self) -> None:
        check.run_name("name", self.name)
        if not self.variants:
            raise ValueError("variants: list at least one parametrization, e.g. {universal: [model.kind=universal]}")
        for v, sets in self.variants.items():
            check.run_name(f"variants.{v}", f"{self.name}-{v}")
            if not isinstance(sets, list) or not all(isinstance(x, str) for x in sets):
                raise ValueError(f"variants.{v} must be a list of key=value overrides, got {sets!r}")
        check.at_least("denoise_examples", self.denoise_examples, 1)

    def variant_config(self, variant: str) -> "RunConfig":
        """The resolved run config of one variant (base, then the shared set, then its own set)."""
        return load_config(self.base, [*self.set, *self.variants[variant], f"name={self.name}-{variant}",
                                       f"output={self.output}"])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type[T] = RunConfig) -> T:
    """Load a YAML config (or defaults when ``path`` is None), apply overrides, check and validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            # shipped configs by bare name, e.g. "digits"
            shipped = Path(__file__).parent / "configs" / f"{path}.yaml"
            if shipped.exists():
                p = shipped
            else:
                raise ValueError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config file {p} must hold a mapping at the top level")
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def dump_config(cfg: Any) -> str:
    """YAML text of a resolved config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
