"""The training loop: one module, in the spirit of NVlabs/edm ``training/training_loop.py``.

It trains any learnable model of the math core through ``model.loss(x, generator)``
(universal denoiser, MDAE, MEM^2, MUVB; the Poisson energy model, which has no previews): AdamW
with linear warm-up, gradient clipping, an EMA copy of the weights updated every step, the step's
fast path (``train.fast``, ``mmgm_ray.train.fast``: autocast, compile, fused AdamW; recorded in
every checkpoint and reused on resume), periodic preview chains (a short walk-jump run with the
EMA model saved as a PNG grid), metrics as JSON lines, progress lines.

Where it runs is abstracted by a :class:`Session`:

- :class:`LocalSession`: one plain process (``mmgm train --local``, the demo, tests); checkpoints
  go to ``{run_dir}/checkpoint/state.pt``.
- ``mmgm_ray.train.ray_train.RaySession``: inside a Ray Train worker (rank and world size from
  ``ray.train.get_context()``, the network DDP-wrapped by ``ray.train.torch.prepare_model``,
  checkpoints through ``ray.train.report``).

Determinism: the initial weights come from ``torch.manual_seed(cfg.seed)``; the data order from
``make_loader`` (seed, epoch, rank); the noise of step t on rank r from a private generator
re-seeded with (seed, rank, t) at every step. So the run is a pure function of the config and the
world size, and a run resumed from a checkpoint at step s takes exactly the steps an uninterrupted
run would have taken (the data position is recomputed from s, not stored). Bitwise so on CPUs: on
GPUs the backward of some kernels (nearest upsampling, some cuDNN convolution algorithms) adds in
a nondeterministic order, so a resumed curve matches to round-off only (docs/GPU.md). The TF32 and
cuDNN flags are set from ``train.allow_tf32`` / ``cudnn_deterministic`` / ``cudnn_benchmark``, and
the hardware (``mmgm_ray.hardware.describe``) is recorded in every checkpoint and the artifact; a
checkpoint from another device class is refused unless ``allow_device_change``.
"""
from __future__ import annotations

import copy
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import fsspec
import numpy as np
import torch

from mmgm_ray import fastpath, faults
from mmgm_ray.config import RunConfig, SamplerConfig, dump_config, from_dict, to_dict
from mmgm_ray.data import ImageDataset, channel_stats, load_dataset, make_loader
from mmgm_ray.engine import WalkJumpEngine
from mmgm_ray.factory import ARTIFACT_NAME, build_score_model, save_artifact
from mmgm_ray.hardware import Precision, apply_precision, check_device_class, describe
from mmgm_ray.images import save_grid
from mmgm_ray.store.fsutil import atomic_write
from mmgm_ray.train import fast
from mmgm_ray.train.validate import validate_run
from mmgm_ray.torchio import load_weights_only

CKPT_FORMAT = "mmgm-train-state"
CKPT_VERSION = 1
CKPT_FILE = "state.pt"


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def write_config(cfg: RunConfig, run_dir: str) -> str:
    """Write the resolved config as ``{run_dir}/config.yaml`` (local path or URL); returns its path."""
    fs, p = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(p, exist_ok=True)
    with fs.open(f"{p}/config.yaml", "w") as f:
        f.write(dump_config(cfg))
    return f"{run_dir}/config.yaml"


def noise_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the noise generator at (seed, rank, step): SeedSequence mixing avoids related streams.

    The whole seed is mixed (a seed above 2^32 becomes two entropy words), so no two seeds alias.
    """
    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1)[0])


def resolve_device(cfg: RunConfig) -> torch.device:
    """The in-process device: ``train.device``, where "auto" means CUDA when available."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up over ``warmup_steps`` steps, then constant (the MMGM / EDM recipes)."""
    w = cfg.train.warmup_steps
    return cfg.train.lr * (min(1.0, (step + 1) / w) if w > 0 else 1.0)


