"""The one way tests build run configs: every config pins its devices to the CPU.

On a machine with CUDA, ``train.device=auto`` trains on the GPU in bf16 and ``pool.device=auto``
with a GPU share samples there, so a test would compare CUDA results with CPU references. Every
config a test builds (files read back included) goes through one of these helpers;
``tests/test_gpu_ready.py`` checks the test sources for configs built any other way.
"""
from __future__ import annotations

import copy
from typing import Optional

from mmgm_ray.config import RunConfig, apply_overrides, from_dict, load_config

CPU_PINS = ("train.device=cpu", "pool.device=cpu")


def cpu_config(source: Optional[str] = None, *overrides: str) -> RunConfig:
    """``load_config(source, overrides)`` with the CPU pins (the test's overrides win)."""
    return load_config(source, [*CPU_PINS, *overrides])


def cpu_dict(d: dict) -> RunConfig:
    """``from_dict(RunConfig, d)`` with the CPU pins applied to a copy of ``d``."""
    return from_dict(RunConfig, apply_overrides(copy.deepcopy(d), list(CPU_PINS)))


def cpu_sets(*overrides: str) -> list[str]:
    """``--set`` arguments of a CLI call: the CPU pins, then ``overrides``."""
    return [arg for o in (*CPU_PINS, *overrides) for arg in ("--set", o)]
