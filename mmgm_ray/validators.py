"""Value checks shared by every config section and entry point.

Each check raises ``ValueError`` with one line that names the dotted config key (or option) and the
offending value, which is what the CLI prints as ``mmgm <cmd>: error: ...``.
"""
from __future__ import annotations

import math
import operator
import re
from typing import Any, Iterable, Optional

SEED_LIMIT = 1 << 63  # run seeds key the RNG (mmgm_ray.rng) and are int64 in manifests and Parquet

# Run names become one path component under ``output``: no separators, no "..", nothing hidden.
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


def positive(key: str, value: Any, allow_none: bool = False) -> Optional[float]:
    """``value`` as a float if it is a finite number > 0 (None passes when ``allow_none``)."""
    if value is None and allow_none:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    return v


def at_least(key: str, value: Optional[float], low: float, allow_none: bool = False) -> None:
    """``value`` >= ``low`` (finite; or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value < low:
        raise ValueError(f"{key} must be >= {low}, got {value!r}")


def in_range(key: str, value: float, low: float, high: float, *, high_open: bool = True) -> None:
    """``low <= value < high`` (``<= high`` when ``high_open`` is False)."""
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{key} must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}")


def one_of(key: str, value: Any, allowed: Iterable[Any]) -> None:
    """``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, got {value!r}")


def multiple_of(key: str, value: int, base_key: str, base: int) -> None:
    """``value`` is a multiple of ``base`` (0 included)."""
    if value % base:
        raise ValueError(f"{key}={value} must be a multiple of {base_key}={base}")


def run_name(key: str, name: str) -> str:
    """A run name that stays inside its output folder: letters, digits and ``._=+-``, not hidden."""
    if not isinstance(name, str) or not _RUN_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"{key} {name!r} is not a valid run name: use letters, digits and . _ = + -, "
                         f"starting with a letter or digit (no '/', no '..')")
    return name


def seed(key: str, value: Any) -> int:
    """``value`` as an int if it is an integer in [0, 2**63) (the RNG's key range)."""
    try:
        v = operator.index(value)
    except TypeError:
        v = None
    if isinstance(value, bool) or v is None or not 0 <= v < SEED_LIMIT:
        raise ValueError(f"{key} must be an integer in [0, 2**63), got {value!r}")
    return v


def pool_device(device: str, gpus_per_actor: float) -> None:
    """``pool.device`` is auto, cpu, or cuda with a GPU share reserved for each actor.

    Ray (2.59+) no longer hides the GPUs from an actor that reserved none: such an actor on cuda
    would share physical GPU 0 with whatever else runs there, unannounced, or crash-loop on a node
    without a GPU. An actor sees only the GPU Ray reserved for it, as cuda:0, so an index is refused.
    """
    if device in ("auto", "cpu"):
        return
    if device == "cuda":
        if gpus_per_actor <= 0:
            raise ValueError("pool.device='cuda' needs pool.gpus_per_actor > 0 (e.g. 1, or 0.5 for two actors "
                             "per GPU): Ray does not hide GPUs from actors that reserved none, so they would "
                             "share GPU 0 unannounced or land on nodes without one")
        return
    if device.startswith("cuda:"):
        raise ValueError(f"pool.device={device!r}: a chain actor sees only the GPU Ray reserved for it, as "
                         f"cuda:0; use pool.device='cuda' with pool.gpus_per_actor > 0")
    raise ValueError(f"pool.device must be auto, cpu or cuda, got {device!r}")