def ema_decay_at(step: int, cfg: RunConfig) -> float:
    """EMA decay; with ``ema_warmup`` min(decay, (1+t)/(10+t)) so early weights are forgotten fast."""
    d = cfg.train.ema_decay
    return min(d, (1.0 + step) / (10.0 + step)) if cfg.train.ema_warmup else d


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the compiled module's ``_orig_mod.`` and the DDP wrapper's ``module.`` levels
    (``net._orig_mod.module.x`` -> ``net.x``), on the CPU."""
    return {k.replace("_orig_mod.", "").replace("net.module.", "net.", 1): v.detach().cpu().clone()
            for k, v in model.state_dict().items()}


def batch_stream(ds: ImageDataset, cfg: RunConfig, rank: int, world_size: int, start_step: int,
                 device: torch.device) -> Iterator[torch.Tensor]:
    """Endless full batches of this rank's shard, positioned as if ``start_step`` batches were taken.

    Epoch e uses ``make_loader``'s permutation (and flips) of (seed, e, rank); a resumed run drops
    the batches already seen in its epoch, so the data order equals an uninterrupted run's.
    """
    loader = make_loader(ds, cfg.train.batch_size, rank, world_size, seed=cfg.seed, epoch=0,
                         hflip=cfg.data.hflip, device=device)
    epoch, skip = divmod(start_step, len(loader))
    while True:
        loader.set_epoch(epoch)
        # the skipped batches are still drawn (cheap slicing) so the flip stream stays aligned
        for xb, _ in itertools.islice(loader, skip, None):
            yield xb
        skip = 0
        epoch += 1


class MetricsWriter:
    """Appends metric dicts as JSON lines to ``{run_dir}/metrics.jsonl`` (rank 0 only).

    On resume from step s, lines with step > s (written after the checkpoint by an attempt that
    then failed) are dropped first, so the file reads as one continuous curve.
    """

    def __init__(self, run_dir: str, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.fs, root = fsspec.core.url_to_fs(run_dir)
        self.path = f"{root}/metrics.jsonl"
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.lines: list[str] = []
        if not enabled:
            return
        self.fs.makedirs(root, exist_ok=True)
        if self.fs.exists(self.path):
            with self.fs.open(self.path, "r") as f:
                old = [ln for ln in f.read().splitlines() if ln.strip()]
            self.lines = [ln for ln in old if _line_step(ln) <= resume_step]
        with self.fs.open(self.path, "w") as f:  # rewrite once: the truncated history
            f.write("".join(ln + "\n" for ln in self.lines))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, sort_keys=False)
        self.lines.append(line)
        if self.local:
            with self.fs.open(self.path, "a") as f:
                f.write(line + "\n")
        else:  # object stores cannot append: rewrite the (small) file
            with self.fs.open(self.path, "w") as f:
                f.write("".join(ln + "\n" for ln in self.lines))


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def read_metrics(run_dir: str) -> list[dict]:
    """All records of ``{run_dir}/metrics.jsonl`` (empty list if there is none)."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    p = f"{root}/metrics.jsonl"
    if not fs.exists(p):
        return []
    with fs.open(p, "r") as f:
        return [json.loads(ln) for ln in f.read().splitlines() if ln.strip()]


# --------------------------------------------------------------------------------------------
# Sessions: where the loop runs
# --------------------------------------------------------------------------------------------

