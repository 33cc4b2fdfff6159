"""Attach the census to the training loop: :class:`CensusCallback`.

Timing, counting and profiling each take their own real step, so none of them
changes what the step computes; see :mod:`gradyard.analysis.census`.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from gradyard.analysis.census import Census, CensusMode, _finish_profiler, _new_census, _start_profiler, _sync
from gradyard.events import Callback, Event

if TYPE_CHECKING:
    from gradyard.analysis.calibrate import DeviceProfile
    from gradyard.analysis.record import StepRecord

log = logging.getLogger(__name__)

_PHASES = {  # phase name: (event that starts it, event that ends it)
    "data_s": (Event.BEFORE_DATA, Event.AFTER_DATA),
    "forward_s": (Event.BEFORE_FORWARD, Event.AFTER_FORWARD),
    "backward_s": (Event.BEFORE_BACKWARD, Event.AFTER_BACKWARD),
    "optimizer_s": (Event.BEFORE_OPTIMIZER, Event.AFTER_OPTIMIZER),
    "step_s": (Event.BEFORE_DATA, Event.BATCH_END),
}


_STEP_EVENTS = {e for pair in _PHASES.values() for e in pair} | {Event.AFTER_OPTIMIZER}


class CensusCallback(Callback):
    """Takes a census of real training steps without changing them.

    With the defaults, steps 0-1 warm up untouched, steps 2-4 are timed per
    phase (with a device sync at each event on those steps only), step 5 is
    counted under :class:`CensusMode` (BEFORE_FORWARD to AFTER_OPTIMIZER) and
    step 6 is profiled over the same span (``profile_ops=False`` skips the
    profiler: PyTorch's profiler leaves the thread that ran it slower for good,
    about 4% on fashion-cnn, which a census inside a training job must not cost).  ``every=N`` repeats the cycle every N steps.
    Each finished cycle gives a :class:`~gradyard.analysis.record.StepRecord`
    in ``self.record`` and is passed to ``sink`` (the trainer writes it to
    ``analysis/step.json``).  Steps are ``state.step`` at BEFORE_FORWARD, i.e.
    the count of steps completed before it (BATCH_END, fired after the
    trainer advances ``state.step``, belongs to the step that just ended).

    Do not stack another dispatch mode (such as a FlopCounterMode) over the
    same steps: modes are a stack and must be left in the order entered; the
    callback skips its census when it finds one already active.
    """

    name = "census"
    critical = False

    def __init__(self, at_step: int = 5, every: Optional[int] = None, timing_steps: int = 3,
                 profile: Optional["DeviceProfile"] = None, sink: Optional[Callable[["StepRecord"], None]] = None,
                 device: Optional[str | torch.device] = None, batch_size: Optional[int] = None,
                 profile_ops: bool = True) -> None:
        if at_step < 0 or timing_steps < 1 or (every is not None and every < timing_steps + 2):
            raise ValueError("CensusCallback: needs at_step >= 0, timing_steps >= 1 and every >= timing_steps + 2 "
                             "(each cycle times, counts and profiles separate steps)")
        self.at_step, self.every, self.timing_steps = at_step, every, timing_steps
        self.profile, self.sink, self.batch_size = profile, sink, batch_size
        self.profile_ops = profile_ops
        self.device_type = torch.device(device).type if device is not None else None
        self.record: Optional["StepRecord"] = None
        self._done: list[int] = []
        self._mode: Optional[CensusMode] = None
        self._prof: Optional[Any] = None
        self._prof_t0 = 0.0
        self._census: Optional[Census] = None
        self._marks: dict[Event, float] = {}
        self._phase_samples: dict[str, list[float]] = defaultdict(list)

    def _census_step(self, step: int) -> Optional[int]:
        """The census step of the cycle ``step`` belongs to (timing steps, count step, profile step), if any."""
        if self.every is None:
            target = self.at_step
        else:
            target = self.at_step + self.every * max(0, -(-(step - self.at_step - 1) // self.every))
        return target if target - self.timing_steps <= step <= target + 1 else None

    events = frozenset(_STEP_EVENTS)

    def on_event(self, event: Event, state: Any) -> None:
        if event not in _STEP_EVENTS or (self.every is None and self.at_step in self._done):
            return
        step = int(getattr(state, "step", 0))
        if event == Event.BATCH_END:
            step -= 1  # state.step has already advanced past the step that just ended
        target = self._census_step(step)
        if target is None or target in self._done:
            return
        if self.device_type is None:
            dev = getattr(state, "device", None)
            self.device_type = torch.device(dev).type if dev is not None else (
                "cuda" if torch.cuda.is_available() else "cpu")
        if target - self.timing_steps <= step < target:
            self._time(event)
        elif step == target:
            self._count(event)
        elif step == target + 1:
            self._profile(event, target, state)

    def _time(self, event: Event) -> None:
        _sync(self.device_type)
        self._marks[event] = time.perf_counter()
        if event == Event.BATCH_END:
            for phase, (a, b) in _PHASES.items():
                if a in self._marks and b in self._marks:
                    self._phase_samples[phase].append(self._marks[b] - self._marks[a])
            self._marks.clear()

    def _count(self, event: Event) -> None:
        if event == Event.BEFORE_FORWARD:
            if _get_current_dispatch_mode_stack():
                log.warning("census: another dispatch mode is active; skipping this census")
                return
            self._census = _new_census(self.device_type)
            self._mode = CensusMode()
            self._mode.__enter__()
        elif event == Event.AFTER_OPTIMIZER and self._mode is not None:
            self._exit_mode()

    def _exit_mode(self) -> None:
        mode, self._mode = self._mode, None
        if mode is None:
            return
        stack = _get_current_dispatch_mode_stack()
        if not stack or stack[-1] is not mode:
            log.warning("census: dispatch mode stack changed during the step; census discarded")
            self._census = None
            return
        mode.__exit__(None, None, None)
        if self._census is not None:
            self._census.ops = list(mode.stats.values())
            self._census.uncounted = mode.uncounted

    def _profile(self, event: Event, target: int, state: Any) -> None:
        if self._census is None:
            return
        if not self.profile_ops:  # counts only: no op times, the verdict estimates without them
            if event == Event.BATCH_END:
                self._finish(target, state)
            return
        if event == Event.BEFORE_FORWARD:
            self._prof = _start_profiler(self.device_type)  # before the clock: start-up is not step time
            _sync(self.device_type)
            self._prof_t0 = time.perf_counter()
        elif event == Event.AFTER_OPTIMIZER:
            _sync(self.device_type)
            wall = time.perf_counter() - self._prof_t0
            if self._prof is not None:
                _finish_profiler(self._prof, self._census, wall)
                self._prof = None
        elif event == Event.BATCH_END:
            self._finish(target, state)

    def _finish(self, target: int, state: Any) -> None:

        from gradyard.analysis.record import Phases, StepRecord

        med = {k: statistics.median(v) for k, v in self._phase_samples.items() if v}
        census, self._census = self._census, None
        comm = census.comm_exposed_s or 0.0
        phases = Phases(data_s=med.get("data_s", 0.0), forward_s=med.get("forward_s", 0.0),
                        backward_s=max(0.0, med.get("backward_s", 0.0) - comm), optimizer_s=med.get("optimizer_s", 0.0),
                        comm_exposed_s=comm, step_s=med.get("step_s", 0.0),
                        steps_timed=len(self._phase_samples.get("step_s", [])),
                        comm_source="profiler" if census.comm_exposed_s is not None else "not measured")
        world = 1
        try:
            import torch.distributed as dist
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        except (RuntimeError, ValueError):
            pass
        self.record = StepRecord(census=census, phases=phases, profile=self.profile, step=target,
                                 world_size=world, batch_size=self.batch_size)
        self._phase_samples.clear()
        self._done.append(target)
        if self.sink is not None:
            self.sink(self.record)

    def state_dict(self) -> dict[str, Any]:
        return {"done": list(self._done)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._done = list(state.get("done", []))

    def close(self) -> None:
        if self._mode is not None:
            self._exit_mode()
        if self._prof is not None:
            try:
                self._prof.__exit__(None, None, None)
            finally:
                self._prof = None
