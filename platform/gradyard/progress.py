"""Progress where people wait: staging a dataset, verifying checkpoints, exporting, calibrating.

Line-based, not a redrawn bar: the same output reads well in a terminal, in
``ray job logs`` and in CI logs (a carriage-return bar turns into thousands of
lines there).  A line when the work starts, one every ``every_s`` seconds while
it goes on, and one when it ends; work that ends within ``quiet_s`` prints only
the last line, or nothing when ``quiet_s`` covers it (small jobs stay quiet).

:class:`Progress` is also an fsspec callback, so a batched ``fs.get(...,
callback=progress)`` reports the files it has copied.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from fsspec.callbacks import DEFAULT_CALLBACK, Callback

now = time.monotonic
"""The clock progress lines are timed by (tests replace it, not time.monotonic itself)."""


class Progress(Callback):
    """``what``: done/total units (files, checkpoints, bytes), printed now and then."""

    def __init__(self, what: str, total: Optional[int] = None, unit: str = "", *, every_s: float = 5.0,
                 quiet_s: float = 2.0, out: Optional[TextIO] = None):
        super().__init__(size=total, value=0)
        self.what, self.unit, self.every_s, self.quiet_s = what, unit, every_s, quiet_s
        self.out = out
        self.started = now()
        self._last: Optional[float] = None

    # -- fsspec's interface: set_size / relative_update / absolute_update end in call()
    def call(self, *args, **kwargs) -> None:
        t = now()
        if t - self.started < self.quiet_s:
            return
        if self._last is None or t - self._last >= self.every_s:
            self._say(self._line(t))
            self._last = t

    def branched(self, path_1, path_2, **kwargs):
        # One unit a file: a child transfer's bytes are not counted, its completion is.
        return DEFAULT_CALLBACK

    def advance(self, n: int = 1) -> None:
        self.relative_update(n)

    def done(self, note: str = "") -> None:
        """The last line, when the work took long enough to be worth one."""
        t = now()
        if t - self.started >= self.quiet_s or self._last is not None:
            self._say(self._line(t, final=True) + (f"; {note}" if note else ""))

    def _line(self, t: float, final: bool = False) -> str:
        count = f"{self.value}/{self.size}" if self.size else f"{self.value}"
        unit = f" {self.unit}" if self.unit else ""
        rate = ""
        elapsed = t - self.started
        if self.size and self.value and not final:
            left = elapsed / self.value * (self.size - self.value)
            rate = f", about {left:.0f}s left"
        return f"{self.what}: {count}{unit}{' done' if final else ''} in {elapsed:.0f}s{rate}"

    def _say(self, line: str) -> None:
        out = self.out or sys.stderr
        print(line, file=out, flush=True)
