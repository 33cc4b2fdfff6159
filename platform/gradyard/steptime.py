"""The one step clock: the phase map, each step's resolved times, and the steps measurements disturb.

Every consumer of step times reads them here: the run summary (steady steps per
second, the first step's end), telemetry's phase counters and achieved FLOP/s,
the live census's phase medians and the batch-scaling probe.  None takes its
own time marks.

Phases are intervals between the trainer's events (:mod:`gradyard.events`)::

    data          BEFORE_DATA      -> AFTER_DATA       fetch, host-to-device copy
    forward       BEFORE_FORWARD   -> AFTER_FORWARD    forward and loss
    backward      BEFORE_BACKWARD  -> AFTER_BACKWARD   backward, less comm_exposed
    comm_exposed  allreduce time after backward compute ended (the step waited for it)
    optimizer     BEFORE_OPTIMIZER -> BATCH_END        step, LR scheduler, zero_grad, the step's sums

and the step is BEFORE_DATA -> BATCH_END.  The short gaps between an AFTER and
the next BEFORE (other callbacks' work) belong to no phase.  Marks are taken
with :class:`CpuClock` (perf_counter) or :class:`CudaClock` (CUDA events, no
CPU-GPU sync: a GPU-timeline interval) and turned into seconds once the device
has passed them, normally a step or two later; only when more than ``max_lag``
steps are pending does the timer wait on the oldest.

A step in which a measurement ran (a FLOP count, the census's counting or
profiling pass) is *disturbed* (:meth:`StepTimer.disturb`): its record says so
and averages leave it out.  The live census's schedule is defined here, beside
the steady-state window it decides (:data:`STEADY_AFTER_STEPS`).

Longer than 350 lines because it is the whole step-measurement layer in one place (the issue
that merged four step clocks): the clocks, the phase map, the records and the timer that joins
them are read together whenever a step time is questioned.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Protocol

import torch

from gradyard.events import Callback, Event

log = logging.getLogger(__name__)

PHASES = ("data", "forward", "backward", "optimizer", "comm_exposed")
"""The step's phases, in :class:`StepBreakdown` as ``<phase>_s``; they partition the step time."""

BRACKETS: dict[str, tuple[Event, Event]] = {
    "data": (Event.BEFORE_DATA, Event.AFTER_DATA),
    "forward": (Event.BEFORE_FORWARD, Event.AFTER_FORWARD),
    "backward": (Event.BEFORE_BACKWARD, Event.AFTER_BACKWARD),
    "optimizer": (Event.BEFORE_OPTIMIZER, Event.BATCH_END),
    "step": (Event.BEFORE_DATA, Event.BATCH_END),
}
"""The events that start and end each timed interval (``comm_exposed`` is carved out of backward)."""

MARKED = frozenset(e for pair in BRACKETS.values() for e in pair)

CENSUS_AT_STEP = 5
"""The step the live census counts (:class:`gradyard.analysis.callback.CensusCallback`); it reads
the times of the :data:`CENSUS_TIMING_STEPS` steps before it and profiles the step after it."""
CENSUS_TIMING_STEPS = 3
CENSUS_AFTER_STEPS = 15
"""Undisturbed steps after the census's profile step that it times too: with the timing steps before
it, the verdict is judged on each of these steps and its margin weighed against their spread."""
CENSUS_RECORD_AT_STEP = CENSUS_AT_STEP + 1 + CENSUS_AFTER_STEPS
"""The step at whose end the live census's record (``analysis/step.json``) is written."""
STEADY_AFTER_STEPS = CENSUS_AT_STEP + 2
"""Steps of each attempt left out of the steady-state rate: the first step (warm-up and the
first FLOP count) up to the census's count and profile steps.  The bench's warm-up is the same."""


# ---------------------------------------------------------------------------
# Clocks


class CpuClock:
    """perf_counter marks: always ready."""

    mark = staticmethod(time.perf_counter)
    """A mark (no ``stream``: that is a CUDA notion); perf_counter itself, as this runs ~10 times a step."""

    def ready(self, mark: Any) -> bool:
        return True

    def wait(self, mark: Any) -> None: ...

    def seconds(self, start: Any, end: Any) -> float:
        return end - start

    def release(self, marks: Iterable[Any]) -> None: ...


class CudaClock:
    """CUDA-event marks on ``device``, recorded on the current stream (or ``stream``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._free: list[torch.cuda.Event] = []

    def mark(self, stream: Optional["torch.cuda.Stream"] = None) -> "torch.cuda.Event":
        try:
            event = self._free.pop()  # list.pop is atomic: safe from comm-hook threads
        except IndexError:
            event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def ready(self, mark: "torch.cuda.Event") -> bool:
        return mark.query()  # non-blocking

    def wait(self, mark: "torch.cuda.Event") -> None:
        # CPU-GPU sync point: only on a mark at least one step old (or at the
        # end of training), so the GPU has normally passed it already.
        mark.synchronize()

    def seconds(self, start: "torch.cuda.Event", end: "torch.cuda.Event") -> float:
        return start.elapsed_time(end) / 1e3

    def release(self, marks: Iterable["torch.cuda.Event"]) -> None:
        self._free.extend(marks)


def clock_for(device: torch.device | str) -> CpuClock | CudaClock:
    device = torch.device(device)
    return CudaClock(device) if device.type == "cuda" else CpuClock()


def time_call(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds ``fn()`` takes on ``device``'s clock (waits for the device at the end)."""
    clock = clock_for(device)
    start = clock.mark()
    fn()
    end = clock.mark()
    clock.wait(end)
    seconds = clock.seconds(start, end)
    clock.release([start, end])
    return seconds


