"""GPU-efficiency telemetry: step-time breakdown, gradient sync, MFU, memory and NVML, for Prometheus.

The worker builds the callbacks once, when ``spec.telemetry.enabled``::

    callbacks += build_telemetry_callbacks(spec, metrics=metrics)

Each callback learns who it runs as (job name, run id, rank, host, GPU: the
identity labels of :mod:`.metrics`) from the TrainState at FIT_START, so
they can be built before the process group exists.  Step times are the
trainer's step timer's (:mod:`gradyard.steptime`): the callbacks that need
them subscribe to it at FIT_START; none drives another.

Modules, one concern each:

* :mod:`.metrics`    every metric name, on a private registry; ``set_regime`` (the analysis' RegimeSink)
* :mod:`.timing`     :class:`StepMetrics`, the step timer's phases as counters
* :mod:`.comm`       :class:`GradSyncMonitor`, DDP allreduce time, bandwidth, overlap (the timer's CommClock)
* :mod:`.flops`      :class:`FlopsMonitor`, FLOPs per step (the census's counter), peak table, MFU
* :mod:`.progress`   :class:`ProgressMonitor`, steps, samples, loss, checkpoints, restarts
* :mod:`.resources`  :class:`ResourceMonitor`, memory and NVML at scrape time
* :mod:`.exporter`   :class:`PrometheusExporter`, the HTTP server each worker serves
* :mod:`.discovery`  where Prometheus finds the workers: the head's registry under Ray, a file_sd file under torchrun
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prometheus_client import CollectorRegistry

from gradyard.events import Callback
from gradyard.telemetry.comm import GradSyncMonitor
from gradyard.telemetry.exporter import PrometheusExporter
from gradyard.telemetry.flops import PEAK_FLOPS, FlopsMonitor, peak_flops
from gradyard.telemetry.metrics import TelemetryMetrics
from gradyard.telemetry.progress import ProgressMonitor
from gradyard.telemetry.resources import ResourceMonitor
from gradyard.telemetry.timing import StepMetrics

__all__ = [
    "PEAK_FLOPS", "FlopsMonitor", "GradSyncMonitor", "ProgressMonitor", "PrometheusExporter",
    "ResourceMonitor", "StepMetrics", "TelemetryMetrics", "build_telemetry_callbacks",
    "find_metrics", "peak_flops",
]


def build_telemetry_callbacks(
    state_or_spec: Any,
    *,
    registry: Optional[CollectorRegistry] = None,
    metrics: Optional[TelemetryMetrics] = None,
    peak_profile: Any = None,
    sd_directory: Optional[Path] = None,
    host: Optional[str] = None,
) -> list[Callback]:
    """The telemetry callbacks of one worker, sharing one :class:`TelemetryMetrics` (``metrics``, or a new one).

    ``state_or_spec`` is the TrainState or the JobSpec (only ``spec.telemetry``
    is read here).  ``peak_profile`` is a calibration of this worker's device:
    an analysis ``DeviceProfile`` or a {dtype: FLOP/s} mapping ("bf16",
    "fp16", "tf32", "fp32"); without it the published table is used, and MFU
    is absent where the table has no entry.
    ``sd_directory`` and ``host`` override GRADYARD_PROMETHEUS_SD_DIR and
    GRADYARD_METRICS_HOST.
    """
    spec = getattr(state_or_spec, "spec", state_or_spec)
    cfg = spec.telemetry
    metrics = metrics if metrics is not None else TelemetryMetrics(registry)
    return [
        PrometheusExporter(metrics, port=cfg.port, host=host, sd_directory=sd_directory),
        GradSyncMonitor(metrics),
        FlopsMonitor(metrics, every=cfg.measure_flops_every, peak_profile=peak_profile),
        StepMetrics(metrics),
        ProgressMonitor(metrics),
        ResourceMonitor(metrics),
    ]


def find_metrics(callbacks: list[Callback]) -> Optional[TelemetryMetrics]:
    """The TelemetryMetrics behind a list of callbacks (for ``set_regime`` from the analysis)."""
    for cb in callbacks:
        metrics = getattr(cb, "metrics", None)
        if isinstance(metrics, TelemetryMetrics):
            return metrics
    return None
