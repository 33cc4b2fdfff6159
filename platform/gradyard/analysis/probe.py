"""Time a workload phase by phase and take its census, outside the trainer: the batch-scaling probe.

A :class:`Workload` is a training step split into the trainer's phases; its
steps are marked on the trainer's step clock with the same phase map
(:mod:`gradyard.steptime`).  ``probe`` runs it a few times and returns the same
:class:`~gradyard.analysis.record.StepRecord` the trainer writes, so both go
through one analysis; :func:`batch_scaling` times it at two batch sizes.
:func:`job_workload` is a job's own training step (the real Trainer's model, loss and optimizer on
synthetic data of the job's shapes): what ``gradyard analyze --probe`` times at B and 2B.
Used by the reference workloads' tests (``testkit/workloads.py``) too.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch

from gradyard.analysis.calibrate import DeviceProfile
from gradyard.analysis.census import census_of
from gradyard.analysis.record import Phases, StepRecord
from gradyard.events import Event
from gradyard.steptime import StepBreakdown, StepTimer, StepTimes


@dataclass
class Workload:
    data: Callable[[], Any]
    """Returns the next batch, on the device."""
    forward: Callable[[Any], Any]
    """Batch -> loss (or any output)."""
    backward: Optional[Callable[[Any], None]] = None
    """Loss -> None (``loss.backward()``)."""
    optimizer: Optional[Callable[[], None]] = None
    """Optimizer step and zero_grad."""
    no_sync: Optional[Callable[[], ContextManager]] = None
    """DDP's ``model.no_sync``: if given, exposed communication is measured as
    backward time with the allreduce minus backward time of steps run under it."""
    device: str = "cpu"
    batch_size: Optional[int] = None


def _step(w: Workload, timer: StepTimer, skip_sync: bool = False) -> None:
    """One step, marked at the trainer's events on the one step clock."""
    timer.mark(Event.BEFORE_DATA)
    batch = w.data()
    timer.mark(Event.AFTER_DATA)
    # DDP decides in the forward whether the backward will allreduce, so no_sync wraps both.
    with w.no_sync() if (skip_sync and w.no_sync is not None) else contextlib.nullcontext():
        timer.mark(Event.BEFORE_FORWARD)
        loss = w.forward(batch)
        timer.mark(Event.AFTER_FORWARD)
        timer.mark(Event.BEFORE_BACKWARD)
        if w.backward is not None:
            w.backward(loss)
    timer.mark(Event.AFTER_BACKWARD)
    timer.mark(Event.BEFORE_OPTIMIZER)
    if w.optimizer is not None:
        w.optimizer()
    timer.mark(Event.BATCH_END)


def time_phases(w: Workload, steps: int = 3, warmup: int = 1) -> Phases:
    """Median phase times over ``steps`` steps after ``warmup``, on the trainer's step clock and phase map."""
    timer = StepTimer(w.device)
    records: list[StepTimes] = []
    timer.subscribe(records.append)
    for _ in range(warmup):
        _step(w, timer)
    measure_comm = w.no_sync is not None and w.backward is not None
    synced: list[int] = []
    for _ in range(steps):
        synced.append(warmup + len(synced) * (2 if measure_comm else 1))
        _step(w, timer)
        if measure_comm:
            # Alternate with a step whose backward skips the allreduce, so both kinds see the
            # same conditions (every rank runs the same sequence, so the collectives still pair up).
            _step(w, timer, skip_sync=True)
    timer.flush()
    samples = [records[i] for i in synced]
    local = [r for i, r in enumerate(records[warmup:], warmup) if i not in synced]

    def med(rs: list[StepTimes], field: str) -> float:
        return statistics.median(getattr(r, field) for r in rs)

    comm, source = 0.0, "not measured"
    local_backward = med(local, "backward_s") if measure_comm else 0.0
    if measure_comm:
        comm = max(0.0, med(samples, "backward_s") - local_backward)
        source = "no_sync"
    parts = []
    for r in samples:
        part = StepBreakdown(**r.breakdown())
        if measure_comm:  # each synced step against the median step without the allreduce
            part.comm_exposed_s = min(part.backward_s, max(0.0, part.backward_s - local_backward))
            part.backward_s -= part.comm_exposed_s
        parts.append(part)
    return Phases(data_s=med(samples, "data_s"), forward_s=med(samples, "forward_s"),
                  backward_s=med(samples, "backward_s") - comm, optimizer_s=med(samples, "optimizer_s"),
                  comm_exposed_s=comm, step_s=med(samples, "step_s"), steps_timed=steps, comm_source=source,
                  samples=parts)


