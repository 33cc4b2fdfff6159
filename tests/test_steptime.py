"""The one step clock (gradyard.steptime): the trainer's phase brackets, and every reader of step
times (summary, telemetry, census, FLOP count) reading the same resolved records.

Each test drives the real Trainer on the circles job (a 16x16 MLP, a few steps on CPU)."""

from __future__ import annotations

import statistics

import pytest
from prometheus_client import CollectorRegistry

from conftest import JOBS
from gradyard.events import Callback, Event
from gradyard.job import load_job
from gradyard.storage import open_storage
from gradyard.trainer import DistInfo, Trainer


def _trainer(tmp_path, callbacks, steps: int, *overrides: str) -> Trainer:
    spec = load_job(JOBS / "circles.yaml", ["schedule.epochs=null", f"schedule.steps={steps}",
                                            "checkpoint.every_steps=1000", *overrides])
    return Trainer(spec, open_storage(f"file://{tmp_path / 'run'}"), DistInfo(), "r", callbacks)


class _Log(Callback):
    """Every event, in order, into a shared log (the optimizer's zero_grad writes to it too)."""

    name = "log"

    def __init__(self, log: list):
        self.log = log

    def on_event(self, event, state):
        self.log.append(event)


def test_zero_grad_runs_inside_the_optimizer_phase(tmp_path):
    """zero_grad is optimizer work: the trainer runs it between BEFORE_OPTIMIZER and AFTER_OPTIMIZER
    (inside the optimizer phase's bracket), never inside the backward's."""
    log: list = []
    trainer = _trainer(tmp_path, [_Log(log)], 3)
    opt = trainer.state.optimizer
    zero_grad = opt.zero_grad
    opt.zero_grad = lambda *a, **kw: (log.append("zero_grad"), zero_grad(*a, **kw))[1]
    trainer.fit()

    steps = [i for i, e in enumerate(log) if e is Event.BEFORE_DATA]
    assert log.count("zero_grad") == 3
    for i in (i for i, e in enumerate(log) if e == "zero_grad"):
        before = [e for e in log[:i] if isinstance(e, Event)]
        assert before[-1] is Event.BEFORE_OPTIMIZER, log[max(steps):]
        assert Event.AFTER_OPTIMIZER in log[i:]

    from gradyard.steptime import BRACKETS

    start, end = BRACKETS["optimizer"]
    assert start is Event.BEFORE_OPTIMIZER and end in (Event.AFTER_OPTIMIZER, Event.BATCH_END)


class _Records(Callback):
    """Subscribes to the trainer's step timer at FIT_START, as every reader does."""

    name = "records"
    events = frozenset((Event.FIT_START,))

    def __init__(self):
        self.records = []

    def on_event(self, event, state):
        state.timer.subscribe(self.records.append)


