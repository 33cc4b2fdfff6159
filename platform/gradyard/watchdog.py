"""Hang detection: a rank that stops arriving at the step's collectives is found, named, and restarted.

A rank SIGSTOPped, deadlocked or stuck in a hung kernel leaves every other
rank waiting inside a collective (DDP's allreduce, the evaluation's sums, a
checkpoint's RNG gather) until the process group's timeout, which Ray Train
leaves off by default.  gradyard's watchdog finds it within a bound derived
from the run's own step times:

* the training thread marks where it is (:class:`Progress`: the phase, since
  when, at which step); marking costs two attribute writes;
* a watchdog thread on each rank publishes that, once a second, as a
  heartbeat in the process group's own key-value store (the c10d TCPStore
  that torchrun and Ray Train both start), so no shared filesystem is needed;
* a rank whose own phase has lasted longer than its bound (``max(floor,
  factor x the median of recent step times)`` for steps; the last duration of
  that phase, or ``startup_factor x floor`` the first time, for evaluation,
  checkpoints and start-up) reads every rank's heartbeat.  Ranks whose
  heartbeat stopped (a stopped or dead process) or that are behind the others
  are the ones that did not arrive.  If no rank is still legitimately busy
  (inside its own bound), the hang is reported, naming those ranks, and the
  process exits with :data:`EXIT_HANG`, so Ray Train (or torchrun's agent)
  restarts the worker group from the newest checkpoint.

The same code runs under Ray Train and plain torchrun.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger("gradyard.watchdog")

EXIT_HANG = 75
"""Exit status of a process that detected a hang (EX_TEMPFAIL: a restart may help)."""
HEARTBEAT_S = 1.0
STALE_S = 5.0
"""A rank whose heartbeat has not changed for this long is stopped or gone."""
STARTUP_FACTOR = 5.0


class Progress:
    """Where this rank's training thread is; written by the trainer, read by the watchdog thread."""

    def __init__(self) -> None:
        self.current = "startup"
        """The phase now: startup, step, eval, checkpoint, epoch."""
        self.since = time.monotonic()
        self.step = 0
        self.step_times: deque[float] = deque(maxlen=20)
        self.last: dict[str, float] = {}
        """Last duration of each non-step phase (eval, checkpoint, epoch)."""
        self._step_started: Optional[float] = None

    def step_started(self, step: int) -> None:
        now = time.monotonic()
        if self._step_started is not None and self.current == "step":
            self.step_times.append(now - self._step_started)
        self._step_started = now
        self.current, self.since, self.step = "step", now, step

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark a phase of its own (evaluation, checkpoint, epoch start) for the time of the block."""
        prev, prev_since = self.current, self.since
        self.current, self.since = name, time.monotonic()
        try:
            yield
        finally:
            self.last[name] = time.monotonic() - self.since
            self.current, self.since = prev, time.monotonic() if prev == "step" else prev_since
            if prev == "step":
                self._step_started = None  # the interval holds the phase: not a step time

    def bound(self, floor_s: float, factor: float) -> float:
        if self.current == "step" and len(self.step_times) >= 3:
            return max(floor_s, factor * statistics.median(self.step_times))
        if self.current in self.last:
            return max(floor_s, factor * self.last[self.current])
        return STARTUP_FACTOR * floor_s


def _store() -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store: the watchdog still checks this rank alone
        return None


class HangWatchdog:
    """One per rank: publishes heartbeats and exits the process when the group hangs (module docstring)."""

    def __init__(self, progress: Progress, *, rank: int, world_size: int, key: str, floor_s: float,
                 factor: float, name: str = "gradyard", on_hang: Optional[Callable[[str], None]] = None):
        self.progress, self.rank, self.world_size = progress, rank, world_size
        self.key, self.floor_s, self.factor, self.name = key, floor_s, factor, name
        self.on_hang = on_hang or _exit
        self.store = _store() if world_size > 1 else None
        self.report: Optional[str] = None
        self._n = 0
        self._seen: dict[int, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradyard-watchdog", daemon=True)

    def start(self) -> "HangWatchdog":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def _mine(self) -> dict:
        p = self.progress
        return {"n": self._n, "pid": os.getpid(), "host": socket.gethostname(), "step": p.step, "phase": p.current,
                "elapsed": time.monotonic() - p.since, "bound": p.bound(self.floor_s, self.factor)}

    def _run(self) -> None:
        # The first heartbeat goes out at once: a rank stopped before its first interval would otherwise
        # read as "no heartbeat at all" (never started) rather than "heartbeat stopped", and not be ended.
        while True:
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watchdog must never take training down by mistake
                log.debug("watchdog check failed: %s", exc)
            if self._stop.wait(HEARTBEAT_S):
                return

    def check(self) -> Optional[str]:
        """One round: publish this rank's heartbeat; report a hang if there is one."""
        self._n += 1
        mine = self._mine()
        if self.store is not None:
            self.store.set(f"{self.key}/{self.rank}", json.dumps(mine))
        if mine["elapsed"] <= mine["bound"]:
            return None
        beats = self._read_all(mine)
        now = time.monotonic()
        stale, busy, steps = [], [], {}
        for r, beat in beats.items():
            steps[r] = beat.get("step", -1)
            if r == self.rank:
                continue
            n, since = self._seen.get(r, (-1, now))
            if beat.get("n") != n:
                self._seen[r] = (beat.get("n"), now)
            elif now - since > STALE_S:
                stale.append(r)
                continue
            if beat.get("elapsed", 0) <= beat.get("bound", 0):
                busy.append(r)
        missing = [r for r in range(self.world_size) if r not in beats]
        if busy and not stale and not missing:
            return None  # waiting for a rank that is legitimately busy (a long checkpoint, say)
        behind = [r for r, s in steps.items() if s < max(steps.values())]
        culprits = sorted(set(stale) | set(missing) | set(behind))
        why = []
        for r in culprits:
            b = beats.get(r)
            if r in missing:
                why.append(f"rank {r}: no heartbeat at all")
            elif r in stale:
                why.append(f"rank {r}: heartbeat stopped {now - self._seen[r][1]:.1f}s ago at step {b['step']} "
                           f"({b['phase']})")
            else:
                why.append(f"rank {r}: behind, at step {b['step']} ({b['phase']})")
        who = (f"rank(s) {', '.join(map(str, culprits))} did not arrive ({'; '.join(why)})" if culprits else
               "every rank is waiting and none is behind (a collective or a kernel hung on all ranks)")
        self._end_stopped(stale, beats)
        self.report = (f"[{self.name}] hang detected on rank {self.rank} at step {mine['step']} "
                       f"({mine['phase']} for {mine['elapsed']:.1f}s, bound {mine['bound']:.1f}s: max(floor "
                       f"{self.floor_s:g}s, {self.factor:g} x recent step time)): {who}; "
                       "restarting the worker group from the newest checkpoint")
        self.on_hang(self.report)
        return self.report

    @staticmethod
    def _end_stopped(stale: list[int], beats: dict[int, dict]) -> None:
        """SIGKILL ranks on this host whose heartbeat stopped: a stopped process ignores the polite
        signals a restart begins with, and the group cannot restart until it is gone."""
        for r in stale:
            b = beats.get(r, {})
            if b.get("host") == socket.gethostname() and isinstance(b.get("pid"), int) and b["pid"] != os.getpid():
                try:
                    os.kill(b["pid"], signal.SIGKILL)
                except OSError:
                    pass

    def _read_all(self, mine: dict) -> dict[int, dict]:
        out = {self.rank: mine}
        if self.store is None:
            return out
        for r in range(self.world_size):
            if r == self.rank:
                continue
            key = f"{self.key}/{r}"
            try:
                if self.store.check([key]):
                    out[r] = json.loads(self.store.get(key))
            except Exception:  # noqa: BLE001 - an unreadable heartbeat counts as missing
                pass
        return out


def _exit(report: str) -> None:
    log.error(report)
    print(report, file=sys.stderr, flush=True)
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(EXIT_HANG)
