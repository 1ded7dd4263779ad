"""Build score models from a ``RunConfig`` and save / load the trained model artifact.

The artifact is what training hands to sampling: one ``torch.save`` file holding the EMA weights,
the resolved run config (plain data), the event shape and data statistics. It is loaded with
``torch.load(weights_only=True)``, so a malicious file cannot run code. Its *model hash* is a
SHA-256 over the model section of the config and every weight tensor (name, dtype, shape, bytes),
independent of the file container, and is recorded next to every output that uses the model.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Optional

import fsspec
import torch

from mmgm_ray.config import RunConfig, from_dict, to_dict
from mmgm_ray.data.synthetic import gmm_parameters
from mmgm_ray.models import MDAE, MEM2, MUVB, PoissonMEM2, ScoreModel, UniversalDenoiser
from mmgm_ray.nets import build_net
from mmgm_ray.nets.vae import VAE
from mmgm_ray.noise import GaussianMNM, PoissonMNM
from mmgm_ray.oracles import GaussianOracle, GMMOracle
from mmgm_ray.store.fsutil import atomic_write  # the store's temp + rename / single-PUT write
from mmgm_ray.torchio import load_weights_only

ARTIFACT_NAME = "model.pt"  # {output}/{name}/model.pt: training writes it, sampling jobs and manifests name it
ARTIFACT_FORMAT = "mmgm-model"
ARTIFACT_VERSION = 1


def build_noise(cfg: RunConfig) -> GaussianMNM | PoissonMNM:
    """The MNM of a run: Gaussian (noise.sigma, noise.M) or Poisson (noise.M)."""
    if cfg.noise.kind == "poisson":
        return PoissonMNM(cfg.noise.M)
    if cfg.noise.kind != "gaussian":
        raise ValueError(f"noise.kind must be 'gaussian' or 'poisson', got {cfg.noise.kind!r}")
    return GaussianMNM(cfg.noise.sigma, cfg.noise.M)


def attention_kernels(kind: str) -> str:
    """The attention kernels (``nets.ATTENTION_KERNELS``) of a model kind: MEM^2 trains through a
    double backward, which only the math kernel has; the others take the fused kernels."""
    return "math" if kind == "mem2" else "fused"


def build_score_model(cfg: RunConfig, event_shape: tuple[int, ...]) -> ScoreModel | PoissonMEM2:
    """A learnable model wrapping the configured network: universal / MDAE / MEM^2 / MUVB on a
    Gaussian MNM, or the Poisson energy model (``PoissonMEM2``) for noise.kind='poisson'."""
    noise = build_noise(cfg)
    m = cfg.model
    if isinstance(noise, PoissonMNM):
        if m.kind != "mem2":
            raise ValueError(f"noise.kind='poisson' needs model.kind='mem2' (an energy model), got {m.kind!r}")
        net = build_net(m.net, event_shape, in_mult=noise.M, attention=attention_kernels(m.kind))
        return PoissonMEM2(net, noise, event_shape)
    if m.kind == "universal":
        net = build_net(m.net, event_shape, in_mult=1, attention=attention_kernels(m.kind))
        return UniversalDenoiser(net, noise, event_shape, precond=m.precond, sigma_data=m.sigma_data)
    if m.kind == "muvb":
        return MUVB(_build_vae(m, event_shape, noise.M), noise, event_shape, input_scaling=m.input_scaling,
                    elbo_samples=m.elbo_samples, sigmoid_output=m.sigmoid_output)
    net = build_net(m.net, event_shape, in_mult=noise.M, attention=attention_kernels(m.kind))
    if m.kind == "mdae":
        return MDAE(net, noise, event_shape, input_scaling=m.input_scaling, sigmoid_output=m.sigmoid_output)
    if m.kind == "mem2":
        return MEM2(net, noise, event_shape, input_scaling=m.input_scaling)
    raise ValueError(f"model.kind must be universal, mdae, mem2 or muvb, got {m.kind!r}")


def _build_vae(m, event_shape: tuple[int, ...], M: int):
    """MUVB's VAE: MLPs of width net.hidden and depth net.depth on flattened events."""
    if m.net.arch == "unet":
        raise ValueError("model.kind='muvb' uses an MLP VAE; set model.net.arch to 'mlp' or 'auto'")
    m.net.validate()
    return VAE(M * math.prod(event_shape), event_shape, m.latent_dim, m.net.hidden, m.net.depth)


def build_oracle(cfg: RunConfig, event_shape: Optional[tuple[int, ...]] = None) -> GMMOracle:
    """The closed-form oracle of ``cfg.oracle`` (THEORY section 6).

    ``oracle.kind='gmm'`` with no means given uses the synthetic mixture of ``cfg.data`` (data.name
    'gmm'), so a model trained on that data can be compared with its oracle.
    """
    o = cfg.oracle
    noise = build_noise(cfg)
    if o.kind == "none":
        raise ValueError("oracle.kind is 'none'")
    if o.means:
        means = torch.tensor(o.means, dtype=torch.float64)
        K, d = means.shape
        covs = (torch.tensor(o.covs, dtype=torch.float64) if o.covs
                else o.var * torch.eye(d, dtype=torch.float64).expand(K, d, d).clone())
        weights = torch.tensor(o.weights or [1.0 / K] * K, dtype=torch.float64)
    elif cfg.data.name == "gmm":
        p = gmm_parameters(cfg.data.gmm_components, cfg.data.gmm_dim, cfg.data.gmm_seed)
        means, covs, weights = p["means"].double(), p["covs"].double(), p["weights"].double()
        weights = weights / weights.sum()
    else:
        raise ValueError("oracle.means is empty and data.name is not 'gmm': nothing to build the oracle from")
    if o.kind == "gaussian":
        if means.shape[0] != 1:
            raise ValueError(f"oracle.kind='gaussian' needs exactly one mean, got {means.shape[0]}")
        return GaussianOracle(means[0], covs[0], noise, event_shape)
    return GMMOracle(weights, means, covs, noise, event_shape)


