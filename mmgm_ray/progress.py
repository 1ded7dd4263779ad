"""Progress of long stages (training, sampling, reading the store, FID): a tqdm bar on a terminal,
and one line at the start and one at the end of each stage otherwise (logs, CI, ``ray job``
output), so a log shows what ran, how much and how long without a wall of carriage returns.

    with Stage("FID features", total=n, unit="img") as st:
        for batch in batches:
            ...
            st.update(len(batch))

    for row in track(rows, "sampling", total=len(rows)):
        ...

Line format (stderr not a terminal)::

    [mmgm] FID features: start (500 img)
    [mmgm] FID features: done 500/500 img in 12.3 s (40.6 img/s)
    [mmgm] FID features: failed after 120/500 img in 3.1 s (ValueError)
    [mmgm] FID features: stopped after 120/500 img in 3.1 s     (a loop over track() left early)
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TextIO, TypeVar

from tqdm import tqdm

__all__ = ["Stage", "track"]

T = TypeVar("T")


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Stage:
    """One long stage: a context manager counting work done with :meth:`update`.

    Args:
        name: what the stage does (shown on the bar and in the lines).
        total: how much work there is (None when unknown).
        unit: the unit of ``total`` and :meth:`update` counts.
        stream: where to write (default ``sys.stderr``, read when the stage starts).
        enabled: False shows nothing (quiet runs) but still counts.
        clock: seconds since an arbitrary origin (tests pass a fake one).
    """

    def __init__(self, name: str, total: Optional[int] = None, unit: str = "it", *,
                 stream: Optional[TextIO] = None, enabled: bool = True,
                 clock: Callable[[], float] = time.perf_counter):
        self.name, self.total, self.unit = name, total, unit
        self.stream, self.enabled, self.clock = stream, enabled, clock
        self.count = 0
        self.seconds: Optional[float] = None
        self._bar: Optional[tqdm] = None
        self._t0 = 0.0

    def __enter__(self) -> "Stage":
        self.stream = self.stream or sys.stderr
        self._t0 = self.clock()
        if not self.enabled:
            return self
        if _is_terminal(self.stream):
            self._bar = tqdm(total=self.total, desc=self.name, unit=self.unit, file=self.stream,
                             dynamic_ncols=True, leave=True)
        else:
            size = f" ({self.total:,} {self.unit})" if self.total is not None else ""
            self._line(f"start{size}")
        return self

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units of work done."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.seconds = self.clock() - self._t0
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            done = f"{self.count:,}" + (f"/{self.total:,}" if self.total is not None else "") + f" {self.unit}"
            if exc_type is None:
                rate = f" ({self.count / self.seconds:,.1f} {self.unit}/s)" if self.seconds > 0 else ""
                self._line(f"done {done} in {self.seconds:.1f} s{rate}")
            elif issubclass(exc_type, GeneratorExit):  # the loop over track() stopped early
                self._line(f"stopped after {done} in {self.seconds:.1f} s")
            else:
                self._line(f"failed after {done} in {self.seconds:.1f} s ({exc_type.__name__})")
        return False  # never swallow the stage's exception

    def _line(self, msg: str) -> None:
        print(f"[mmgm] {self.name}: {msg}", file=self.stream, flush=True)


def track(iterable: Iterable[T], name: str, total: Optional[int] = None, unit: str = "it",
          **kwargs) -> Iterator[T]:
    """Yield from ``iterable`` inside a :class:`Stage`, one unit per item (``total`` defaults to
    ``len(iterable)`` when it has one). Keyword arguments go to :class:`Stage`."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Stage(name, total, unit, **kwargs) as stage:
        for item in iterable:
            yield item
            stage.update(1)
