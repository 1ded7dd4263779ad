"""One typed configuration system (dataclasses + YAML) shared by the CLI, the jobs and the tests.

Every section is a dataclass with defaults; ``RunConfig`` nests them. ``from_dict`` checks key names
and value types recursively and raises ``ValueError`` naming the offending dotted key, so a bad
config fails before any worker starts. Each section's ``validate()`` checks value ranges.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

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
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError as e:  # try the next alternative
                errors.append(str(e))
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


def _from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
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


def _positive(name: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


SEED_LIMIT = 1 << 63  # run seeds key the RNG (mmgm_ray.rng) and are int64 in manifests and Parquet


def check_seed(name: str, seed: Any) -> int:
    """Return ``seed`` as an int, or raise ValueError naming ``name`` unless it is in [0, 2**63)."""
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if isinstance(seed, bool) or value is None or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {seed!r}")
    return value


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
        _positive("noise.sigma", self.sigma)
        if self.M < 1:
            raise ValueError(f"noise.M must be >= 1, got {self.M}")


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

    def validate(self) -> None:
        _positive("sampler.delta", self.delta, allow_none=True)
        _positive("sampler.gamma", self.gamma)
        _positive("sampler.u", self.u)
        _positive("sampler.divergence_threshold", self.divergence_threshold)
        if self.jump_every < 1:
            raise ValueError(f"sampler.jump_every must be >= 1, got {self.jump_every}")
        if self.block_size < 1:
            raise ValueError(f"sampler.block_size must be >= 1, got {self.block_size}")

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
        known = {"digits", "mnist", "fashion_mnist", "cifar10", "parquet", "gmm"}
        if self.name not in known:
            raise ValueError(f"data.name: unknown data set {self.name!r}; known: {sorted(known)}")
        if self.name in {"mnist", "cifar10", "parquet"} and not self.path:
            raise ValueError(f"data.path is required for data set {self.name!r}")
        if self.split not in {"train", "test"}:
            raise ValueError(f"data.split must be 'train' or 'test', got {self.split!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be >= 1 (or null), got {self.limit}")
        if self.gmm_components < 1 or self.gmm_dim < 1 or self.gmm_samples < 1:
            raise ValueError("data.gmm_components, gmm_dim and gmm_samples must be >= 1")


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
        if self.channels < 1 or self.hidden < 1 or self.depth < 1 or self.num_res_blocks < 0:
            raise ValueError("net: channels, hidden and depth must be >= 1, num_res_blocks >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"net.dropout must be in [0, 1), got {self.dropout}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"net.channel_mult must be a non-empty list of integers >= 1, got {self.channel_mult}")
        if any(r < 1 for r in self.attn_resolutions):
            raise ValueError(f"net.attn_resolutions must hold resolutions >= 1, got {self.attn_resolutions}")


@dataclass
class ModelConfig:
    """Which score model parametrization (THEORY sections 2-3, 6)."""
    kind: Literal["universal", "mdae", "mem2"] = "universal"
    net: NetConfig = field(default_factory=NetConfig)
    input_scaling: bool = True      # MMGM: scale network input by 1/sqrt(0.225^2 + sigma^2) (MDAE/MEM^2)
    sigmoid_output: bool = False    # MMGM: sigmoid output for data in [0, 1] (MDAE)
    precond: Literal["edm", "none"] = "edm"  # universal: g = c_skip ybar + c_out net(c_in ybar) at sigma_eff
    sigma_data: float = 0.5         # data scale used by the "edm" preconditioning

    def validate(self) -> None:
        self.net.validate()


@dataclass
class TrainConfig:
    """Training loop (mmgm_ray.train)."""
    steps: int = 2000
    batch_size: int = 128           # per worker
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = True               # autocast to bf16 on GPU (ignored on CPU)
    log_every: int = 50
    checkpoint_every: int = 500
    preview_every: int = 0          # 0 = only at the end
    preview_chains: int = 64
    preview_steps: int = 200
    num_workers: int = 1            # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    num_to_keep: int = 2
    # --- added by the training loop (mmgm_ray.train) ---
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    ema_warmup: bool = True         # EMA decay min(ema_decay, (1+t)/(10+t)): short runs get a useful EMA
    device: Literal["auto", "cpu", "cuda"] = "auto"  # in-process runs; Ray workers use their assigned device
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # DDP backend; auto = nccl with GPUs, gloo on CPU
    ema_eval_batch: int = 256       # fixed held-out batch for the occasional EMA loss (0 = off)
    preview_nrow: int = 8           # images per row in preview grids
    preview_scale: int = 1          # pixel enlargement of preview grids (8x8 digits: 4)

    def validate(self) -> None:
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        for name in ("log_every", "checkpoint_every", "preview_nrow", "preview_scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("preview_every", "preview_chains", "preview_steps", "ema_eval_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_failures < -1:
            raise ValueError(f"train.max_failures must be >= 0 (or -1 = retry forever), got {self.max_failures}")
        if self.num_to_keep < 1:
            raise ValueError(f"train.num_to_keep must be >= 1, got {self.num_to_keep}")
        _positive("train.lr", self.lr)
        _positive("train.steps", self.steps)
        _positive("train.batch_size", self.batch_size)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("train.weight_decay, warmup_steps and grad_clip must be >= 0")
        _positive("train.num_workers", self.num_workers)
        _positive("train.cpus_per_worker", self.cpus_per_worker)


@dataclass
class StoreConfig:
    """Parquet sample store (mmgm_ray.store)."""
    sample_dtype: Literal["uint8", "float16", "float32"] = "float32"
    rows_per_file: int = 65536      # roll a file after this many rows ...
    steps_per_file: int = 0         # ... or after this many walk steps (0 = off)
    compression: str = "zstd"       # Parquet codec: zstd | snappy | gzip | brotli | lz4 | none

    def validate(self) -> None:
        _positive("store.rows_per_file", self.rows_per_file)
        if self.steps_per_file < 0:
            raise ValueError("store.steps_per_file must be >= 0")
        codecs = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")
        if self.compression not in codecs:
            raise ValueError(f"store.compression must be one of {list(codecs)}, got {self.compression!r}")


@dataclass
class PoolConfig:
    """Ray chain pool (mmgm_ray.pool)."""
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
    # mmgm generate: samples wanted (0 = one per chain), walk steps discarded, keep every thin-th jump
    num_samples: int = 0
    burn_in: int = 0
    thin: int = 1

    def validate(self) -> None:
        for name in ("num_chains", "num_steps", "num_actors", "checkpoint_every", "queue_size", "thin"):
            _positive(f"pool.{name}", getattr(self, name))
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ValueError("pool.cpus_per_actor and pool.gpus_per_actor must be >= 0")
        if self.max_restarts < 0 or self.num_samples < 0 or self.burn_in < 0 or self.chunk_steps < 0:
            raise ValueError("pool.max_restarts, num_samples, burn_in and chunk_steps must be >= 0")
        if self.chunk_steps % self.checkpoint_every:
            # chunks end on checkpoints, so a stop or a retry never leaves an uncommitted tail
            raise ValueError(f"pool.chunk_steps={self.chunk_steps} must be a multiple of "
                             f"pool.checkpoint_every={self.checkpoint_every}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"pool.device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class EvalConfig:
    """What the main job (``mmgm run``) measures after sampling (mmgm_ray.pipeline)."""
    grid_samples: int = 64          # last jumps of the first chains shown in samples.png
    diagnose: bool = True           # R-hat / ESS / class transitions over the store
    fid_samples: int = 200          # 0 = skip FID; Inception runs ~7 images/s on 2 CPU cores
    fid_reference: int = 500        # training images for the reference statistics

    def validate(self) -> None:
        if self.grid_samples < 1 or self.fid_samples < 0 or self.fid_reference < 2:
            raise ValueError("evaluate: grid_samples >= 1, fid_samples >= 0, fid_reference >= 2")
        if 0 < self.fid_samples < 2:
            raise ValueError("evaluate.fid_samples must be 0 or >= 2 (a covariance needs two samples)")


@dataclass
class OracleConfig:
    """Closed-form model used instead of a trained network (THEORY section 6)."""
    kind: Literal["none", "gaussian", "gmm"] = "none"
    means: list[list[float]] = field(default_factory=list)     # K x d
    covs: list[list[list[float]]] = field(default_factory=list)  # K x d x d (or empty -> identity*var)
    var: float = 1.0
    weights: list[float] = field(default_factory=list)


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
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    model_path: Optional[str] = None  # trained artifact for sampling

    def validate(self) -> None:
        check_seed("seed", self.seed)
        for section in (self.noise, self.data, self.model, self.train, self.sampler, self.store, self.pool,
                        self.evaluate):
            section.validate()
        if self.model.kind != "universal" and self.sampler.walk == "reduced" and self.oracle.kind == "none":
            raise ValueError("sampler.walk='reduced' needs a universal model (model.kind='universal'); "
                             "use sampler.walk='full' for MDAE / MEM^2")


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
