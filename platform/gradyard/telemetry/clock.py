"""Time marks that cost no CPU-GPU sync: perf_counter on CPU, CUDA events on GPU.

A mark is taken at an event and turned into seconds later.  On CUDA a mark is
a ``torch.cuda.Event`` recorded on a stream: it completes when the GPU reaches
that point in the stream, so intervals are GPU-timeline intervals (a data
phase measures how long the GPU waited for data, not how long the CPU took to
fetch it while the GPU was still busy).  Marks are read only once the GPU has
passed them (:meth:`CudaClock.ready`), so reading never stalls the step.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional

import torch


class CpuClock:
    """perf_counter marks: always ready."""

    def mark(self, stream: Any = None) -> float:
        return time.perf_counter()

    def ready(self, mark: Any) -> bool:
        return True

    def wait(self, mark: Any) -> None:
        pass

    def seconds(self, start: Any, end: Any) -> float:
        return end - start

    def release(self, marks: Iterable[Any]) -> None:
        pass


class CudaClock:
    """CUDA-event marks on ``device``, recorded on the current stream (or ``stream``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._free: list[torch.cuda.Event] = []

    def mark(self, stream: Optional["torch.cuda.Stream"] = None) -> "torch.cuda.Event":
        try:
            event = self._free.pop()  # list.pop is atomic: safe from comm-hook threads
        except IndexError:
            event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def ready(self, mark: "torch.cuda.Event") -> bool:
        return mark.query()  # non-blocking

    def wait(self, mark: "torch.cuda.Event") -> None:
        # CPU-GPU sync point: only used on a mark at least one step old (or at
        # the end of training), so the GPU has normally passed it already.
        mark.synchronize()

    def seconds(self, start: "torch.cuda.Event", end: "torch.cuda.Event") -> float:
        return start.elapsed_time(end) / 1e3

    def release(self, marks: Iterable["torch.cuda.Event"]) -> None:
        self._free.extend(marks)


def clock_for(device: torch.device) -> CpuClock | CudaClock:
    return CudaClock(device) if device.type == "cuda" else CpuClock()
