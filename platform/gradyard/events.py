"""The training loop's events, and the one callback interface that listens to them.

Where each event fires (see :mod:`gradyard.trainer`)::

    FIT_START
    for epoch in epochs:
        EPOCH_START
        for batch in shard(epoch, from position):
            BEFORE_DATA                      # about to fetch the next batch
            AFTER_DATA                       # batch on the device
            BEFORE_FORWARD;  loss = model(batch)      AFTER_FORWARD
            BEFORE_BACKWARD; loss.backward()          AFTER_BACKWARD   # DDP allreduce overlaps here
            BEFORE_OPTIMIZER; optimizer.step(); scheduler.step(); zero_grad()   AFTER_OPTIMIZER
            BATCH_END                        # state.step advanced
            [CHECKPOINT]                     # a checkpoint of this step was taken (state in host memory)
            [CHECKPOINT_SAVED]               # an earlier checkpoint became durable (or failed for good)
        EPOCH_END
        EVAL_END                             # test metrics in state.metrics
        [CHECKPOINT] [CHECKPOINT_SAVED]      # the epoch's checkpoint, after its evaluation
    [CHECKPOINT] [CHECKPOINT_SAVED]          # the final checkpoint, waited for until durable
    FIT_END

The step timer (:mod:`gradyard.steptime`) hears each step event before any
callback; its phase map says which events bracket which phase.

The checkpoint events come from the trainer's checkpoint points, where the
checkpoint manager (:mod:`gradyard.checkpoint`) decides whether to save; at
both, ``state.checkpoint_result`` describes the save.

Callbacks (telemetry, analysis, progress) implement ``on_event``; the trainer
never names them.  A callback with ``state_dict`` / ``load_state_dict`` is
saved in checkpoints under its ``name`` so rolling windows survive a resume.
A callback that is not ``critical`` is best effort: its exceptions are
logged and counted (``state.observer_errors``), never fatal.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from gradyard.trainer import TrainState


class Event(enum.Enum):
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BEFORE_DATA = "before_data"
    AFTER_DATA = "after_data"
    BEFORE_FORWARD = "before_forward"
    AFTER_FORWARD = "after_forward"
    BEFORE_BACKWARD = "before_backward"
    AFTER_BACKWARD = "after_backward"
    BEFORE_OPTIMIZER = "before_optimizer"
    AFTER_OPTIMIZER = "after_optimizer"
    BATCH_END = "batch_end"
    EPOCH_END = "epoch_end"
    EVAL_END = "eval_end"
    CHECKPOINT = "checkpoint"
    CHECKPOINT_SAVED = "checkpoint_saved"
    FIT_END = "fit_end"

    # Callbacks look events up in sets and dicts several times a step.  Enum's
    # own __hash__ is Python code (hash of the name); members are singletons,
    # so the C identity hash is equivalent and an order of magnitude cheaper.
    __hash__ = object.__hash__


class Callback:
    """Listens to training events. Override ``on_event``; keep it cheap on the step events."""

    name: str = "callback"

    critical: bool = True
    """False for observers (telemetry, analysis, progress lines): their failures never stop training."""

    events: Optional[frozenset[Event]] = None
    """The events ``on_event`` acts on; the trainer calls it for those only.  None: every event.
    Declaring them spares a Python call per ignored event: ~80 calls a step with telemetry on."""

    def on_event(self, event: Event, state: "TrainState") -> None:  # pragma: no cover - interface
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Release threads, servers, files. Called once after FIT_END or on failure."""