# ---------------------------------------------------------------------------
# Records


@dataclass
class StepBreakdown:
    """Where a step's time goes (seconds): the fields every step-time record shares."""

    data_s: float = 0.0
    """Waiting for the next batch (BEFORE_DATA to AFTER_DATA), host-to-device copy included."""
    forward_s: float = 0.0
    backward_s: float = 0.0
    """Backward, less the exposed communication below."""
    optimizer_s: float = 0.0
    """BEFORE_OPTIMIZER to BATCH_END: optimizer step, LR scheduler, zero_grad, the step's sums."""
    comm_exposed_s: float = 0.0
    """Allreduce time the backward did not hide."""
    step_s: float = 0.0
    """Whole step, BEFORE_DATA to BATCH_END; whatever the phases do not cover is `other_s`."""

    @property
    def other_s(self) -> float:
        named = self.data_s + self.forward_s + self.backward_s + self.optimizer_s + self.comm_exposed_s
        return max(0.0, self.step_s - named)

    def breakdown(self) -> dict[str, float]:
        """The :class:`StepBreakdown` fields alone (to build another record from this one)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(StepBreakdown)}


@dataclass
class StepTimes(StepBreakdown):
    """One resolved step, as the timer publishes it."""

    step: int = 0
    """The step's index: ``state.step`` when it began (steps completed before it)."""
    disturbed: bool = False
    """A measurement ran in this step (FLOP count, census count or profile): not a typical step."""
    comm_measured: bool = False
    """``comm_exposed_s`` came from the gradient-sync hook (else it is 0, not measured)."""
    ended_s: float = 0.0
    """When the step ended, in seconds since this timer's first mark."""


class CommExposure(Protocol):
    exposed_seconds: float


class CommClock(Protocol):
    """Per-step gradient-sync marks that resolve with the step (telemetry's DDP comm hook):
    ``take_step`` hands over the marks of the step that just ended (None: it synced nothing),
    ``finish`` resolves them (None: nothing completed)."""

    def take_step(self) -> Optional[object]: ...

    def ready(self, marks: Any) -> bool: ...

    def wait(self, marks: Any) -> None: ...

    def finish(self, marks: Any) -> Optional[CommExposure]: ...


@dataclass
class _Pending:
    step: int
    marks: dict[Event, Any]
    disturbed: bool
    comm: Optional[object]


# ---------------------------------------------------------------------------
# The timer


