"""Every gradyard metric, on one private registry per worker.

Names follow Prometheus conventions: base units (seconds, bytes, ratios),
``_total`` for counters, prefix ``gradyard_``.  Every series carries the
worker's identity labels (:data:`IDENTITY_LABELS`).  Time is exported as
counters that PromQL can ``rate()`` (seconds per second of wall time is the
share of time, divided by the step rate it is seconds per step); gauges hold
values that are only meaningful as "the latest".

Per-step series are not written to prometheus_client every step: a labelled
child's ``inc`` takes a lock and a few Python calls, and a small model's step
has a dozen such writes, a measurable share of it.  Writers :meth:`add` to a
counter or :meth:`put` a gauge's latest value in a plain dict, and
:meth:`publish_due` hands the sums to prometheus_client at most every
:data:`PUBLISH_EVERY_S` seconds (and :meth:`publish` at once, at FIT_END), so a
scrape sees the training at most that much late.  Everything runs on the
training thread; the exporter's thread only reads prometheus_client's values.

A series that cannot be measured is *absent*, never zero: the labelled
children of a metric only appear once a value is set.  The GPU readings taken
at scrape time (memory, NVML) live in :mod:`gradyard.telemetry.resources`.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping, Optional

import torch
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

from gradyard.analysis.verdict import NUMBER_UNITS, REGIMES
from gradyard.steptime import PHASES
from gradyard.telemetry.nvml import gpu_identity

IDENTITY_LABELS = ("ray_train_run_name", "gradyard_run", "ray_train_worker_world_rank", "Hostname", "gpu", "UUID")
"""Labels on every gradyard series, named as the systems gradyard's series join with name them.

* ``ray_train_run_name``: the job name (``spec.name``); gradyard passes it to
  Ray Train as ``RunConfig(name=...)``, so it is Ray Train's own label too.
* ``gradyard_run``: gradyard's run id, the run's across resumes (not Ray's
  ``ray_train_run_id``: Ray makes a new one each time the driver builds its
  trainer, as after a lost controller).
* ``ray_train_worker_world_rank``: the global rank, Ray Train's label.
* ``Hostname``, ``gpu``, ``UUID``: DCGM exporter's labels for the node and the
  GPU (NVML index and GPU UUID); ``gpu`` and ``UUID`` are empty (absent in
  Prometheus) on CPU.

Never ``job`` or ``instance``: those are Prometheus' own (scrape job and target).
"""

EVIDENCE_UNITS = tuple(sorted({u for u in NUMBER_UNITS.values() if u is not None}))
"""One ``gradyard_regime_evidence_<unit>{key}`` metric per unit of the verdict's evidence
(:data:`gradyard.analysis.verdict.NUMBER_UNITS` says which key has which)."""

PUBLISH_EVERY_S = 1.0
"""The longest a per-step series waits in :class:`TelemetryMetrics` before prometheus_client has
it: well under Prometheus' scrape interval (5 s in deploy/prometheus/prometheus.yml)."""

# Checkpoint stalls range from milliseconds (async snapshot) to minutes (a
# blocking upload of a large model).
_CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def host_name() -> str:
    """The node's name as DCGM exporter has it in ``Hostname``: NODE_NAME if set, else the host name.

    On Kubernetes DCGM exporter's pod sets NODE_NAME to the node (the pod's
    own host name is the pod's name); the KubeRay manifests set it the same way.
    """
    return os.environ.get("NODE_NAME") or socket.gethostname()


def identity_labels(state: Any) -> dict[str, str]:
    """The identity labels of the worker that ``state`` (a TrainState) describes."""
    gpu, uuid = gpu_identity(torch.device(state.device))
    return {
        "ray_train_run_name": str(state.spec.name),
        "gradyard_run": str(state.run_id),
        "ray_train_worker_world_rank": str(state.rank),
        "Hostname": host_name(),
        "gpu": gpu,
        "UUID": uuid,
    }


