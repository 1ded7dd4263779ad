"""What a run computes on, and the numerics switches it computes with (docs/GPU.md).

The bitwise contracts of the project (a chain's rows depend on (run seed, chain id) only; a resumed
run continues with the rows an uninterrupted one would have written) hold within one *device
class*: the same kind of processor running the same kernels. Another GPU model, another compute
capability or another CPU instruction set picks other kernels (cuDNN convolution algorithms,
vectorized reductions) and rounds differently, so the rows drift apart after a few steps although
their law is the same. Hence:

- :func:`describe` records the device (type, class, GPU model and compute capability, CPU
  instruction set), the torch / CUDA / cuDNN versions and the precision flags in the run manifest
  and in the training checkpoint;
- :func:`check_device_class` refuses to resume on another device class with one line unless the
  caller allows it (``--allow-device-change``), and then returns the line that says the rows will
  differ;
- :func:`apply_precision` sets the flags explicitly instead of inheriting PyTorch's defaults
  (cuDNN convolutions use TF32 by default on Ampere and later GPUs).

Pure PyTorch; no Ray.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Optional

import torch


class DeviceChangeError(ValueError):
    """A run recorded on one device class was asked to continue on another without the flag."""


@dataclass(frozen=True)
class Precision:
    """Numerics flags of a process (what :func:`apply_precision` sets).

    allow_tf32: TF32 for float32 matmuls and cuDNN convolutions (Ampere and later GPUs): several
        times faster, but about 1e-3 relative error and rows that differ from a float32 GPU's.
    cudnn_deterministic: only deterministic cuDNN algorithms.
    cudnn_benchmark: let cuDNN time its algorithms at the first call of each shape; the winner can
        change from run to run, and the round-off with it.
    """
    allow_tf32: bool = False
    cudnn_deterministic: bool = True
    cudnn_benchmark: bool = False


def _set_tf32(allow: bool) -> None:
    mode = "tf32" if allow else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        # torch >= 2.9: the per-backend API; mixing it with the legacy allow_tf32 flags raises
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
        torch.backends.cudnn.rnn.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def apply_precision(p: Precision) -> dict:
    """Set this process's TF32 and cuDNN flags from ``p``; return :func:`precision_flags`."""
    _set_tf32(p.allow_tf32)
    torch.backends.cudnn.deterministic = p.cudnn_deterministic
    torch.backends.cudnn.benchmark = p.cudnn_benchmark
    return precision_flags()


def precision_flags() -> dict:
    """The process's current numerics flags, as recorded next to outputs."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        tf32_matmul = torch.backends.cuda.matmul.fp32_precision == "tf32"
        tf32_conv = torch.backends.cudnn.conv.fp32_precision == "tf32"
    else:
        tf32_matmul, tf32_conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    return {"tf32_matmul": bool(tf32_matmul), "tf32_cudnn_conv": bool(tf32_conv),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled())}


def describe(device: torch.device | str) -> dict:
    """The device class and software of ``device`` (this process's view), with the precision flags.

    ``device_class`` is ``cuda/<GPU model>/sm_<major><minor>`` or ``cpu/<machine>/<instruction set>``
    (e.g. ``cuda/NVIDIA H200/sm_90``, ``cpu/x86_64/AVX512``).
    """
    device = torch.device(device)
    out = {"device_type": device.type, "torch": str(torch.__version__), "cuda": torch.version.cuda,
           "cpu_arch": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        cc = f"{props.major}.{props.minor}"
        out.update(gpu_name=props.name, compute_capability=cc, gpu_memory_bytes=int(props.total_memory),
                   cudnn=torch.backends.cudnn.version(),
                   device_class=f"cuda/{props.name}/sm_{props.major}{props.minor}")
    else:
        out["device_class"] = f"{device.type}/{out['cpu_arch']}/{out['cpu_capability']}"
    out["precision"] = precision_flags()
    return out


def check_device_class(recorded: Optional[dict], current: dict, what: str, allow: bool) -> Optional[str]:
    """Compare the hardware ``recorded`` by a run (``describe``) with ``current``.

    Same class, or nothing recorded (a run from before this record existed): None. Another class:
    :class:`DeviceChangeError` naming both, or with ``allow`` the line to tell the user (rows differ
    from an uninterrupted run from here on). ``what`` names the run in the message.
    """
    before = (recorded or {}).get("device_class")
    now = current["device_class"]
    if before is None or before == now:
        return None
    if not allow:
        raise DeviceChangeError(
            f"cannot resume {what}: it was computed on {before} and would continue on {now}; the rows "
            f"(or weights) would differ from an uninterrupted run, which is bitwise only within one device "
            f"class. Pass --allow-device-change (allow_device_change=True) to continue anyway")
    return (f"{what}: continuing on {now} a run computed on {before}: from here on the results differ "
            f"from an uninterrupted run on {before} (same law, other round-off)")
