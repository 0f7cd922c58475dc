"""Progress for long work that reads well both on a terminal and in a log file.

``progress(...)`` returns a tqdm bar when its stream is a terminal. Anywhere else (a log file, CI,
``ray job logs``) tqdm would write hundreds of carriage-return updates onto one line; there it returns
a :class:`PlainProgress` instead, which prints one ordinary line at most every ``interval`` seconds
and one at the end::

    build-shards train: 2500/5000 img (50%)  3,010 img/s  elapsed 0:00:01  ETA 0:00:01  6.6 MB/s

Both support what the product uses: iteration, ``update(n)``, ``set_postfix_str``, ``elapsed`` and use
as a context manager.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

DEFAULT_INTERVAL_S = 30.0


def is_terminal(stream: IO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


def format_duration(seconds: float) -> str:
    """``h:mm:ss``; ``-`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class PlainProgress:
    """A progress report for non-terminal output: a full line per report, never a carriage return."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        file: IO | None = None,
        interval: float = DEFAULT_INTERVAL_S,
        clock=time.monotonic,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file if file is not None else sys.stderr
        self.interval, self.clock = interval, clock
        self.n = 0
        self.postfix = ""
        self.start = clock()
        self._last_report = self.start
        self._reported_n = 0
        self._closed = False

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def line(self) -> str:
        elapsed = self.elapsed
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: " if self.desc else ""]
        if self.total:
            parts.append(f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self.n} {self.unit}")
        parts.append(f"  {rate:,.0f} {self.unit}/s  elapsed {format_duration(elapsed)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"  ETA {format_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(f"  {self.postfix}")
        return "".join(parts)

    def _report(self) -> None:
        self.file.write(self.line() + "\n")
        self.file.flush()
        self._last_report, self._reported_n = self.clock(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self._last_report >= self.interval:
            self._report()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n and self.n != self._reported_n:
                self._report()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress report was not given an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _TerminalProgress(tqdm):
    @property
    def elapsed(self) -> float:
        start = getattr(self, "start_t", None)  # absent on a disabled bar
        return self._time() - start if start is not None else 0.0


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    file: IO | None = None,
    interval: float = DEFAULT_INTERVAL_S,
    **tqdm_kwargs: Any,
):
    """A tqdm bar on a terminal, a :class:`PlainProgress` elsewhere, nothing with ``disable``."""
    stream = file if file is not None else sys.stderr
    if disable:
        return _TerminalProgress(iterable, total=total, disable=True)
    if is_terminal(stream):
        return _TerminalProgress(iterable, total=total, desc=desc, unit=unit, file=stream, **tqdm_kwargs)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, file=stream, interval=interval)