def _hash_update_json(h, obj: Any) -> None:
    h.update(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def model_hash(cfg_dict: dict, state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the noise and model config and every weight tensor (sorted by name)."""
    h = hashlib.sha256()
    _hash_update_json(h, {"noise": cfg_dict.get("noise"), "model": cfg_dict.get("model")})
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        _hash_update_json(h, [name, str(t.dtype), list(t.shape)])
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def oracle_hash(cfg: RunConfig) -> str:
    """Content hash of an oracle model: its config (the oracle has no weights)."""
    h = hashlib.sha256()
    d = to_dict(cfg)
    _hash_update_json(h, {"noise": d["noise"], "oracle": d["oracle"], "data": d["data"] if not cfg.oracle.means else None})
    return "oracle-" + h.hexdigest()


def save_artifact(path: str, model: ScoreModel, cfg: RunConfig, event_shape: tuple[int, ...],
                  data_stats: Optional[dict] = None, extra: Optional[dict] = None) -> str:
    """Write the sampling artifact (weights of ``model``, e.g. the EMA copy) to a path or URL.

    Returns the model hash. Written like the sample store's files (``store.fsutil.atomic_write``):
    a reader sees the previous artifact or the complete new one, never a partial file.
    """
    cfg_dict = to_dict(cfg)
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    digest = model_hash(cfg_dict, sd)
    payload = {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION,
        "config": cfg_dict, "event_shape": [int(s) for s in event_shape],
        "state_dict": sd, "model_hash": digest,
        "data_stats": {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in (data_stats or {}).items()},
        "extra": extra or {},
    }
    fs, p = fsspec.core.url_to_fs(path)
    atomic_write(fs, p, lambda fh: torch.save(payload, fh))
    return digest


def load_artifact(path: str, device: str | torch.device = "cpu") -> tuple[ScoreModel, RunConfig, dict]:
    """Load an artifact written by ``save_artifact``; returns (model in eval mode, config, info).

    Raises ValueError naming the file if it is missing, not an artifact, corrupt, or if its weights
    do not match its recorded hash.
    """
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise ValueError(f"model artifact not found: {path}")
    with fs.open(p, "rb") as f:
        payload = load_weights_only(f.read(), f"model artifact {path}")
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path} is not an mmgm model artifact")
    if payload.get("version") != ARTIFACT_VERSION:
        raise ValueError(f"{path}: artifact version {payload.get('version')} is not supported")
    cfg = from_dict(RunConfig, payload["config"])
    event_shape = tuple(payload["event_shape"])
    model = build_score_model(cfg, event_shape)
    sd = payload["state_dict"]
    digest = model_hash(payload["config"], sd)
    if digest != payload.get("model_hash"):
        raise ValueError(f"{path}: weights do not match the recorded model hash (corrupt file?)")
    model.load_state_dict(sd)
    model.eval().requires_grad_(False)
    info = {"model_hash": digest, "event_shape": event_shape, "data_stats": payload.get("data_stats", {}),
            "extra": payload.get("extra", {}), "path": path}
    return model.to(device), cfg, info


def load_sampling_model(cfg: RunConfig, device: str | torch.device = "cpu",
                        event_shape: Optional[tuple[int, ...]] = None) -> tuple[ScoreModel, tuple[int, ...], str]:
    """The model a sampling run uses: the oracle of ``cfg.oracle`` or the artifact at ``cfg.model_path``.

    Returns (model, event_shape, model_hash). The config must be a sampling one
    (``RunConfig.validate_sampling``: no Poisson MNM); an artifact must hold a model with a score and
    its own noise config (kind, sigma, M) must match the run's, or ValueError says which differs.
    """
    cfg.validate_sampling()
    if cfg.oracle.kind != "none":
        oracle = build_oracle(cfg, event_shape)
        return oracle.to(device), oracle.event_shape, oracle_hash(cfg)
    if not cfg.model_path:
        raise ValueError("sampling needs model_path (a trained artifact) or an oracle (oracle.kind)")
    model, mcfg, info = load_artifact(cfg.model_path, device)
    if not getattr(model, "samplable", True):
        raise ValueError(f"{cfg.model_path} is a {type(model).__name__} model: it denoises, it cannot be sampled")
    for key in ("kind", "sigma", "M"):
        if getattr(mcfg.noise, key) != getattr(cfg.noise, key):
            raise ValueError(f"noise.{key}={getattr(cfg.noise, key)} differs from the model's "
                             f"{getattr(mcfg.noise, key)} ({cfg.model_path})")
    return model, info["event_shape"], info["model_hash"]
