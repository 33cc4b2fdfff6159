"""Faults injected into real training workers, for the recovery tests and benchmarks.

``run_job(..., faults={"kill_at_step": 27, "kill_rank": 1, "marker": PATH})``
makes that rank SIGKILL its own process right after optimizer step 27, once
(the marker file records that it happened, so the restarted worker goes on).
The kill is a real SIGKILL of a real Ray Train worker: nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import time

from gradyard.events import Callback, Event


class KillAtStep(Callback):
    name = "fault_kill"

    def __init__(self, step: int, rank: int, marker: str):
        self.step, self.rank, self.marker = step, rank, marker

    def on_event(self, event: Event, state) -> None:
        if (event is Event.BATCH_END and state.step == self.step and state.rank == self.rank
                and not os.path.exists(self.marker)):
            with open(self.marker, "w") as f:
                f.write(f"{time.time()} pid={os.getpid()} step={state.step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


class SlowSteps(Callback):
    """Sleeps after every step, to stretch a tiny run over an outage window."""

    name = "fault_slow"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_event(self, event: Event, state) -> None:
        if event is Event.BATCH_END:
            time.sleep(self.seconds)


def build_fault_callbacks(faults: dict) -> list[Callback]:
    cbs: list[Callback] = []
    if "kill_at_step" in faults:
        cbs.append(KillAtStep(int(faults["kill_at_step"]), int(faults.get("kill_rank", 0)),
                              faults["marker"]))
    if faults.get("sleep_per_step"):
        cbs.append(SlowSteps(float(faults["sleep_per_step"])))
    return cbs
