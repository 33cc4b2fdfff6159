"""Gradient-synchronisation timing: how long DDP's allreduce takes and how much of it hides behind backward.

Decision: a DDP communication hook, not DDP's logging data.
``ddp_model._get_ddp_logging_data()`` has an average communication time, but
only for the iterations DDP samples (and it is a private API); it says nothing
per bucket, nothing per step and nothing about overlap.  A comm hook sees every
bucket of every step: it marks when the bucket is ready (its gradients are
computed) and, in the allreduce future's ``.then`` callback, when the
allreduce has completed (on CPU the last bucket is waited for on the training
thread instead: nothing is left to compute by then, and it spares a GIL
hand-over to gloo's thread each step).  On CUDA both marks are CUDA events (the callback
runs with a current stream that waits for the NCCL kernel), so the hook adds
no CPU-GPU sync.  The cost is one Python call per bucket per step.

The hook sums the bucket (the group's own allreduce) and, where it can, does
not touch it otherwise: a division is one more pass over every gradient byte,
each step.  The average comes from the backward instead: the hook sets the
trainer's ``TrainState.loss_divisor`` to the world size, and the trainer
seeds the backward with 1/world_size instead of 1 (no extra op), so every
gradient arrives in the bucket already divided.  Training stays bitwise what
it is with DDP's default hook (which multiplies each gradient by
1/world_size as it copies it into the bucket) only where scaling commutes with
every rounding of the backward, which a power of two does.  So the hook
multiplies the bucket by 1/world_size itself, DDP's own operation, for any
other world size, and under fp16's GradScaler, where a backward at
1/world_size of the scaler's scale would overflow (and skip steps) where DDP's
does not.
Per step (see :func:`comm_stats`): allreduce seconds are the union of the
bucket intervals [ready, done]; bytes are the bucket buffers' bytes (equal to
the model's gradient bytes); algbw = bytes / seconds and busbw = algbw *
2(n-1)/n as nccl-tests define them for allreduce; the overlap ratio is the
share of the union that lies before backward compute ended (the last bucket
became ready); the rest is *exposed* communication, which the step timer
reports as phase ``comm_exposed`` instead of ``backward``: the monitor is a
:class:`gradyard.steptime.CommClock`, attached to the trainer's step timer at
FIT_START, which resolves each step's bucket marks with the step's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from gradyard.events import Callback, Event
from gradyard.intervals import union_seconds
from gradyard.steptime import clock_for
from gradyard.telemetry.metrics import TelemetryMetrics, identity_labels

log = logging.getLogger(__name__)


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of the gradients DDP allreduces: every parameter that requires grad."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests bus bandwidth of an allreduce: algbw * 2(n-1)/n."""
    return algbw * 2.0 * (world_size - 1) / world_size


def allreduce_and_wait(group: Any, buffer: torch.Tensor) -> None:
    """Sum ``buffer`` over ``group`` in place and wait for it (the CPU path's last bucket).

    A function of its own so that a profile's innermost frame tells this wait
    (communication) from the hook's own Python.
    """
    group.allreduce([buffer]).wait()


@dataclass
class _Bucket:
    index: int
    nbytes: int
    ready: Any
    done: Any = None


@dataclass
class CommRecord:
    """The buckets one step allreduced, with their unresolved time marks."""

    buckets: list[_Bucket] = field(default_factory=list)


@dataclass(frozen=True)
class CommStats:
    seconds: float
    """Union of the bucket intervals."""
    bytes: int
    bucket_seconds: dict[int, float]
    """Per bucket index, time it occupied the link (not counting its wait behind the previous bucket)."""
    overlap_ratio: float
    exposed_seconds: float
    """Allreduce time after backward compute ended: the step waited for it."""
    algbw: float
    busbw: float


def comm_stats(intervals: dict[int, tuple[float, float, int]], world_size: int) -> CommStats:
    """Stats of one step from {bucket: (ready_s, done_s, bytes)}, times on any common origin."""
    if len(intervals) == 1:  # a small model's one bucket, every step: all of it is exposed
        ((idx, (ready, done, nbytes)),) = intervals.items()
        seconds = max(0.0, done - ready)
        algbw = nbytes / seconds if seconds > 0 else 0.0
        return CommStats(seconds=seconds, bytes=nbytes, bucket_seconds={idx: seconds}, overlap_ratio=0.0,
                         exposed_seconds=seconds, algbw=algbw, busbw=bus_bandwidth(algbw, world_size))
    spans = [(r, d) for r, d, _ in intervals.values()]
    seconds = union_seconds(spans)
    compute_end = max(r for r, _ in spans)
    exposed = union_seconds(spans, lo=compute_end)
    nbytes = sum(b for _, _, b in intervals.values())
    # Collectives on one process group run one after another, so a bucket's own
    # time starts when it is ready *and* the previous one is done.
    per_bucket, link_free = {}, float("-inf")
    for idx, (ready, done, _) in sorted(intervals.items(), key=lambda kv: kv[1][0]):
        per_bucket[idx] = max(0.0, done - max(ready, link_free))
        link_free = max(link_free, done)
    algbw = nbytes / seconds if seconds > 0 else 0.0
    return CommStats(
        seconds=seconds, bytes=nbytes, bucket_seconds=per_bucket,
        overlap_ratio=(seconds - exposed) / seconds if seconds > 0 else 0.0,
        exposed_seconds=exposed, algbw=algbw, busbw=bus_bandwidth(algbw, world_size),
    )


