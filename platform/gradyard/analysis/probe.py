"""Time a workload phase by phase and take its census, outside the trainer.

Used by the tests and by `gradyard analyze --probe`: a :class:`Workload` is
the training step split into the phases the report shows.  ``probe`` runs it
a few times and returns the same :class:`~gradyard.analysis.record.StepRecord`
the trainer writes, so both go through one analysis.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch

from gradyard.analysis.calibrate import DeviceProfile
from gradyard.analysis.census import census_of
from gradyard.analysis.record import Phases, StepRecord


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


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()  # sync point: phases are timed on the wall clock, so wait for the device


def _timed_step(w: Workload, dt: str, skip_sync: bool = False) -> dict[str, float]:
    t: dict[str, float] = {}
    _sync(dt)
    t0 = time.perf_counter()
    batch = w.data()
    _sync(dt)
    t1 = time.perf_counter()
    # DDP decides in the forward whether the backward will allreduce, so no_sync wraps both.
    with w.no_sync() if (skip_sync and w.no_sync is not None) else contextlib.nullcontext():
        loss = w.forward(batch)
        _sync(dt)
        t2 = time.perf_counter()
        if w.backward is not None:
            w.backward(loss)
    _sync(dt)
    t3 = time.perf_counter()
    if w.optimizer is not None:
        w.optimizer()
    _sync(dt)
    t4 = time.perf_counter()
    t.update(data_s=t1 - t0, forward_s=t2 - t1, backward_s=t3 - t2, optimizer_s=t4 - t3, step_s=t4 - t0)
    return t


def time_phases(w: Workload, steps: int = 3, warmup: int = 1) -> Phases:
    """Median phase times over ``steps`` steps after ``warmup``."""
    dt = torch.device(w.device).type
    for _ in range(warmup):
        _timed_step(w, dt)
    measure_comm = w.no_sync is not None and w.backward is not None
    samples, local = [], []
    for _ in range(steps):
        samples.append(_timed_step(w, dt))
        if measure_comm:
            # Alternate with a step whose backward skips the allreduce, so both kinds see the
            # same conditions (every rank runs the same sequence, so the collectives still pair up).
            local.append(_timed_step(w, dt, skip_sync=True)["backward_s"])
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    comm, source = 0.0, "not measured"
    if measure_comm:
        comm = max(0.0, med["backward_s"] - statistics.median(local))
        source = "no_sync"
    return Phases(data_s=med["data_s"], forward_s=med["forward_s"], backward_s=med["backward_s"] - comm,
                  optimizer_s=med["optimizer_s"], comm_exposed_s=comm, step_s=med["step_s"],
                  steps_timed=steps, comm_source=source)


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


def batch_scaling(make_workload: Callable[[int], Workload], batch_size: int, steps: int = 5) -> float:
    """Compute time (step less data wait) at batch 2B over batch B.

    A fixed per-step cost does not grow with the batch: a ratio near 1 means
    overhead-bound, near 2 means the device's compute or bandwidth is the limit.
    """
    def compute_s(b: int) -> float:
        p = time_phases(make_workload(b), steps=steps, warmup=1)
        return max(p.step_s - p.data_s, 1e-9)

    return compute_s(2 * batch_size) / compute_s(batch_size)