class TelemetryMetrics:
    """The metric objects of one worker; callbacks write to them, the exporter serves them.

    Identity labels are bound once (:meth:`bind`) when the worker knows who it
    is (at FIT_START); :meth:`child` then returns the labelled series.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.identity: Optional[dict[str, str]] = None
        self._regime: Optional[str] = None
        self._children: dict[Any, Any] = {}
        self._adds: dict[Any, float] = {}
        self._puts: dict[Any, float] = {}
        self._publish_at = 0.0
        self._evidence_keys: list[tuple[str, str]] = []
        r, L = self.registry, IDENTITY_LABELS

        # -- step time (timing.py, from gradyard.steptime); disturbed steps are left out of these
        self.steps = Counter("gradyard_steps_total", "Optimizer steps completed.", L, registry=r)
        self.samples = Counter("gradyard_samples_total", "Training samples processed on this rank.", L, registry=r)
        self.timed_steps = Counter(
            "gradyard_timed_steps_total",
            "Steps whose time is in gradyard_step_seconds_total (steps with FLOP counting or the census are left out).",
            L, registry=r)
        self.step_seconds = Counter(
            "gradyard_step_seconds_total", "Step time, BEFORE_DATA to BATCH_END, summed over timed steps.",
            L, registry=r)
        self.phase_seconds = Counter(
            "gradyard_step_phase_seconds_total",
            "Step time by phase (" + ", ".join(PHASES) + ") over timed steps.",
            L + ("phase",), registry=r)

        # -- gradient synchronisation (comm.py)
        self.allreduce_seconds = Counter(
            "gradyard_allreduce_seconds_total",
            "Gradient allreduce time per step (union of bucket intervals), summed.", L, registry=r)
        self.allreduce_bucket_seconds = Counter(
            "gradyard_allreduce_bucket_seconds_total",
            "Gradient allreduce time by DDP bucket index.", L + ("bucket",), registry=r)
        self.allreduce_bytes = Counter(
            "gradyard_allreduce_bytes_total", "Gradient bytes allreduced (DDP bucket buffers).", L, registry=r)
        self.allreduce_step_bytes = Gauge(
            "gradyard_allreduce_step_bytes", "Gradient bytes allreduced in the latest step.", L, registry=r)
        self.algbw = Gauge(
            "gradyard_allreduce_algbw_bytes_per_second",
            "Algorithm bandwidth of the latest step: bytes / allreduce time (nccl-tests definition).",
            L, registry=r)
        self.busbw = Gauge(
            "gradyard_allreduce_busbw_bytes_per_second",
            "Bus bandwidth of the latest step: algbw * 2(n-1)/n (nccl-tests definition for allreduce).",
            L, registry=r)
        self.overlap = Gauge(
            "gradyard_allreduce_overlap_ratio",
            "Share of the latest step's allreduce time hidden behind backward compute.", L, registry=r)
        self.world_size = Gauge("gradyard_world_size", "Number of DDP ranks.", L, registry=r)
        self.worker_info = Gauge(
            "gradyard_worker_info", "1 for every worker; torch_device is the torch device it trains on.",
            L + ("torch_device",), registry=r)

        # -- FLOPs and MFU (flops.py)
        self.step_flops = Gauge(
            "gradyard_step_flops", "FLOPs of one step (forward + backward) on this rank, last measured.",
            L, registry=r)
        self.achieved_flops = Gauge(
            "gradyard_achieved_flops_per_second",
            "Step FLOPs over the mean step time of recent timed steps.", L, registry=r)
        self.peak_flops = Gauge(
            "gradyard_peak_flops_per_second",
            "Dense peak FLOP/s of this device at the training precision (absent when unknown).",
            L, registry=r)
        self.mfu = Gauge(
            "gradyard_mfu_ratio", "Model FLOPs utilization: achieved over peak FLOP/s (absent when the peak is unknown).",
            L, registry=r)

        # -- training progress (progress.py)
        self.loss = Gauge("gradyard_loss", "Training loss of a recent step on this rank.", L, registry=r)
        self.checkpoint_blocked = Histogram(
            "gradyard_checkpoint_blocked_seconds",
            "Time training was blocked by each checkpoint save (or failed save).",
            L, buckets=_CHECKPOINT_BUCKETS, registry=r)
        self.checkpoint_last_blocked = Gauge(
            "gradyard_checkpoint_last_blocked_seconds",
            "Time training was blocked by the latest checkpoint.", L, registry=r)
        self.checkpoints = Counter("gradyard_checkpoints_total", "Checkpoints saved by this rank.", L, registry=r)
        self.checkpoint_failures = Counter(
            "gradyard_checkpoint_failures_total", "Checkpoint saves that failed.", L, registry=r)
        self.restarts = Gauge(
            "gradyard_restarts", "Worker-group restarts of this run before this process started.", L, registry=r)
        self.observer_errors = Gauge(
            "gradyard_observer_errors", "Failures of best-effort components (telemetry, analysis) in this "
            "process, by component; training went on.", L + ("component",), registry=r)

        # -- analysis hook (set_regime): the regime is a state (a StateSet: one
        # series per state, 1 for the current one); its evidence one metric per unit.
        self.regime = Enum(
            "gradyard_regime", "The performance regime the analysis assigns to this worker (1 for the current one).",
            L, states=list(REGIMES), registry=r)
        self.regime_evidence = {
            unit: Gauge(f"gradyard_regime_evidence_{unit}",
                        f"Evidence behind the current regime, in {unit.replace('_', ' ')}; key: its name in "
                        "verdict.json.", L + ("key",), registry=r)
            for unit in EVIDENCE_UNITS}

    # ------------------------------------------------------------ identity

    def bind(self, identity: Mapping[str, str]) -> None:
        """Fix the identity labels; the first call wins (several callbacks call it at FIT_START)."""
        if self.identity is None:
            if set(identity) != set(IDENTITY_LABELS):
                raise ValueError(f"identity labels {sorted(identity)}, expected {sorted(IDENTITY_LABELS)}")
            self.identity = {k: str(identity[k]) for k in IDENTITY_LABELS}

    def child(self, metric, **extra: str):
        """The series of ``metric`` for this worker (plus any extra labels).

        Called several times a step: the labelled child is looked up once and
        kept (``labels()`` validates and locks on every call; a dict hit does not).
        """
        return self._child((metric, *extra.values()) if extra else metric)

    def _child(self, key: Any):
        """The child of ``key``: a metric, or (metric, extra label values in the metric's order)."""
        try:
            return self._children[key]
        except KeyError:
            pass
        if self.identity is None:
            raise RuntimeError("TelemetryMetrics.bind() has not been called (FIT_START not seen)")
        metric, extra = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        child = self._children[key] = metric.labels(*self.identity.values(), *extra)
        return child

    # ------------------------------------------------------------ per-step writes (see the module docstring)

    def add(self, metric, amount: float, *extra: str) -> None:
        """Add ``amount`` to counter ``metric`` (its extra label values in order) at the next publish."""
        key = (metric, *extra) if extra else metric
        adds = self._adds
        adds[key] = adds.get(key, 0.0) + amount

    def put(self, metric, value: float, *extra: str) -> None:
        """Set gauge ``metric`` to ``value`` at the next publish (the latest value wins)."""
        self._puts[(metric, *extra) if extra else metric] = value

    def publish_due(self) -> None:
        """:meth:`publish` if :data:`PUBLISH_EVERY_S` passed since the last time."""
        now = time.monotonic()
        if now >= self._publish_at:
            self._publish_at = now + PUBLISH_EVERY_S
            self.publish()

    def publish(self) -> None:
        """Hand every pending addition and gauge value to prometheus_client now."""
        adds, puts = self._adds, self._puts
        if not adds and not puts:
            return
        self._adds, self._puts = {}, {}
        for key, amount in adds.items():
            self._child(key).inc(amount)
        for key, value in puts.items():
            self._child(key).set(value)

    # ------------------------------------------------------------ analysis

    def set_regime(self, regime: str, evidence: Optional[Mapping[str, Mapping[str, float]]] = None) -> None:
        """Make ``regime`` the current state of ``gradyard_regime`` and export its evidence.

        ``evidence`` is {unit: {key: value}} (``Verdict.evidence_by_unit()``);
        each unit is a metric of its own.  Called by the analysis; a key the new
        verdict lacks is removed, so no series outlives the verdict it came from.
        """
        if self.identity is None:
            raise RuntimeError("TelemetryMetrics.bind() has not been called (FIT_START not seen)")
        if regime not in REGIMES:
            raise ValueError(f"regime {regime!r}, expected one of {REGIMES}")
        unknown = set(evidence or {}) - set(EVIDENCE_UNITS)
        if unknown:
            raise ValueError(f"evidence in units {sorted(unknown)}; gradyard_regime_evidence_* has {EVIDENCE_UNITS}")
        ident = [self.identity[k] for k in IDENTITY_LABELS]
        self.regime.labels(*ident).state(regime)
        keys = [(unit, str(key)) for unit, numbers in (evidence or {}).items() for key in numbers]
        for unit, key in set(self._evidence_keys) - set(keys):
            self.regime_evidence[unit].remove(*ident, key)
        for unit, numbers in (evidence or {}).items():
            for key, value in numbers.items():
                self.regime_evidence[unit].labels(*ident, str(key)).set(float(value))
        self._regime, self._evidence_keys = regime, keys

    @property
    def current_regime(self) -> Optional[str]:
        return self._regime