class Session:
    """What the loop needs from its environment. The base class is a single local process."""

    rank: int = 0
    world_size: int = 1

    def device(self, cfg: RunConfig) -> torch.device:
        """Device for this rank."""
        return resolve_device(cfg)

    def prepare_net(self, net: torch.nn.Module) -> torch.nn.Module:
        """Wrap the network for data-parallel training (identity for one process)."""
        return net

    def restore(self) -> Optional[dict]:
        """The latest checkpoint payload, or None for a fresh start."""
        return None

    def report(self, metrics: dict, payload: Optional[dict]) -> None:
        """Called by every rank at every checkpoint step (same number of calls on every rank);
        ``payload`` (the state to save) is given on rank 0 only."""

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of ``value`` over ranks (identity for one process)."""
        return value


class LocalSession(Session):
    """One in-process run; checkpoints in ``{run_dir}/checkpoint/state.pt``; resume if asked."""

    def __init__(self, run_dir: str, resume: bool = True):
        self.run_dir, self.resume = run_dir, resume
        self.fs, root = fsspec.core.url_to_fs(run_dir)
        self.path = f"{root}/checkpoint/{CKPT_FILE}"

    def restore(self) -> Optional[dict]:
        if not self.resume or not self.fs.exists(self.path):
            return None
        with self.fs.open(self.path, "rb") as f:
            return load_payload(f)

    def report(self, metrics: dict, payload: Optional[dict]) -> None:
        if payload is None:
            return
        atomic_write(self.fs, self.path, lambda f: torch.save(payload, f))  # never half a checkpoint


def load_payload(f) -> dict:
    """Read a checkpoint payload from an open binary file, safely (``weights_only=True``), and check its format."""
    payload = load_weights_only(f.read(), f"training checkpoint {getattr(f, 'path', '')}".rstrip())
    if not isinstance(payload, dict) or payload.get("format") != CKPT_FORMAT:
        raise ValueError("not an mmgm training checkpoint")
    if payload.get("version") != CKPT_VERSION:
        raise ValueError(f"training checkpoint version {payload.get('version')} is not supported")
    return payload


# --------------------------------------------------------------------------------------------
# Previews
# --------------------------------------------------------------------------------------------

def preview_samples(model, cfg: RunConfig, event_shape: tuple, n_chains: int, n_steps: int,
                    device: torch.device, data: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Final jump of each of ``n_chains`` walk-jump chains after ``n_steps`` walk steps (or None).

    Uses the run's sampler config with one block of ``n_chains`` chains, seeded by the run seed,
    and its fast path (``sampler.fast``; ``mmgm_ray.fastpath``: bf16 where native, compiled only
    when the walk is long enough to pay the compilation back).
    """
    if n_chains < 1 or n_steps < 1:
        return None
    scfg = from_dict(SamplerConfig, {**to_dict(cfg.sampler), "block_size": n_chains})
    steps = max(n_steps, scfg.jump_every)
    steps -= steps % scfg.jump_every  # end on a jump step
    was_training = model.training
    model.eval()
    try:
        shape = fastpath.chain_shape(model, scfg.walk, event_shape)
        fast = fastpath.resolve_options(scfg, model, device, shape, n_chains, n_chains * steps)
        eng = WalkJumpEngine(model, scfg, event_shape, cfg.seed, [0], device, fast=fast)
        eng.initialize(data if scfg.init == "data" else None)
        jb = eng.run_collect(steps)
    finally:
        model.train(was_training)
    if jb is None or len(jb) == 0:
        return None
    last = jb.jump_index == jb.jump_index.max()
    order = torch.argsort(jb.chain_id[last])
    return jb.xhat[last][order].cpu()


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

@dataclass
class LoopResult:
    """What ``training_loop`` returns (rank 0's view)."""
    step: int                          # last step reached (== cfg.train.steps on success)
    start_step: int                    # step the run started from (> 0 after a resume)
    model: torch.nn.Module             # the trained model (unwrapped network)
    ema: torch.nn.Module               # the EMA copy (what sampling uses)
    event_shape: tuple
    history: list = field(default_factory=list)   # metric records written during this run
    steady_images_per_s: float = float("nan")     # throughput after warm-up, all ranks together
    artifact: Optional[str] = None     # path of model.pt (rank 0, at the end)
    model_hash: Optional[str] = None
    preview: Optional[str] = None      # path of the last preview PNG


