"""Step-time breakdown: data, forward, backward, optimizer and exposed communication.

Each phase is the interval between the trainer's own events, marked with
:mod:`gradyard.telemetry.clock` (perf_counter on CPU, CUDA events on GPU)::

    data          BEFORE_DATA      -> AFTER_DATA
    forward       BEFORE_FORWARD   -> AFTER_FORWARD
    backward      BEFORE_BACKWARD  -> AFTER_BACKWARD, less comm_exposed
    comm_exposed  allreduce time after backward compute ended (the step waited for it)
    optimizer     BEFORE_OPTIMIZER -> BATCH_END   (step, zero_grad, LR scheduler)

and the step is BEFORE_DATA -> BATCH_END.  There is no remainder phase: the
short gaps between an AFTER and the next BEFORE belong to no phase, so the
phases add up to the step time only as far as the trainer keeps work inside
its events (the tests check within 10%).

On CUDA a step's marks are read once the GPU has passed them, normally at a
later step's BATCH_END (``Event.query()``, no sync); only when more than
``max_lag`` steps are pending does it wait on the oldest - a sync on work
queued at least a step ago.  Steps whose FLOPs were counted are left out of
the time counters (the counter's overhead is not training time).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from gradyard.events import Callback, Event
from gradyard.telemetry.clock import clock_for
from gradyard.telemetry.comm import CommRecord, GradSyncMonitor
from gradyard.telemetry.flops import FlopsMonitor
from gradyard.telemetry.metrics import PHASES, TelemetryMetrics, identity_labels

_MARKED = (
    Event.BEFORE_DATA, Event.AFTER_DATA, Event.BEFORE_FORWARD, Event.AFTER_FORWARD,
    Event.BEFORE_BACKWARD, Event.AFTER_BACKWARD, Event.BEFORE_OPTIMIZER, Event.BATCH_END,
)


@dataclass
class _Step:
    marks: dict[Event, Any]
    measured: bool
    comm: Optional[CommRecord]


class StepTimer(Callback):
    """Times the phases of every step and exports them (see the module docstring)."""

    name = "step_timer"
    critical = False
    events = frozenset((*_MARKED, Event.FIT_START, Event.FIT_END))

    def __init__(self, metrics: TelemetryMetrics, *, comm: Optional[GradSyncMonitor] = None,
                 flops: Optional[FlopsMonitor] = None, window: int = 50, max_lag: int = 2):
        self.metrics = metrics
        self.comm = comm
        self.flops = flops
        self.max_lag = max_lag
        self.window: deque[float] = deque(maxlen=window)
        """Step seconds of the latest timed steps (for achieved FLOP/s); kept in checkpoints."""
        self.last_phases: dict[str, float] = {}
        self.last_step_seconds: Optional[float] = None
        self._clock = None
        self._marks: dict[Event, Any] = {}
        self._pending: deque[_Step] = deque()

    # ---------------------------------------------------------------- events

    def on_event(self, event: Event, state: Any) -> None:
        if event in _MARKED:
            if self._clock is None:
                return
            if event is Event.BEFORE_DATA:
                self._discard(self._marks)
                self._marks = {}
            self._marks[event] = self._clock.mark()
            if event is Event.BATCH_END:
                self._end_step()
        elif event is Event.FIT_START:
            self._start(state)
        elif event is Event.FIT_END:
            self.flush()

    def _start(self, state: Any) -> None:
        m = self.metrics
        m.bind(identity_labels(state))
        self._clock = clock_for(state.device)
        for phase in PHASES:  # every phase exists from the start, at 0
            m.child(m.phase_seconds, phase=phase).inc(0)
        m.child(m.step_seconds).inc(0)
        m.child(m.timed_steps).inc(0)

    def _end_step(self) -> None:
        marks, self._marks = self._marks, {}
        comm = self.comm.take_step() if self.comm is not None and self.comm.active else None
        if any(e not in marks for e in _MARKED):
            self._discard(marks)  # an incomplete step (events skipped): nothing to say about it
            return
        measured = bool(self.flops is not None and self.flops.measured_this_step)
        self._pending.append(_Step(marks, measured, comm))
        self._drain(block=False)

    # ----------------------------------------------------------- resolution

    def _ready(self, step: _Step) -> bool:
        if not self._clock.ready(step.marks[Event.BATCH_END]):
            return False
        return step.comm is None or self.comm.ready(step.comm)

    def _drain(self, block: bool) -> None:
        while self._pending:
            step = self._pending[0]
            if not self._ready(step):
                if not block and len(self._pending) <= self.max_lag:
                    return
                self._clock.wait(step.marks[Event.BATCH_END])
                if step.comm is not None:
                    self.comm.wait(step.comm)
            self._pending.popleft()
            self._resolve(step)

    def flush(self) -> None:
        """Resolve every pending step (waits for the GPU)."""
        if self._clock is not None:
            self._drain(block=True)

    def _resolve(self, step: _Step) -> None:
        s, mk = self._clock.seconds, step.marks
        total = s(mk[Event.BEFORE_DATA], mk[Event.BATCH_END])
        phases = {
            "data": s(mk[Event.BEFORE_DATA], mk[Event.AFTER_DATA]),
            "forward": s(mk[Event.BEFORE_FORWARD], mk[Event.AFTER_FORWARD]),
            "backward": s(mk[Event.BEFORE_BACKWARD], mk[Event.AFTER_BACKWARD]),
            "optimizer": s(mk[Event.BEFORE_OPTIMIZER], mk[Event.BATCH_END]),
            "comm_exposed": 0.0,
        }
        self._discard(mk)
        stats = self.comm.finish(step.comm) if step.comm is not None else None
        if stats is not None:
            # The backward interval ends when DDP has waited for the last
            # allreduce; the part of it spent waiting is communication.
            exposed = min(stats.exposed_seconds, phases["backward"])
            phases["backward"] -= exposed
            phases["comm_exposed"] = exposed
        if step.measured:
            return
        m = self.metrics
        m.child(m.step_seconds).inc(total)
        m.child(m.timed_steps).inc()
        for phase, secs in phases.items():
            m.child(m.phase_seconds, phase=phase).inc(max(0.0, secs))
        self.last_phases, self.last_step_seconds = phases, total
        self.window.append(total)
        if self.flops is not None:
            self.flops.report_step_time(sum(self.window) / len(self.window))

    def _discard(self, marks: dict[Event, Any]) -> None:
        if self._clock is not None and marks:
            self._clock.release(marks.values())

    # ---------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.extend(float(x) for x in state.get("window", []))

    def close(self) -> None:
        self._pending.clear()
        self._marks = {}
