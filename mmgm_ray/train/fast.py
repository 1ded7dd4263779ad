"""The training step at its best: autocast, ``torch.compile`` and a fused AdamW (``train.fast``).

One step is the loss's forward, its backward, gradient clipping, AdamW and the EMA update
(``train_step``). The options, named like the sampler's (``mmgm_ray.fastpath``):

- ``autocast``: the loss under ``torch.autocast`` in bfloat16. Parameters, gradients, the AdamW
  state and the EMA stay float32; only the network's round-off changes (unit round-off 2^-8).
  float16 is not offered: it needs loss scaling, which bf16's float32 exponent range does not.
- ``compile``: ``torch.compile`` of the network (forward and its backward, static shapes: every
  training batch has one shape), compiled and warmed up on one loss + backward of the first batch
  before step one; a failure warns once and the run goes on eager (the options then say
  ``compile=False``).
- ``fused_adamw``: AdamW as one kernel over all parameters (CUDA and CPU) instead of a few
  kernels per parameter tensor; the state dict is the same, so checkpoints move between the two.

Reproducibility: the options decide the round-off, so ``train.fast="auto"`` (the default) resolves
them from the config, the model and the device type only, never from a timing (``resolve_train_options``),
and the run records the set in every checkpoint (``fast_path``) and in the artifact; a resume reuses
the recorded set, so a resumed run is still bitwise an uninterrupted one on a CPU. ``auto`` on a
CPU is float32 eager with the fused AdamW; on CUDA bf16 (``train.bf16``) with the fused AdamW.
Measured on the project's 2-core AVX512-BF16 CPU (digits U-Net, batch 64, one thread,
``bench/train_fast.py``, README "Performance"): see ``resolve_train_options`` for the figures.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mmgm_ray.config import TrainConfig
from mmgm_ray.fastpath import native_low_precision
from mmgm_ray.models import EnergyScoreModel

TRAIN_AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TrainFastOptions:
    """A resolved option set for the training step (see the module docstring)."""
    autocast: str = "float32"        # "float32" (no autocast) | "bfloat16"
    compile: bool = False
    fused_adamw: bool = False

    def __post_init__(self):
        if self.autocast not in TRAIN_AUTOCAST:
            raise ValueError(f"training autocast must be one of {sorted(TRAIN_AUTOCAST)}, got {self.autocast!r}")

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype (None: float32, no autocast)."""
        return TRAIN_AUTOCAST[self.autocast]

    def as_dict(self) -> dict:
        """Plain JSON-able dict (what checkpoints and artifacts record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainFastOptions":
        """Inverse of :meth:`as_dict`; ValueError names unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names:
            raise ValueError(f"training fast-path options must be a mapping with keys from {sorted(names)}, got {d!r}")
        return cls(**d)


REFERENCE = TrainFastOptions()   # float32 eager, for-loop AdamW: train.fast="off"


def legacy_options(tc: TrainConfig, device: torch.device | str) -> TrainFastOptions:
    """What a checkpoint written before ``fast_path`` was recorded ran: bf16 (``train.bf16``) and
    the fused AdamW on CUDA, float32 and the for-loop AdamW on a CPU."""
    cuda = torch.device(device).type == "cuda"
    return TrainFastOptions("bfloat16" if cuda and tc.bf16 else "float32", False, cuda)


def resolve_train_options(tc: TrainConfig, model: nn.Module, device: torch.device | str) -> TrainFastOptions:
    """The option set for ``train.fast`` / ``train.autocast`` / ``train.compile`` on ``device``.

    - ``fast="off"``: float32 eager, the for-loop AdamW (the reference round-off).
    - ``fast="auto"`` (the default), a pure function of the config, the model and the device type:
      fused AdamW everywhere; bf16 on CUDA when ``train.bf16`` and the GPU has it, float32 on a
      CPU; never compiled. On the project's CPU (digits U-Net, batch 64, one thread) the fused AdamW
      took 0.5 ms per step against 3.8 ms for the for-loop one (~10% of a 35 ms step), and the final
      EMA loss of a digits run stayed within float32's seed-to-seed spread. bf16 eager ran at
      0.85-1.1x float32 (no AMX: the casts cost what the arithmetic saves); compiling gave about
      1.15x after 60 s of Inductor on a cold cache, which a 2,000-step digits run (~70 s) does not
      pay back. On CUDA, compiling a training step was not measured yet: ``fast="on"`` asks for it.
    - ``fast="on"``: fused AdamW, bf16 where the device computes it natively
      (``fastpath.native_low_precision``), compiled unless the model is an energy model (its loss
      differentiates a gradient: double backward, which ``torch.compile`` does not support).
    The explicit ``train.autocast`` / ``train.compile`` fields override ``auto`` and ``on``.
    """
    device = torch.device(device)
    if tc.fast == "off":
        return REFERENCE
    cuda = device.type == "cuda"
    if tc.fast == "auto":
        autocast = "bfloat16" if cuda and tc.bf16 and native_low_precision(device) == "bfloat16" else "float32"
        compile_ = False
    else:
        autocast = native_low_precision(device)
        compile_ = not isinstance(model, EnergyScoreModel)
    if tc.autocast != "auto":
        autocast = tc.autocast
    if tc.compile != "auto":
        compile_ = tc.compile == "on"
    return TrainFastOptions(autocast, compile_, True)


def autocast(options: TrainFastOptions, device: torch.device):
    """The autocast context of ``options`` on ``device`` (disabled for float32)."""
    dtype = options.dtype
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def make_optimizer(params: list, tc: TrainConfig, lr: float, options: TrainFastOptions) -> torch.optim.AdamW:
    """AdamW over ``params``, fused (one kernel for the whole update) when the options say so."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay,
                             fused=options.fused_adamw)


def compile_net(model: nn.Module, options: TrainFastOptions, x: torch.Tensor,
                device: torch.device) -> TrainFastOptions:
    """With ``options.compile``: replace ``model.net`` by its compiled module, warmed up (compiled)
    on one loss + backward of the batch ``x`` under the options' autocast; returns the options in effect.

    The warm-up draws its noise from a private generator and restores the global RNG (dropout),
    and the gradients it leaves are cleared, so the run's trajectory does not see it. A failure
    warns once and leaves the eager network: the returned options then say ``compile=False``.
    The compiled module holds the same parameters (its state dict keys gain ``_orig_mod.``,
    which ``loop.plain_state_dict`` removes).
    """
    if not options.compile:
        return options
    eager = model.net
    try:
        model.net = torch.compile(eager, dynamic=False)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast(options, device):
            loss = model.loss(x, torch.Generator(device=device).manual_seed(0))
        loss.backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure: train eager, say so once
        model.net = eager
        warnings.warn(f"torch.compile of the training step failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); training eager", RuntimeWarning, stacklevel=2)
        options = dataclasses.replace(options, compile=False)
    for p in model.parameters():
        p.grad = None
    return options


def uncompiled(net: nn.Module) -> nn.Module:
    """The eager module under a compiled one (``net`` itself when not compiled)."""
    return getattr(net, "_orig_mod", net)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, params: list, ema_params: list,
               x: torch.Tensor, gen: torch.Generator, grad_clip: float, ema_weight: float,
               options: TrainFastOptions, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimization step: loss (under the options' autocast), backward, clip, AdamW, EMA
    ``ema += ema_weight * (param - ema)``. Returns (loss, gradient norm) as device tensors (no sync)."""
    with autocast(options, device):
        loss = model.loss(x, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    opt.step()
    with torch.no_grad():  # EMA of every parameter, every step
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], ema_weight)
    return loss.detach(), gnorm
