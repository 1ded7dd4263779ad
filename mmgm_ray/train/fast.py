"""The training step at its best: autocast, ``torch.compile`` and a fused AdamW (``train.fast``).

One step is the loss's forward, its backward, gradient clipping, AdamW and the EMA update
(``train_step``). The options, named like the sampler's (``mmgm_ray.fastpath``):

- ``autocast``: the loss under ``torch.autocast`` in bfloat16. Parameters, gradients, the AdamW
  state and the EMA stay float32; only the network's round-off changes (unit round-off 2^-8).
  float16 is not offered: it needs loss scaling, which bf16's float32 exponent range does not.
- ``compile``: ``torch.compile`` of the network (forward and its backward, static shapes: every
  training batch has one shape), compiled on one loss + backward of the first batch before step
  one and checked against the eager gradient there; a failure or a wrong gradient warns once and
  the run goes on eager (the options then say ``compile=False``).
- ``fused_adamw``: AdamW as one kernel over all parameters (CUDA and CPU) instead of a few
  kernels per parameter tensor; the state dict is the same, so checkpoints move between the two.

Reproducibility: the options decide the round-off, so ``train.fast="auto"`` (the default) resolves
them from the config, the model and the device type, never from a timing (``resolve_train_options``),
and the run records the set in every checkpoint (``fast_path``) and in the artifact; a resume reuses
the recorded set, so a resumed run is still bitwise an uninterrupted one on a CPU. ``auto`` on a
CPU is float32 eager with the fused AdamW; on CUDA bf16 (``train.bf16``) with the fused AdamW
(the figures behind that: ``resolve_train_options``; ``bench/train_fast.py`` measures them).
"""
from __future__ import annotations

import contextlib
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
# how far a compiled step's gradient may be from the eager step's (relative, in norm) on one batch:
# the same arithmetic fused otherwise stays within round-off (measured on the moved parameters of
# ``compile_net``: float32 9e-7 on the digits U-Net, 3e-7 on the GMM MLP; bf16 0 on the MLP, and
# eager bf16 is itself only 0.4% off eager float32 on the U-Net), while torch 2.13's CPU Inductor
# under bf16 was 12% off on the U-Net
COMPILE_GRAD_RTOL = 0.05


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
    - ``fast="auto"`` (the default), a pure function of the config and the device type: fused
      AdamW everywhere; bf16 on CUDA when ``train.bf16`` and the GPU has it, float32 on a CPU;
      never compiled. Measured on the project's CPU (digits U-Net, batch 64, one thread, README
      "Performance"): the fused AdamW takes 0.5 ms a step against 3.8 ms for the for-loop one
      (10% of a 35 ms step) and its 1,000-step runs ended at the for-loop runs' EMA loss to 1e-8;
      bf16 eager ran at 0.86-1.07x float32 (AVX512-BF16 without AMX: the casts cost what the
      arithmetic saves); compiled float32 at 1.15-1.18x after 60 s of Inductor on a cold cache,
      which a 2,000-step digits run (~70 s) does not pay back.
    - ``fast="on"``: ``auto``'s set, compiled unless the model is an energy model (its loss
      differentiates a gradient: double backward, which ``torch.compile`` does not support).
      Not bf16 on a CPU: bf16 with Inductor gave wrong gradients there (``compile_net``).
    The explicit ``train.autocast`` / ``train.compile`` fields override ``auto`` and ``on``.
    """
    device = torch.device(device)
    if tc.fast == "off":
        return REFERENCE
    cuda = device.type == "cuda"
    autocast = "bfloat16" if cuda and tc.bf16 and native_low_precision(device) == "bfloat16" else "float32"
    compile_ = tc.fast == "on" and not isinstance(model, EnergyScoreModel)
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
    """With ``options.compile``: replace ``model.net`` by its compiled module, compiled on one loss +
    backward of the batch ``x`` under the options' autocast and checked against the eager step's
    gradient on the same batch and noise; returns the options in effect.

    The compiled step must give the eager step's gradient to within ``COMPILE_GRAD_RTOL``, both
    taken with every parameter moved a little (``_perturbed``): torch 2.13's CPU Inductor under
    bf16 autocast returned zero gradients for every layer behind the digits U-Net's decoder
    upsample (12-28% of the gradient norm; float32 Inductor and the aot_eager backend were exact),
    and a 1,000-step digits run trained that way ended 19% above float32's EMA loss. A failure to
    compile or a gradient off by more warns once and leaves the eager network: the returned options
    then say ``compile=False``. The check is skipped for nets with active dropout (compiled dropout
    draws other random numbers).

    Both steps draw their noise from a private generator and restore the global RNG, and the
    gradients they leave are cleared, so the run's trajectory does not see them. The compiled
    module holds the same parameters (its state dict keys gain ``_orig_mod.``, which
    ``loop.plain_state_dict`` removes).
    """
    if not options.compile:
        return options
    eager = model.net
    try:
        with _perturbed([p for p in model.parameters() if p.requires_grad], device):
            reference = None if _has_dropout(eager) else _gradient(model, x, options, device)
            model.net = torch.compile(eager, dynamic=False)
            compiled = _gradient(model, x, options, device)
        if reference is not None:
            err = float((compiled - reference).norm() / reference.norm().clamp_min(1e-30))
            if not err <= COMPILE_GRAD_RTOL:
                raise ValueError(f"its gradient is {err:.1%} off the eager step's (tolerance {COMPILE_GRAD_RTOL:.0%})")
    except Exception as e:  # noqa: BLE001 - any compiler failure: train eager, say so once
        model.net = eager
        first_line = str(e).splitlines()[0][:200] if str(e) else ""
        warnings.warn(f"torch.compile of the training step failed ({type(e).__name__}: {first_line}); "
                      f"training eager", RuntimeWarning, stacklevel=2)
        options = dataclasses.replace(options, compile=False)
    for p in model.parameters():
        p.grad = None
    return options


@contextlib.contextmanager
def _perturbed(params: list, device: torch.device, scale: float = 0.02):
    """Every parameter moved by N(0, scale^2) (a private generator), restored bitwise on exit.

    Zero-initialised layers (the U-Net's output convolution) leave most of the gradient zero at
    step 0 in any implementation, so a check there would miss a kernel that is wrong deeper in the
    net; moved, every layer carries gradient. (Compiled training graphs take the parameters as
    inputs, so their values are not baked into the compiled code.)"""
    saved = [p.detach().clone() for p in params]
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype), alpha=scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _has_dropout(net: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules())


def _gradient(model: nn.Module, x: torch.Tensor, options: TrainFastOptions, device: torch.device) -> torch.Tensor:
    """The loss's gradient on ``x`` with fixed noise (seed 0), all parameters flattened into one
    float32 vector (no gradient: zeros); the global RNG is left as it was."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with autocast(options, device):
            loss = model.loss(x, torch.Generator(device=device).manual_seed(0))
        loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                      for p in params])


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