def probe(w: Workload, steps: int = 3, warmup: int = 1, profile: Optional[DeviceProfile] = None,
          batch_scaling_ratio: Optional[float] = None) -> StepRecord:
    """Phase times, then a census of one compute step (forward, backward, optimizer on a fetched batch)."""
    phases = time_phases(w, steps, warmup)
    batch = w.data()

    def compute_step() -> None:
        loss = w.forward(batch)
        if w.backward is not None:
            w.backward(loss)
        if w.optimizer is not None:
            w.optimizer()

    census = census_of(compute_step, device=w.device)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    return StepRecord(census=census, phases=phases, profile=profile, world_size=world,
                      batch_size=w.batch_size, batch_scaling_ratio=batch_scaling_ratio)


def batch_scaling(make_workload: Callable[[int], Workload], batch_size: int, steps: int = 5,
                  rounds: int = 3) -> float:
    """Compute time (step less data wait) at batch 2B over batch B.

    A fixed per-step cost does not grow with the batch: a ratio near 1 means
    overhead-bound, near 2 means the device's compute or bandwidth is the limit.
    The two batch sizes are timed in interleaved rounds (2B, B, 2B, B, ...) and
    the ratio is that of their medians: one block of a millisecond-step run after
    the other read 1.6 for a step that does not grow with its batch.
    """
    workloads = {b: make_workload(b) for b in (2 * batch_size, batch_size)}
    seconds: dict[int, list[float]] = {b: [] for b in workloads}
    for _ in range(rounds):
        for b, w in workloads.items():
            p = time_phases(w, steps=steps, warmup=1)
            seconds[b].append(max(p.step_s - p.data_s, 1e-9))
    return statistics.median(seconds[2 * batch_size]) / statistics.median(seconds[batch_size])


def job_workload(job: dict[str, Any], batch_size: Optional[int] = None, device: str = "cpu") -> Workload:
    """One process's training step of ``job`` (a job document, e.g. the step record's ``job``), at
    ``batch_size`` (default: the job's): the real Trainer's model, loss and optimizer, on synthetic
    data of the job's shapes (the probe times compute, not the data source), on ``device``
    (``cpu`` or ``cuda``: the device the record was taken on)."""
    import shutil
    import tempfile
    import weakref

    from gradyard.job import apply_overrides, parse_job
    from gradyard.storage import open_storage
    from gradyard.trainer import DistInfo, Trainer

    gpu = "true" if device == "cuda" else "false"
    doc = apply_overrides(json.loads(json.dumps(job)), ["data.source=synthetic", f"scaling.use_gpu={gpu}"]
                          + ([f"data.batch_size={batch_size}"] if batch_size else []))
    doc["data"]["loader_workers"] = 0
    spec = parse_job(doc, "the run's job")
    scratch = tempfile.mkdtemp(prefix="gradyard-probe-")
    trainer = Trainer(spec, open_storage(f"file://{scratch}"), DistInfo(), "probe", [],
                      device=torch.device(device))
    weakref.finalize(trainer, shutil.rmtree, scratch, True)  # the scratch run goes with the trainer
    state = trainer.state
    inputs, targets = (t.to(trainer.state.device) for t in next(iter(trainer._loader(0, 0))))

    def forward(batch: Any) -> torch.Tensor:
        with trainer._autocast():
            outputs = state.ddp_model(batch[0])
            return trainer._compute_loss(outputs.float(), batch[1])

    def optimizer() -> None:
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)

    return Workload(data=lambda: (inputs, targets), forward=forward, backward=lambda loss: loss.backward(),
                    optimizer=optimizer, device=device, batch_size=spec.data.batch_size)