class GradSyncMonitor(Callback):
    """Registers the timing allreduce hook at FIT_START and attaches to the step timer, which resolves its marks.

    Only a ``DistributedDataParallel`` model is hooked; with one worker there
    is no gradient sync and the allreduce series stay absent.
    """

    name = "grad_sync"
    critical = False
    events = frozenset((Event.FIT_START, Event.FIT_END))

    def __init__(self, metrics: TelemetryMetrics):
        self.metrics = metrics
        self.active = False
        self.expected_bytes: Optional[int] = None
        self._world_size = 1
        self._clock = None
        self._wait_last = False
        self._scale: Optional[float] = None
        self._current = CommRecord()
        self._warned = False

    def on_event(self, event: Event, state: Any) -> None:
        if event is Event.FIT_START:
            self._start(state)
        elif event is Event.FIT_END:  # the step timer has resolved the last steps first
            self.metrics.publish()

    def _start(self, state: Any) -> None:
        self.metrics.bind(identity_labels(state))
        self._world_size = int(state.world_size)
        self.metrics.child(self.metrics.world_size).set(self._world_size)
        ddp = state.ddp_model
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel) or self.active:
            return
        self._clock = clock_for(state.device)
        self._wait_last = state.device.type == "cpu"
        self.expected_bytes = gradient_bytes(state.model)
        group = ddp.process_group if ddp.process_group is not None else dist.group.WORLD
        n = group.size()
        # Where seeding the backward would not be bitwise DDP's average, the bucket is scaled here.
        seeded = state.scaler is None and n & (n - 1) == 0
        self._scale = None if seeded else 1.0 / n
        try:
            ddp.register_comm_hook(group, self._hook)
        except RuntimeError as exc:  # another hook is registered already (e.g. compression)
            log.warning("gradient-sync telemetry off: cannot register the DDP comm hook (%s)", exc)
            return
        if seeded:
            state.loss_divisor = n  # the hook sums: the trainer's backward averages
        self.active = True
        state.timer.attach_comm(self)

    # No annotations: DDP inspects them, and under `from __future__ import
    # annotations` they are strings it rejects.
    def _hook(self, group, bucket):
        clock = self._clock
        buffer = bucket.buffer()
        record = _Bucket(bucket.index(), buffer.nbytes, clock.mark())
        self._current.buckets.append(record)
        if self._scale is not None:
            buffer.mul_(self._scale)  # as DDP's default does, bit for bit (not div_, which rounds otherwise)
        # The group's own allreduce (SUM by default), not dist.all_reduce, whose
        # Python wrapper (argument checks, coalescing and logging wrappers)
        # costs ~30 us a call, as much as a small model's whole allreduce.
        if self._wait_last and bucket.is_last():
            # CPU: the last bucket is launched once every gradient is computed,
            # and the step waits for it next anyway, so wait here, on the
            # training thread.  A .then callback would run on gloo's thread and
            # need the GIL handed over to it: measured ~1.5% of a fashion-cnn
            # step (one bucket) in the in-run benchmark.
            allreduce_and_wait(group, buffer)
            record.done = clock.mark()
            fut = torch.futures.Future()
            fut.set_result(buffer)
            return fut
        fut = group.allreduce([buffer]).get_future()

        def done(f: torch.futures.Future) -> torch.Tensor:
            # Runs when the allreduce completes (gloo: in its worker thread; NCCL:
            # with a current stream that waits for the kernel, so this mark is
            # GPU-side completion).
            record.done = clock.mark()
            return f.value()[0]

        return fut.then(done)

    # ------------------------------ CommClock: called by the step timer (gradyard.steptime)

    def take_step(self) -> Optional[CommRecord]:
        """The buckets of the step that just ended (None when it synced nothing)."""
        record, self._current = self._current, CommRecord()
        return record if record.buckets else None

    def ready(self, record: CommRecord) -> bool:
        return all(b.done is not None and self._clock.ready(b.done) for b in record.buckets)

    def wait(self, record: CommRecord) -> None:
        for b in record.buckets:
            if b.done is not None:
                self._clock.wait(b.done)

    def finish(self, record: CommRecord) -> Optional[CommStats]:
        """Resolve a step's marks into stats and export them."""
        buckets = [b for b in record.buckets if b.done is not None]
        if not buckets:
            return None
        clock, origin = self._clock, buckets[0].ready
        intervals = {
            b.index: (clock.seconds(origin, b.ready), clock.seconds(origin, b.done), b.nbytes)
            for b in buckets
        }
        clock.release([m for b in record.buckets for m in (b.ready, b.done) if m is not None])
        stats = comm_stats(intervals, self._world_size)
        if self.expected_bytes is not None and stats.bytes != self.expected_bytes and not self._warned:
            self._warned = True
            log.warning("allreduced %d bytes in a step, the model has %d gradient bytes",
                        stats.bytes, self.expected_bytes)
        m = self.metrics
        m.add(m.allreduce_seconds, stats.seconds)
        m.add(m.allreduce_bytes, stats.bytes)
        m.put(m.allreduce_step_bytes, stats.bytes)
        for idx, secs in stats.bucket_seconds.items():
            m.add(m.allreduce_bucket_seconds, secs, str(idx))
        if stats.seconds > 0:
            m.put(m.algbw, stats.algbw)
            m.put(m.busbw, stats.busbw)
            m.put(m.overlap, stats.overlap_ratio)
        m.publish_due()
        return stats
