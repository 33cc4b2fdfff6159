"""Training progress: steps, samples, loss, checkpoint stalls and failures, restarts.

Checkpoint counts and stalls come from the checkpoint events themselves:
``CHECKPOINT_SAVED`` (rank 0, when a checkpoint became durable or failed for
good) counts it and records its stall; other ranks, which write nothing,
record their own stall when the checkpoint is taken (``CHECKPOINT``).

The loss is read without a CPU-GPU sync, and only when the metrics are
published (:meth:`TelemetryMetrics.publish_due`, about once a second): that
BATCH_END's loss is copied into pinned host memory with ``non_blocking=True``
and an event is recorded; a later publish reads the host copy once the event
has completed.  (A plain ``loss.item()`` would wait for every kernel queued so
far.)
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch

from gradyard.events import Callback, Event
from gradyard.telemetry.metrics import PUBLISH_EVERY_S, TelemetryMetrics, identity_labels


class _LossReader:
    """Latest loss value, one step late on CUDA, never forcing a sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.value: Optional[float] = None
        if self.cuda:
            self._host = torch.empty((), dtype=torch.float32, pin_memory=True)
            self._event = torch.cuda.Event()
            self._busy = False

    def push(self, loss: Optional[torch.Tensor]) -> None:
        self.poll()
        if loss is None:
            return
        if not self.cuda:
            self.value = float(loss.detach())
        elif not self._busy:  # a copy still in flight: skip this step's loss
            self._host.copy_(loss.detach().float().reshape(()), non_blocking=True)
            self._event.record()
            self._busy = True

    def poll(self, wait: bool = False) -> None:
        if self.cuda and self._busy and (wait or self._event.query()):
            if wait:
                self._event.synchronize()  # CPU-GPU sync point: only at the end of training
            self.value, self._busy = float(self._host), False


class ProgressMonitor(Callback):
    name = "progress_monitor"
    critical = False
    events = frozenset((Event.BATCH_END, Event.CHECKPOINT, Event.CHECKPOINT_SAVED, Event.FIT_START,
                        Event.FIT_END))

    def __init__(self, metrics: TelemetryMetrics):
        self.metrics = metrics
        self._loss: Optional[_LossReader] = None
        self._observer_errors = 0
        self._loss_at = 0.0

    def on_event(self, event: Event, state: Any) -> None:
        m = self.metrics
        if event is Event.BATCH_END:
            m.add(m.steps, 1)
            m.add(m.samples, state.batch_size)
            now = time.monotonic()
            if now >= self._loss_at:  # the loss of one step a publish interval
                self._loss_at = now + PUBLISH_EVERY_S
                self._loss.push(state.loss)
                self._export_loss()
                self._observers(state)
            m.publish_due()
        elif event is Event.CHECKPOINT_SAVED:
            result = state.checkpoint_result
            m.child(m.checkpoints if result.ok else m.checkpoint_failures).inc()
            self._stall(result.blocked_s)
        elif event is Event.CHECKPOINT:
            if state.rank != 0:  # rank 0 reports its stall with the save, once durable
                self._stall(state.checkpoint_result.blocked_s)
        elif event is Event.FIT_START:
            self._start(state)
        elif event is Event.FIT_END:
            if self._loss is not None:
                self._loss.poll(wait=True)
                self._loss.push(state.loss)  # the last step's
                self._loss.poll(wait=True)
                self._export_loss()
            self._observers(state)
            m.publish()

    def _start(self, state: Any) -> None:
        m = self.metrics
        m.bind(identity_labels(state))
        self._loss = _LossReader(state.device)
        # Real zeros, so rate() and increase() work from the first scrape.
        m.child(m.steps).inc(0)
        m.child(m.samples).inc(0)
        m.child(m.checkpoints).inc(0)
        m.child(m.checkpoint_failures).inc(0)
        m.child(m.restarts).set(int(getattr(state, "restarts", 0) or 0))
        m.child(m.worker_info, torch_device=str(state.device)).set(1)

    def _export_loss(self) -> None:
        if self._loss is not None and self._loss.value is not None and math.isfinite(self._loss.value):
            self.metrics.put(self.metrics.loss, self._loss.value)

    def _stall(self, blocked_s: float) -> None:
        m = self.metrics
        m.child(m.checkpoint_blocked).observe(float(blocked_s))
        m.child(m.checkpoint_last_blocked).set(float(blocked_s))

    def _observers(self, state: Any) -> None:
        """Failures of best-effort callbacks (telemetry itself, analysis) so far, by component."""
        errors = getattr(state, "observer_errors", None)
        if not errors or sum(errors.values()) == self._observer_errors:
            return
        self._observer_errors = sum(errors.values())
        for name, n in errors.items():
            self.metrics.put(self.metrics.observer_errors, n, name)
