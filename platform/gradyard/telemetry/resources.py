"""Memory and GPU readings, taken when Prometheus scrapes (in the exporter's thread), never in the step.

* ``gradyard_process_resident_memory_bytes``: resident set size of the worker
  (psutil when installed, else /proc/self/statm).
* ``gradyard_gpu_memory_{allocated,reserved,peak_allocated}_bytes``: torch's
  caching allocator on the worker's GPU (no CUDA call, no sync).
* the NVML readings of :mod:`gradyard.telemetry.nvml`.

On CPU the GPU series are absent.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import torch
from prometheus_client.core import GaugeMetricFamily

from gradyard.events import Callback, Event
from gradyard.telemetry.metrics import (
    IDENTITY_LABELS,
    TelemetryMetrics,
    identity_labels,
)
from gradyard.telemetry.nvml import READINGS, NvmlReader


def process_rss_bytes() -> Optional[float]:
    try:
        import psutil

        return float(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return None


_TORCH_MEMORY = {
    "gradyard_gpu_memory_allocated_bytes": ("Memory held by tensors (torch caching allocator).",
                                            torch.cuda.memory_allocated),
    "gradyard_gpu_memory_reserved_bytes": ("Memory reserved by the torch caching allocator.",
                                           torch.cuda.memory_reserved),
    "gradyard_gpu_memory_peak_allocated_bytes": ("Peak memory held by tensors since the process started.",
                                                 torch.cuda.max_memory_allocated),
}


class ResourceCollector:
    """A prometheus_client collector: reads memory and NVML on each scrape."""

    def __init__(self, identity: dict[str, str], device: torch.device, nvml: Optional[NvmlReader]):
        self.identity = identity
        self.device = device
        self.nvml = nvml

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(IDENTITY_LABELS))
        family.add_metric([self.identity[k] for k in IDENTITY_LABELS], value)
        return family

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rss = process_rss_bytes()
        if rss is not None:
            yield self._gauge("gradyard_process_resident_memory_bytes", "Resident set size of the worker process.", rss)
        if self.device.type == "cuda" and torch.cuda.is_initialized():
            for name, (doc, read) in _TORCH_MEMORY.items():
                yield self._gauge(name, doc, float(read(self.device)))
        if self.nvml is not None:
            for name, value in self.nvml.read().items():
                yield self._gauge(name, READINGS[name], value)


class ResourceMonitor(Callback):
    """Registers the scrape-time collector at FIT_START; releases NVML at close."""

    name = "resource_monitor"
    critical = False

    def __init__(self, metrics: TelemetryMetrics):
        self.metrics = metrics
        self.collector: Optional[ResourceCollector] = None

    events = frozenset((Event.FIT_START,))

    def on_event(self, event: Event, state: Any) -> None:
        if event is Event.FIT_START and self.collector is None:
            self.metrics.bind(identity_labels(state))
            device = torch.device(state.device)
            self.collector = ResourceCollector(self.metrics.identity, device, NvmlReader.open(device))
            self.metrics.registry.register(self.collector)

    def close(self) -> None:
        if self.collector is not None:
            self.metrics.registry.unregister(self.collector)
            if self.collector.nvml is not None:
                self.collector.nvml.close()
            self.collector = None
