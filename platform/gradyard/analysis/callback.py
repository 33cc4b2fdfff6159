"""Attach the census to the training loop: :class:`CensusCallback`.

Timing, counting and profiling each take their own real step, so none of them
changes what the step computes; see :mod:`gradyard.analysis.census`.  The
timing is the trainer's step timer's (:mod:`gradyard.steptime`): the census
reads the records of its timing steps and takes no time marks of its own.
"""

from __future__ import annotations

import logging
import statistics
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from gradyard.analysis.census import Census, CensusMode, _finish_profiler, _new_census, _start_profiler, _sync
from gradyard.events import Callback, Event
from gradyard.steptime import (
    CENSUS_AFTER_STEPS,
    CENSUS_AT_STEP,
    CENSUS_TIMING_STEPS,
    StepBreakdown,
    StepTimer,
    StepTimes,
)

if TYPE_CHECKING:
    from gradyard.analysis.calibrate import DeviceProfile
    from gradyard.analysis.record import StepRecord

log = logging.getLogger(__name__)


def _sample(rec: StepTimes, comm: Optional[float]) -> StepBreakdown:
    """One timed step's breakdown; ``comm``: the profiler's exposed time, carved out of its backward."""
    part = StepBreakdown(**rec.breakdown())
    if comm is not None:
        part.backward_s = max(0.0, rec.backward_s + rec.comm_exposed_s - comm)
        part.comm_exposed_s = comm
    return part


