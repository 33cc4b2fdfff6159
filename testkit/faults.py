"""Faults injected into real training workers, for the recovery tests and benchmarks.

Tests pass them in explicitly: ``run_job(spec, callbacks=[KillAtStep(27, rank=1,
marker=PATH)])`` makes that rank SIGKILL its own process right after optimizer
step 27, once: the marker file records each kill, so the restarted worker goes
on.  A list (``KillAtStep([25, 45, 65], ...)``) kills once at each of those
steps, so one run measures several recoveries.  Nothing in a production run
reads a fault setting.  The marker is a log, one line per event:

    <time.time()> kill step=<step> pid=<pid>         the rank about to SIGKILL itself
    <time.time()> first_step step=<step> pid=<pid>   rank 0's first step of each attempt

The kill is a real SIGKILL of a real Ray Train worker: nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import cloudpickle

from gradyard.events import Callback, Event

# Ray workers need not import this package (it is not installed): its callbacks travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def read_marker(path: str) -> list[dict]:
    """The marker's events in order: ``{"time", "event", "step", "pid"}``."""
    out = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        t, event, *fields = line.split()
        rec = {"time": float(t), "event": event}
        rec.update((k, int(v)) for k, v in (x.split("=", 1) for x in fields))
        out.append(rec)
    return out


def _append(path: str, event: str, step: int) -> None:
    # One short O_APPEND write per line: the ranks' lines never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{time.time()} {event} step={step} pid={os.getpid()}\n".encode())
    finally:
        os.close(fd)


class KillAtStep(Callback):
    name = "fault_kill"
    events = frozenset((Event.BATCH_END,))

    def __init__(self, steps: int | list[int], rank: int, marker: str):
        self.steps = {int(s) for s in (steps if isinstance(steps, (list, tuple)) else [steps])}
        self.rank, self.marker = rank, marker
        self._first = True

    def on_event(self, event: Event, state) -> None:
        if self._first and state.rank == 0:
            self._first = False
            _append(self.marker, "first_step", state.step)
        if (state.step in self.steps and state.rank == self.rank
                and not any(e["event"] == "kill" and e["step"] == state.step
                            for e in read_marker(self.marker))):
            _append(self.marker, "kill", state.step)
            os.kill(os.getpid(), signal.SIGKILL)


class SlowSteps(Callback):
    """Sleeps after every step, to stretch a tiny run over an outage window."""

    name = "fault_slow"
    events = frozenset((Event.BATCH_END,))

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_event(self, event: Event, state) -> None:
        time.sleep(self.seconds)


class HoldAtEnd(Callback):
    """Every rank waits at FIT_END, its last metrics served, until ``release`` exists (at most
    ``timeout_s``); rank 0 first appends ``held`` to ``marker``.  A test looks at a finished run
    while its workers still serve."""

    name = "fault_hold"
    events = frozenset((Event.FIT_END,))

    def __init__(self, release: str, marker: str, timeout_s: float = 300):
        self.release, self.marker, self.timeout_s = release, marker, timeout_s

    def on_event(self, event: Event, state) -> None:
        if state.rank == 0:
            _append(self.marker, "held", state.step)
        deadline = time.monotonic() + self.timeout_s
        while not os.path.exists(self.release) and time.monotonic() < deadline:
            time.sleep(0.2)