def training_loop(
    cfg: RunConfig,                    # the resolved run config (validated)
    run_dir: str,                      # where metrics.jsonl, previews/ and model.pt go (path or URL)
    session: Optional[Session] = None,  # environment (LocalSession / RaySession); default: local, no resume
    dataset: Optional[ImageDataset] = None,  # preloaded data (else load_dataset(cfg.data))
    progress: bool = True,             # print a progress line every log_every steps (rank 0)
    write_artifact: bool = True,       # save {run_dir}/model.pt (EMA weights) at the end (rank 0)
    timing_warmup: Optional[int] = None,  # steps excluded from steady_images_per_s (default min(20, steps/5))
    allow_device_change: bool = False,  # resume a checkpoint written on another device class (hardware.py)
) -> LoopResult:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.train.steps`` steps (from a checkpoint if any)."""
    session = session or Session()
    tc = cfg.train
    rank, world = session.rank, session.world_size
    device = session.device(cfg)
    is_main = rank == 0
    apply_precision(Precision(tc.allow_tf32, tc.cudnn_deterministic, tc.cudnn_benchmark))
    hardware = describe(device)

    # ---- data: the whole (small) set in memory on every rank; batches sharded by rank ----
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    event_shape = tuple(ds.event_shape)

    # ---- model, EMA, optimizer (restored from the latest checkpoint when there is one) ----
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run
    model = build_score_model(cfg, event_shape).to(device)
    payload = session.restore()
    start = 0
    if payload is not None:
        _check_compatible(payload["config"], cfg)
        note = check_device_class(payload.get("hardware"), hardware, f"training run {cfg.name!r}",
                                  allow_device_change)
        if note and is_main:
            print(f"[mmgm train] {note}", file=sys.stderr, flush=True)
        model.load_state_dict(payload["model"])
        start = int(payload["step"])
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if payload is not None:
        ema.load_state_dict(payload["ema"])
    model.train()
    model.net = session.prepare_net(model.net)  # DDP wrapper under Ray Train with > 1 worker
    params = [p for p in model.parameters() if p.requires_grad]
    options = _fast_options(payload, cfg, model, device, is_main)
    opt = fast.make_optimizer(params, tc, lr_at(start, cfg), options)
    if payload is not None:
        opt.load_state_dict(payload["optimizer"])
    del payload

    gen = torch.Generator(device=device)
    eval_x = ds.x[: tc.ema_eval_batch].to(device) if tc.ema_eval_batch > 0 else None
    metrics_out = MetricsWriter(run_dir, start, enabled=is_main)
    batches = batch_stream(ds, cfg, rank, world, start, device)
    if options.compile:   # compiled on the first batch (the one shape it ever sees), then trained on it
        first = next(batches)
        options = fast.compile_net(model, options, first, device)
        batches = itertools.chain([first], batches)
    ema_params = list(ema.parameters())
    if is_main and progress:
        print(f"[mmgm train] {cfg.name}: steps {start}->{tc.steps}, world size {world}, device {device}, "
              f"batch {tc.batch_size}/rank", flush=True)

    history: list[dict] = []
    preview_path = None
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync every step
    n_loss = 0
    gnorm = torch.zeros((), device=device)
    warm = timing_warmup if timing_warmup is not None else min(20, max(1, (tc.steps - start) // 5))
    t_window = time.perf_counter()
    t_steady = None            # wall clock when the steady-state window starts
    excluded = 0.0             # seconds spent in previews inside the steady window (not training)
    step = start
    last_record: dict = {}
    while step < tc.steps:
        # ---- one optimization step ----
        x = next(batches)
        gen.manual_seed(noise_seed(cfg.seed, rank, step))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss, gnorm = fast.train_step(model, opt, params, ema_params, x, gen, tc.grad_clip,
                                      1.0 - ema_decay_at(step, cfg), options, device)
        loss_sum += loss.float()
        n_loss += 1
        step += 1
        if step == start + warm:
            t_steady = time.perf_counter()
            excluded = 0.0
        faults.after_train_step(step, rank)  # no-op unless a test planned a crash here

        # ---- metrics every log_every steps (and at checkpoints / the end) ----
        ckpt_now = step % tc.checkpoint_every == 0 or step == tc.steps
        if step % tc.log_every == 0 or ckpt_now:
            mean_loss = float(session.all_reduce_mean(loss_sum / max(1, n_loss)))
            now = time.perf_counter()
            record = {"step": step, "loss": mean_loss, "lr": lr_at(step - 1, cfg), "grad_norm": float(gnorm),
                      "images_per_s": n_loss * tc.batch_size * world / max(now - t_window, 1e-9),
                      "start_step": start, "time": time.time()}
            if ckpt_now and eval_x is not None and is_main:
                record["ema_loss"] = _ema_loss(ema, eval_x, cfg, device, options)
            loss_sum.zero_()
            n_loss = 0
            if is_main:
                metrics_out.write(record)
                history.append(record)
                if progress:
                    extra = f" ema_loss {record['ema_loss']:.5f}" if "ema_loss" in record else ""
                    print(f"[mmgm train] step {step}/{tc.steps} loss {mean_loss:.5f}{extra} "
                          f"lr {record['lr']:.2e} |g| {record['grad_norm']:.3f} "
                          f"{record['images_per_s']:.0f} img/s", flush=True)
            last_record = record
            t_window = time.perf_counter()

        # ---- preview chains with the EMA model (rank 0) ----
        if is_main and len(event_shape) == 3 and getattr(ema, "samplable", True) and (
                (tc.preview.every and step % tc.preview.every == 0) or step == tc.steps):
            t0 = time.perf_counter()
            preview_path = _write_preview(ema, cfg, event_shape, ds, device, run_dir, step)
            excluded += time.perf_counter() - t0
            t_window += time.perf_counter() - t0

        # ---- checkpoint: every rank reports (a barrier), rank 0 attaches the state ----
        if ckpt_now:
            payload = None
            if is_main:
                payload = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step,
                           "model": plain_state_dict(model), "ema": plain_state_dict(ema),
                           "optimizer": opt.state_dict(), "config": to_dict(cfg),
                           "metrics": dict(last_record), "hardware": hardware,
                           "fast_path": options.as_dict()}
            session.report(dict(last_record), payload)

    model.net = fast.uncompiled(model.net)   # the returned model holds the eager network
    steady = float("nan")
    if t_steady is not None and step > start + warm:
        steady = (step - start - warm) * tc.batch_size * world / max(time.perf_counter() - t_steady - excluded, 1e-9)

    result = LoopResult(step=step, start_step=start, model=model, ema=ema, event_shape=event_shape,
                        history=history, steady_images_per_s=steady, preview=preview_path)
    if is_main and write_artifact:
        mean, std = channel_stats(ds)
        result.artifact = f"{run_dir}/{ARTIFACT_NAME}"
        result.model_hash = save_artifact(result.artifact, ema, cfg, event_shape,
                                          {"mean": mean, "std": std, "n": len(ds), "source": ds.source},
                                          {"step": step, "world_size": world, "hardware": hardware,
                                           "fast_path": options.as_dict()})
        if progress:
            print(f"[mmgm train] wrote {result.artifact} (model hash {result.model_hash[:12]})", flush=True)
    return result


def _ema_loss(ema, eval_x: torch.Tensor, cfg: RunConfig, device: torch.device,
              options: fast.TrainFastOptions) -> float:
    """EMA loss on a fixed batch with fixed noise, under the training step's autocast: comparable
    across steps and runs."""
    g = torch.Generator(device=device).manual_seed(noise_seed(cfg.seed, 2**31 - 1, 0))
    with torch.no_grad(), fast.autocast(options, device):
        return float(ema.loss(eval_x, g))


def _fast_options(payload: Optional[dict], cfg: RunConfig, model, device: torch.device,
                  is_main: bool) -> fast.TrainFastOptions:
    """The training step's options: the checkpoint's when resuming (the options decide the
    round-off, so a resumed run continues with the set it started with), else resolved from
    ``train.fast`` (``mmgm_ray.train.fast.resolve_train_options``: never timed)."""
    if payload is None:
        return fast.resolve_train_options(cfg.train, model, device)
    if "fast_path" not in payload:   # written before the options were recorded
        return fast.legacy_options(cfg.train, device)
    recorded = fast.TrainFastOptions.from_dict(payload["fast_path"])
    if is_main and recorded != fast.resolve_train_options(cfg.train, model, device):
        print(f"[mmgm train] resuming with the checkpoint's fast-path options {recorded.as_dict()} "
              f"(train.fast / autocast / compile apply to fresh runs)", file=sys.stderr, flush=True)
    return recorded


def _write_preview(ema, cfg: RunConfig, event_shape: tuple, ds: ImageDataset, device, run_dir: str,
                   step: int) -> Optional[str]:
    pv = cfg.train.preview
    x = preview_samples(ema, cfg, event_shape, pv.chains, pv.steps, device, ds.x)
    if x is None:
        return None
    path = f"{run_dir}/previews/step_{step:07d}.png"
    save_grid(x, path, nrow=pv.nrow, scale=pv.scale)
    return path


def _check_compatible(saved: dict, cfg: RunConfig) -> None:
    """A checkpoint can only continue a run with the same noise model and network."""
    now = to_dict(cfg)
    for key in ("noise", "model"):
        if saved.get(key) != now[key]:
            raise ValueError(f"the checkpoint in this run folder was trained with a different '{key}' "
                             f"config ({saved.get(key)} vs {now[key]}); use a new run name or output")


def train_local(cfg: RunConfig, resume: bool = True, progress: bool = True,
                dataset: Optional[ImageDataset] = None, run_dir: Optional[str] = None,
                allow_device_change: bool = False) -> LoopResult:
    """Train in this process (no Ray): writes config.yaml, metrics.jsonl, previews/ and model.pt
    under ``run_dir`` (default ``cfg.run_dir``); resumes from its checkpoint when ``resume`` (one
    written on another device class only with ``allow_device_change``: ``hardware.DeviceChangeError``)."""
    plan = validate_run(cfg, dataset=dataset, world_size=1)
    run_dir = run_dir or cfg.run_dir
    write_config(cfg, run_dir)
    return training_loop(cfg, run_dir, LocalSession(run_dir, resume=resume), dataset=plan.dataset,
                         progress=progress, allow_device_change=allow_device_change)