def test_census_telemetry_and_summary_read_the_same_step_records(tmp_path):
    from gradyard.analysis import CensusCallback, DeviceProfile
    from gradyard.analysis.verdict import evidence_from
    from gradyard.steptime import CENSUS_RECORD_AT_STEP, CENSUS_TIMING_STEPS, PHASES, STEADY_AFTER_STEPS
    from gradyard.telemetry import FlopsMonitor, TelemetryMetrics, build_telemetry_callbacks

    metrics = TelemetryMetrics(CollectorRegistry())
    telemetry = build_telemetry_callbacks(load_job(JOBS / "circles.yaml"), metrics=metrics,
                                          sd_directory=tmp_path / "sd", host="127.0.0.1")
    census_records = []
    census = CensusCallback(sink=census_records.append)  # the live census's default schedule
    seen = _Records()
    steps = CENSUS_RECORD_AT_STEP + 2
    trainer = _trainer(tmp_path, [*telemetry, census, seen], steps)
    trainer.fit()
    records = seen.records

    assert [r.step for r in records] == list(range(steps))
    disturbed = [r.step for r in records if r.disturbed]
    assert disturbed == [0, census.at_step, census.at_step + 1]  # the FLOP count, the census count, its profile
    assert max(disturbed) < STEADY_AFTER_STEPS  # the steady window starts after every scheduled measurement

    # The census's phases are the medians of the timer's records of its timing steps (before its
    # count and after its profile), and each of those steps' breakdown is in the record too.
    (record,) = census_records
    timed = [r for r in records if census.at_step - census.timing_steps <= r.step < census.at_step
             or census.at_step + 1 < r.step <= census.at_step + 1 + census.after_steps]
    assert record.phases.steps_timed == len(timed) == CENSUS_TIMING_STEPS + census.after_steps and record.step == census.at_step
    assert [s.breakdown() for s in record.phases.samples] == [r.breakdown() for r in timed]
    for phase in PHASES:
        assert getattr(record.phases, f"{phase}_s") == statistics.median(getattr(r, f"{phase}_s") for r in timed)
    assert record.phases.step_s == statistics.median(r.step_s for r in timed)
    roof = DeviceProfile(device="cpu", device_type="cpu", peak_flops={"float32": 1e11},
                         mem_bandwidth_bytes_per_s=1e10, dispatch_overhead_s=1e-6)
    assert evidence_from(record, roof).breakdown() == record.phases.breakdown()  # Evidence built from Phases

    # Telemetry's counters are the sums of the same records, disturbed steps left out.
    steady = [r for r in records if not r.disturbed]

    def sample(name, **labels):
        return metrics.registry.get_sample_value(name, {**metrics.identity, **labels})

    assert sample("gradyard_timed_steps_total") == len(steady)
    assert sample("gradyard_step_seconds_total") == pytest.approx(sum(r.step_s for r in steady), rel=1e-12)
    for phase in PHASES:
        assert sample("gradyard_step_phase_seconds_total", phase=phase) == pytest.approx(
            sum(getattr(r, f"{phase}_s") for r in steady), rel=1e-12, abs=1e-15)

    # One FLOP counter: telemetry's count of step 0 is the census's count of step 5 (same shapes).
    flops = next(cb for cb in telemetry if isinstance(cb, FlopsMonitor))
    assert flops.step_flops == record.census.model_flops > 0

    # The summary's steady rate: steps after STEADY_AFTER_STEPS over the same records' end times.
    first, last = records[STEADY_AFTER_STEPS - 1], records[-1]
    assert trainer.timer.steady_steps_per_second() == pytest.approx(
        (last.step - first.step) / (last.ended_s - first.ended_s))
    assert trainer.timer.first_step_at is not None


class _LaggingClock:
    """A device clock whose marks are reached ``lag`` marks after they are recorded (a GPU running
    behind the host); ``wait`` is the sync the timer may do on an old mark, recorded."""

    def __init__(self, lag: int):
        self.lag, self.n, self.reached, self.waited = lag, 0, set(), []

    def mark(self, stream=None):
        self.n += 1
        return self.n

    def ready(self, mark) -> bool:
        return mark in self.reached or self.n - mark >= self.lag

    def wait(self, mark) -> None:
        self.waited.append(mark)
        self.reached.add(mark)

    def seconds(self, start, end) -> float:
        return (end - start) * 1e-3

    def release(self, marks) -> None:
        pass


@pytest.mark.unit
def test_a_lagging_device_is_read_late_and_waited_on_only_past_max_lag():
    """On CUDA a step's marks are read once the device has passed them: steps pile up to ``max_lag``
    unresolved and no further (the oldest is then waited on: a sync on work at least that old), records
    come out in step order, and ``flush(through=k)`` resolves every step up to k."""
    from gradyard.steptime import MARKED, StepTimer

    order = sorted(MARKED, key=list(Event).index)
    assert order[0] is Event.BEFORE_DATA and order[-1] is Event.BATCH_END
    timer = StepTimer(max_lag=2)
    clock = timer._clock = _LaggingClock(lag=10 ** 6)  # never reached by itself
    seen = []
    timer.subscribe(lambda rec: seen.append(rec.step))
    for step in range(8):
        for event in order:
            timer.mark(event, step if event is Event.BEFORE_DATA else None)
        assert seen == list(range(max(0, step - 1))), (step, seen)  # at most max_lag steps pending
    assert len(clock.waited) == 6 and all(m <= clock.n - 2 * len(order) for m in clock.waited)  # only old marks
    timer.flush(through=6)
    assert seen == list(range(7))
    timer.flush()
    assert seen == list(range(8))
    lazy = StepTimer(max_lag=2)
    clock = lazy._clock = _LaggingClock(lag=len(order) + 1)  # the device passes a step's end a step later
    for step in range(8):
        for event in order:
            lazy.mark(event, step if event is Event.BEFORE_DATA else None)
    assert clock.waited == []  # read a step late, never waited on