class CensusCallback(Callback):
    """Takes a census of real training steps without changing them.

    With the defaults (:data:`gradyard.steptime.CENSUS_AT_STEP`), steps 0-1
    warm up untouched, the step timer's records of steps 2-4 give the phase
    medians, step 5 is counted under :class:`CensusMode` (BEFORE_FORWARD to
    AFTER_OPTIMIZER) and step 6 is profiled (from AFTER_DATA to BATCH_END,
    outside the timed phases' marks; ``profile_ops=False`` skips the profiler:
    PyTorch's profiler leaves the thread that ran it slower for good, about 4%
    on fashion-cnn, which a census inside a training job must not cost), and the
    ``after_steps`` steps after it are timed too (steps 7-21): the record, written
    at the end of the last, carries each timed step's breakdown (``Phases.samples``)
    beside their medians, so the verdict weighs its margin against their spread (a
    run that ends before step 21 gets its record at FIT_END, from the steps it timed).  The
    counted and profiled steps are disturbed steps for the timer (left out of
    step-time averages).  ``every=N`` repeats the cycle every N steps.
    ``measure_allreduce`` (the live analysis): at the end of the first cycle, after
    the profiled step's end mark and its profiler, every rank measures the group's allreduce bus
    bandwidth and one-float latency (the schedule is the same on every rank, so
    the collectives pair up): what tells latency-bound from bandwidth-bound
    communication, which a per-device calibration cannot know.
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
    events = frozenset((Event.FIT_START, Event.AFTER_DATA, Event.BEFORE_FORWARD, Event.AFTER_OPTIMIZER,
                        Event.BATCH_END, Event.FIT_END))

    def __init__(self, at_step: int = CENSUS_AT_STEP, every: Optional[int] = None,
                 timing_steps: int = CENSUS_TIMING_STEPS, profile: Optional["DeviceProfile"] = None,
                 sink: Optional[Callable[["StepRecord"], None]] = None,
                 device: Optional[str | torch.device] = None, batch_size: Optional[int] = None,
                 profile_ops: bool = True, measure_allreduce: bool = False,
                 after_steps: int = CENSUS_AFTER_STEPS) -> None:
        if (at_step < 0 or timing_steps < 1 or after_steps < 0
                or (every is not None and every < timing_steps + 2 + after_steps)):
            raise ValueError("CensusCallback: needs at_step >= 0, timing_steps >= 1, after_steps >= 0 and "
                             "every >= timing_steps + 2 + after_steps (each cycle times, counts and profiles "
                             "separate steps)")
        self.at_step, self.every, self.timing_steps = at_step, every, timing_steps
        self.after_steps = after_steps
        self.profile, self.sink, self.batch_size = profile, sink, batch_size
        self.profile_ops = profile_ops
        self.measure_allreduce = measure_allreduce
        self._allreduce: Optional[dict[str, float]] = None
        self._target: Optional[int] = None
        """The census step of the cycle under way."""
        self.device_type = torch.device(device).type if device is not None else None
        self.record: Optional["StepRecord"] = None
        self._done: list[int] = []
        self._timer: Optional[StepTimer] = None
        self._mode: Optional[CensusMode] = None
        self._prof: Optional[Any] = None
        self._census: Optional[Census] = None
        self._timed: list[StepTimes] = []
        self._profiled: Optional[StepTimes] = None

    def _census_step(self, step: int) -> Optional[int]:
        """The census step of the cycle ``step`` belongs to (timing steps, count step, profile step), if any."""
        if self.every is None:
            target = self.at_step
        else:
            last = 1 + self.after_steps  # a cycle's last step is target + last
            target = self.at_step + self.every * max(0, -(-(step - self.at_step - last) // self.every))
        return target if target - self.timing_steps <= step <= target + 1 + self.after_steps else None

    def on_event(self, event: Event, state: Any) -> None:
        if event is Event.FIT_START:
            self._timer = state.timer
            self._timer.subscribe(self._step_times)
            if self.device_type is None:
                self.device_type = torch.device(state.device).type
            return
        if event is Event.FIT_END:
            # A run that ends inside a cycle's timed steps still gets its verdict, on the steps it timed.
            if self._census is not None and self._mode is None and self._prof is None and self._target is not None:
                self._timer.flush()
                if self._timed:
                    self._finish(self._target)
            return
        if self.every is None and self.at_step in self._done:
            return
        step = int(state.step)
        if event is Event.BATCH_END:
            step -= 1  # state.step has already advanced past the step that just ended
        target = self._census_step(step)
        if target is None or target in self._done:
            return
        if step == target:
            self._target = target
            self._count(event)
        elif step == target + 1:
            self._profile(event, target, state)
        elif step == target + 1 + self.after_steps and event is Event.BATCH_END and self._census is not None:
            self._timer.flush(through=step)
            self._finish(target)

    def _step_times(self, rec: StepTimes) -> None:
        """The step timer's record of each step: keep the timing steps' and the profiled step's."""
        target = self._census_step(rec.step)
        if target is None or target in self._done:
            return
        if rec.step == target + 1:
            self._profiled = rec
        elif (rec.step < target or rec.step > target + 1) and not rec.disturbed:
            self._timed.append(rec)

    def _count(self, event: Event) -> None:
        if event is Event.BEFORE_FORWARD:
            if _get_current_dispatch_mode_stack():
                log.warning("census: another dispatch mode is active; skipping this census")
                return
            self._timer.disturb()
            self._census = _new_census(self.device_type)
            self._mode = CensusMode()
            self._mode.__enter__()
        elif event is Event.AFTER_OPTIMIZER and self._mode is not None:
            self._exit_mode()

    def _measure_allreduce(self) -> None:
        if not self.measure_allreduce or self._allreduce is not None:
            return
        import torch.distributed as dist

        from gradyard.analysis.calibrate import measure_allreduce_busbw, measure_allreduce_latency

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        # 16 MiB on a GPU, not calibrate's 64: a job running near its memory limit must not run out here.
        nbytes = 16 * 2 ** 20 if self.device_type == "cuda" else None
        self._allreduce = {"busbw_bytes_per_s": measure_allreduce_busbw(quick=True, nbytes=nbytes),
                           "latency_s": measure_allreduce_latency(quick=True),
                           "world_size": dist.get_world_size()}

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
        if event is Event.AFTER_DATA and self.profile_ops:
            # After the data phase's end mark, before the forward's start mark: the profiler's
            # start-up is in no phase.  The step is disturbed (op times under the profiler).
            self._timer.disturb()
            _sync(self.device_type)
            self._prof = _start_profiler(self.device_type)
        elif event is Event.BATCH_END:
            self._timer.flush(through=target + 1)  # the timing steps' and this step's records
            if self._prof is not None:
                _sync(self.device_type)
                rec = self._profiled
                wall = (rec.forward_s + rec.backward_s + rec.comm_exposed_s + rec.optimizer_s) if rec else 0.0
                _finish_profiler(self._prof, self._census, wall)  # after the step's end mark: not step time
                self._prof = None
            self._measure_allreduce()  # after the profiler stopped: its collectives are no step's
            if not self.after_steps:
                self._finish(target)

    def _finish(self, target: int) -> None:
        from gradyard.analysis.record import Phases, StepRecord

        timed, self._timed, self._profiled = self._timed, [], None
        census, self._census = self._census, None

        def med(value: Callable[[StepTimes], float]) -> float:
            return statistics.median(value(r) for r in timed) if timed else 0.0

        # Exposed allreduce: the profiler's NCCL kernels (CUDA, profile_ops), else the step timer's
        # gradient-sync marks (telemetry's comm hook); either way carved out of the backward.
        if census.comm_exposed_s is not None:
            comm, source = census.comm_exposed_s, "profiler"
        elif any(r.comm_measured for r in timed):
            comm, source = med(lambda r: r.comm_exposed_s), "telemetry comm hook"
        else:
            comm, source = 0.0, "not measured"
        phases = Phases(data_s=med(lambda r: r.data_s), forward_s=med(lambda r: r.forward_s),
                        backward_s=max(0.0, med(lambda r: r.backward_s + r.comm_exposed_s) - comm),
                        optimizer_s=med(lambda r: r.optimizer_s), comm_exposed_s=comm,
                        step_s=med(lambda r: r.step_s), steps_timed=len(timed), comm_source=source,
                        samples=[_sample(r, comm if census.comm_exposed_s is not None else None) for r in timed])
        world = 1
        try:
            import torch.distributed as dist
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        except (RuntimeError, ValueError):
            pass
        self.record = StepRecord(census=census, phases=phases, profile=self.profile, step=target,
                                 world_size=world, batch_size=self.batch_size, allreduce=self._allreduce)
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
