"""A small classifier of a labelled data set: the class of every jump, for mode hopping.

A nearest-class-mean rule mislabels about one digit in ten (0.90 held-out accuracy on the 8x8
digits); a small CNN (images) or MLP (vectors) trained for a few seconds on CPU does far better
(0.97-0.98), so class transitions count the sampler's moves rather than the labeller's errors.

The trained classifier is an artifact: ``torch.save`` of a dict of tensors, numbers and strings
(loadable with ``torch.load(weights_only=True)``) holding the state dict, its architecture, the
data config it was trained on, the class frequencies and the held-out accuracy. It is cached per
(data set, training config) under ``{cache_dir}/classifier-{key}.pt`` with the sha256 of its bytes
next to it (``.sha256``); every load checks the hash.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from mmgm_ray.config import DataConfig, from_dict
from mmgm_ray.data import ImageDataset, load_dataset
from mmgm_ray.store import fsutil

__all__ = ["ClassifierConfig", "build_classifier", "train_classifier", "classifier_to_bytes",
           "classifier_from_bytes", "cached_classifier", "default_cache_dir"]

ARTIFACT_FORMAT = "mmgm.classifier"
ARTIFACT_VERSION = 1


@dataclass(frozen=True)
class ClassifierConfig:
    """How the classifier is trained (part of its cache key)."""
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    holdout: float = 0.2        # fraction of the data set held out for the reported accuracy
    width: int = 32
    seed: int = 0
    max_examples: int = 20000   # train on at most this many examples (large sets: a few epochs' worth)

    def __post_init__(self):
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"classifier holdout must be in (0, 1), got {self.holdout}")
        for name in ("epochs", "batch_size", "width", "max_examples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"classifier {name} must be >= 1, got {getattr(self, name)}")


def build_classifier(event_shape, num_classes: int, width: int) -> nn.Module:
    """A small CNN for (C, H, W) events (two stride-2 convolutions, 2x2 average pool), else an MLP."""
    shape = tuple(int(s) for s in event_shape)
    if len(shape) == 3:
        w = int(width)
        return nn.Sequential(
            nn.Conv2d(shape[0], w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * w, int(num_classes)))
    d = int(np.prod(shape))
    h = 4 * int(width)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                         nn.Linear(h, int(num_classes)))


def _split(n: int, cfg: ClassifierConfig) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_hold = max(1, int(round(n * cfg.holdout)))
    return perm[n_hold:][:cfg.max_examples], perm[:n_hold]


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 1024]).argmax(dim=1) for i in range(0, len(x), 1024)])
    return float((pred == y).double().mean())


def train_classifier(dataset: ImageDataset, cfg: ClassifierConfig = ClassifierConfig()) -> tuple[nn.Module, dict]:
    """Train on a seeded split of ``dataset`` (AdamW, cross-entropy, one-cycle schedule); return the
    model (eval mode) and ``{accuracy, holdout, train, num_classes, class_frequencies}`` (accuracy
    on the held-out part, never seen in training). Runs on one intra-op thread: a model this small
    gains nothing from more and loses much on a busy machine (measured on 2 shared cores: 3.6 s
    with one thread, 81 s with two)."""
    if dataset.labels is None:
        raise ValueError(f"data set {dataset.name!r} has no labels: no classifier (and no class transitions)")
    tr, ho = _split(len(dataset), cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _fit(dataset, tr, cfg)
    finally:
        torch.set_num_threads(threads)
    k = int(dataset.labels.max()) + 1
    freq = np.bincount(dataset.labels.numpy(), minlength=k) / len(dataset)
    return model, {"accuracy": _accuracy(model, dataset.x[ho], dataset.labels[ho]), "holdout": int(len(ho)),
                   "train": int(len(tr)), "num_classes": k, "class_frequencies": freq.tolist()}


def _fit(dataset: ImageDataset, tr: torch.Tensor, cfg: ClassifierConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = build_classifier(dataset.event_shape, int(dataset.labels.max()) + 1, cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, len(tr) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x, y = dataset.x, dataset.labels
    model.train()
    for _ in range(cfg.epochs):
        order = tr[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def classifier_to_bytes(model: nn.Module, event_shape, width: int, info: dict, data: dict,
                        cfg: ClassifierConfig) -> bytes:
    """The artifact's bytes: ``torch.save`` of tensors, numbers and strings only."""
    payload = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "event_shape": list(event_shape),
               "width": int(width), "num_classes": int(info["num_classes"]),
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
               "accuracy": float(info["accuracy"]), "holdout": int(info["holdout"]), "train": int(info["train"]),
               "class_frequencies": [float(f) for f in info["class_frequencies"]],
               "data": json.dumps(data, sort_keys=True), "config": json.dumps(asdict(cfg), sort_keys=True)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def classifier_from_bytes(data: bytes, what: str, device: torch.device = torch.device("cpu")) -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, metadata) from artifact bytes, loaded with weights_only=True."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not an artifact"
        raise ValueError(f"{what} is not a classifier artifact ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{what} is not a classifier artifact (format {payload.get('format')!r})"
                         if isinstance(payload, dict) else f"{what} is not a classifier artifact")
    model = build_classifier(payload["event_shape"], payload["num_classes"], payload["width"])
    model.load_state_dict(payload["state_dict"])
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.to(device).eval(), meta


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_cache_dir() -> str:
    """``$MMGM_CACHE`` or ``~/.cache/mmgm-ray``, plus ``/classifiers``."""
    root = os.environ.get("MMGM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmgm-ray")
    return os.path.join(root, "classifiers")


def cache_key(data: dict, cfg: ClassifierConfig) -> str:
    """Names a cached classifier: the data config and the training config, hashed."""
    text = json.dumps({"data": data, "config": asdict(cfg), "version": ARTIFACT_VERSION}, sort_keys=True)
    return sha256_bytes(text.encode())[:16]


def _read_cached(fs, path: str) -> Optional[bytes]:
    """The cached artifact's bytes, or None (absent, or corrupt: a notice, and it is retrained)."""
    if not (fsutil.exists(fs, path) and fsutil.exists(fs, path + ".sha256")):
        return None
    data = fs.cat_file(path)
    want = fs.cat_file(path + ".sha256").decode().strip()
    if sha256_bytes(data) == want:
        return data
    print(f"[mmgm] cached classifier {path} does not match its sha256 (corrupt): training it again",
          file=sys.stderr, flush=True)
    return None


def cached_classifier(data: dict, cfg: ClassifierConfig = ClassifierConfig(),
                      cache_dir: Optional[str] = None) -> tuple[bytes, dict]:
    """The classifier artifact of the data set ``data`` (a ``DataConfig`` dict): from the cache
    when there (hash checked), else trained on ``load_dataset(data)`` and cached. Returns the
    artifact's bytes and its metadata (accuracy, num_classes, class_frequencies, ...)."""
    fs, root = fsutil.resolve(cache_dir or default_cache_dir())
    path = f"{root}/classifier-{cache_key(data, cfg)}.pt"
    blob = _read_cached(fs, path)
    if blob is None:
        dataset = load_dataset(from_dict(DataConfig, data))
        model, info = train_classifier(dataset, cfg)
        blob = classifier_to_bytes(model, dataset.event_shape, cfg.width, info, data, cfg)
        fsutil.atomic_write_bytes(fs, path, blob)
        fsutil.atomic_write_bytes(fs, path + ".sha256", sha256_bytes(blob).encode())
    _, meta = classifier_from_bytes(blob, path)
    return blob, meta
