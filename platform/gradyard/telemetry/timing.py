"""Step-time breakdown for Prometheus: the step timer's records as counters.

The times are the trainer's step timer's (:mod:`gradyard.steptime`, where the
phase map is defined); this callback only exports them.  Each undisturbed step
adds its seconds to ``gradyard_step_seconds_total`` and each phase's to
``gradyard_step_phase_seconds_total{phase}``; a disturbed step (a FLOP count
or the census ran in it: their overhead is not training time) is left out.
The sums reach prometheus_client in batches (:meth:`TelemetryMetrics.publish_due`).
"""

from __future__ import annotations

from typing import Any

from gradyard.events import Callback, Event
from gradyard.steptime import PHASES, StepTimes
from gradyard.telemetry.metrics import TelemetryMetrics, identity_labels


class StepMetrics(Callback):
    """Exports every undisturbed step of the trainer's step timer (see the module docstring)."""

    name = "step_metrics"
    critical = False
    events = frozenset((Event.FIT_START, Event.FIT_END))

    def __init__(self, metrics: TelemetryMetrics):
        self.metrics = metrics
        self._phases = [(phase, f"{phase}_s") for phase in PHASES]

    def on_event(self, event: Event, state: Any) -> None:
        m = self.metrics
        if event is Event.FIT_END:  # the step timer has resolved the last steps first
            m.publish()
            return
        m.bind(identity_labels(state))
        for phase in PHASES:  # every phase exists from the start, at 0
            m.child(m.phase_seconds, phase=phase).inc(0)
        m.child(m.step_seconds).inc(0)
        m.child(m.timed_steps).inc(0)
        state.timer.subscribe(self.record)

    def record(self, step: StepTimes) -> None:
        if step.disturbed:
            return
        m = self.metrics
        m.add(m.step_seconds, step.step_s)
        m.add(m.timed_steps, 1)
        phase_seconds = m.phase_seconds
        for phase, field in self._phases:
            m.add(phase_seconds, max(0.0, getattr(step, field)), phase)
        m.publish_due()