class StepTimer(Callback):
    """Marks every step's events on one clock and publishes each step's :class:`StepTimes`.

    The trainer owns one and calls it before any other callback, so a
    callback's work at BEFORE_DATA counts as data time and its work at
    BATCH_END is outside the step.  Readers :meth:`subscribe` (each resolved
    step, in order) or read :attr:`latest`; a component that runs a
    measurement inside a step calls :meth:`disturb`; the gradient-sync hook is
    attached (:meth:`attach_comm`) so its exposed time is carved out of backward.
    """

    name = "step_timer"
    critical = False
    events = frozenset((*MARKED, Event.EPOCH_START, Event.FIT_END))

    def __init__(self, device: Optional[torch.device | str] = None, *, max_lag: int = 2,
                 steady_after: int = STEADY_AFTER_STEPS):
        self.max_lag = max_lag
        self.steady_after = steady_after
        self.latest: Optional[StepTimes] = None
        self.first_step_at: Optional[float] = None
        """time.time() when this timer's first step ended (start-up and resume latency)."""
        self._clock = clock_for(device) if device is not None else None
        self._comm: Optional[CommClock] = None
        self._subscribers: list[Callable[[StepTimes], None]] = []
        self._origin: Any = None
        self._marks: dict[Event, Any] = {}
        self._step = -1
        self._disturbed = False
        self._ended = 0  # steps ended this attempt
        self._pending: deque[_Pending] = deque()
        self._steady_from: Optional[tuple[int, float]] = None  # (steps ended, ended_s)
        self._last_end: Optional[tuple[int, float]] = None
        self._epoch_t0 = time.perf_counter()
        self._failed: set[Callable] = set()

    # ------------------------------------------------------------ wiring

    def subscribe(self, fn: Callable[[StepTimes], None]) -> None:
        """Call ``fn`` with every step resolved from now on."""
        self._subscribers.append(fn)

    def attach_comm(self, comm: CommClock) -> None:
        """Resolve ``comm``'s marks with each step; its exposed time becomes ``comm_exposed_s``."""
        self._comm = comm

    def disturb(self) -> None:
        """A measurement runs in the current step: its record is marked ``disturbed``."""
        self._disturbed = True

    # ------------------------------------------------------------ marks

    def on_event(self, event: Event, state: Any) -> None:
        if event in MARKED:
            if self._clock is None:
                self._clock = clock_for(state.device)
            if event is Event.BEFORE_DATA or event is Event.BATCH_END or self._origin is None:
                self.mark(event, state.step if event is Event.BEFORE_DATA else None)
            else:  # mark()'s common case, inline: the timer's own Python is in every step
                self._marks[event] = self._clock.mark()
        elif event is Event.EPOCH_START:
            self._epoch_t0 = time.perf_counter()
        elif event is Event.FIT_END:
            self.flush()

    def mark(self, event: Event, step: Optional[int] = None) -> None:
        """Mark ``event`` now; at BEFORE_DATA a step begins (index ``step``, else the next one)."""
        if self._clock is None:
            self._clock = CpuClock()
        if event is Event.BEFORE_DATA:
            self._release(self._marks.values())  # a step that never ended (the epoch ran out)
            self._marks, self._disturbed = {}, False
            self._step = step if step is not None else self._step + 1
        if self._origin is None:
            self._origin = self._clock.mark()  # kept: every step's end is measured from it
        self._marks[event] = self._clock.mark()
        if event is Event.BATCH_END:
            self._end_step()

    def epoch_seconds(self) -> float:
        """Host wall time since the latest EPOCH_START (for an epoch's samples per second)."""
        return time.perf_counter() - self._epoch_t0

    def _end_step(self) -> None:
        marks, self._marks = self._marks, {}
        comm = self._comm.take_step() if self._comm is not None else None
        if len(marks) < len(MARKED):  # marks holds marked events only
            self._release(marks.values())  # events were skipped: nothing to say about this step
            return
        if self.first_step_at is None:
            self.first_step_at = time.time()
        self._pending.append(_Pending(self._step, marks, self._disturbed, comm))
        self._drain(block=False)

    # ------------------------------------------------------------ resolution

    def _ready(self, p: _Pending) -> bool:
        if not self._clock.ready(p.marks[Event.BATCH_END]):
            return False
        return p.comm is None or self._comm.ready(p.comm)

    def _drain(self, block: bool, through: Optional[int] = None) -> None:
        while self._pending:
            p = self._pending[0]
            if not self._ready(p):
                must = block or len(self._pending) > self.max_lag or (through is not None and p.step <= through)
                if not must:
                    return
                self._clock.wait(p.marks[Event.BATCH_END])
                if p.comm is not None:
                    self._comm.wait(p.comm)
            self._pending.popleft()
            self._resolve(p)

    def flush(self, through: Optional[int] = None) -> None:
        """Resolve every pending step (or those up to index ``through``); waits for the device."""
        if self._clock is not None:
            self._drain(block=through is None, through=through)

    def _resolve(self, p: _Pending) -> None:
        s, mk = self._clock.seconds, p.marks
        t = {name: s(mk[a], mk[b]) for name, (a, b) in BRACKETS.items()}
        rec = StepTimes(data_s=t["data"], forward_s=t["forward"], backward_s=t["backward"],
                        optimizer_s=t["optimizer"], step_s=t["step"], step=p.step, disturbed=p.disturbed,
                        ended_s=s(self._origin, mk[Event.BATCH_END]))
        self._release(mk.values())
        stats = self._comm.finish(p.comm) if p.comm is not None else None
        if stats is not None:
            # The backward interval ends when DDP has waited for the last
            # allreduce; the part of it spent waiting is communication.
            exposed = min(max(0.0, stats.exposed_seconds), rec.backward_s)
            rec.backward_s -= exposed
            rec.comm_exposed_s, rec.comm_measured = exposed, True
        self._ended += 1
        if self._ended == self.steady_after:
            self._steady_from = (self._ended, rec.ended_s)
        self._last_end = (self._ended, rec.ended_s)
        self.latest = rec
        for fn in self._subscribers:
            try:
                fn(rec)
            except Exception as exc:  # noqa: BLE001 - one reader's failure must not stop the others'
                if fn not in self._failed:
                    self._failed.add(fn)
                    log.warning("a step-time reader failed (%s: %s); the others go on", type(exc).__name__, exc)

    def steady_steps_per_second(self) -> Optional[float]:
        """Steps per second after the first ``steady_after`` steps (stalls between steps included)."""
        try:
            self.flush()
        except RuntimeError as exc:  # a failed device: the rate of the steps already resolved
            log.warning("step timer: could not wait for the last steps (%s)", exc)
        if self._steady_from is None or self._last_end[0] <= self._steady_from[0]:
            return None
        return (self._last_end[0] - self._steady_from[0]) / (self._last_end[1] - self._steady_from[1])

    def _release(self, marks: Iterable[Any]) -> None:
        if self._clock is not None and not isinstance(self._clock, CpuClock):  # CPU marks are floats
            self._clock.release(list(marks))

    def close(self) -> None:
        # Pending steps stay: the summary reads the steady rate after the trainer closed.
        self._release(self._marks.values())
        self._marks = {}
