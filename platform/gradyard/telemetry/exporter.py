"""Serve each worker's metrics over HTTP and tell Prometheus where they are.

Decision: ``prometheus_client`` in every worker, with gradyard's own
file-based discovery - not Ray's ``ray.util.metrics``.  Ray's path sends
metrics through the per-node metrics agent and only exists inside a Ray
worker; gradyard's telemetry must work the same in a plain ``torchrun``
process, and one code path is easier to trust than two.  It also keeps
histograms, label sets and metric names exactly as written here (Ray prefixes
names with ``ray_`` and adds its own labels).

Each worker serves its private registry with ``start_http_server`` on
``telemetry.port`` + local_rank, or on a free port when that is 0 (several
workers on one node never clash).  The bind address is
``GRADYARD_METRICS_HOST``, else the node IP Ray reports when Ray is running
in this process, else 127.0.0.1.

Declared ports (KubeRay): where nothing reads a discovery file, Prometheus
finds a worker only on a port its pod declares (a PodMonitor names container
ports; deploy/kuberay).  The pod template says which ports those are in
``GRADYARD_METRICS_PORTS`` (``FIRST-LAST`` or ``FIRST``): local rank r serves
on FIRST + r, whatever ``telemetry.port`` says (the job file does not know
the pod it lands on; the pod does).  An environment variable, not a job key,
because the deployment declares the ports: the same job runs on a VM, under
torchrun and on KubeRay unchanged.  There a taken port is an error, not a
fallback to a free one: a port the pod does not declare is never scraped, so
a fallback would only hide that this worker's metrics are lost.  The error
stays a best-effort callback's (the trainer logs it and counts it in the
run's ``observer_errors``; training goes on): a second job on a long-lived
cluster's pod must not fail for its metrics port.

Discovery: rank 0 gathers every rank's ``host:port`` and identity labels
(``all_gather_object`` when torch.distributed is initialised) and registers
them, as one Prometheus ``file_sd_configs`` file, ``<job name>-<run id>.json``,
in the discovery directory of the node Prometheus runs on; it withdraws them
at close.  Under Ray that is the head node's, written there by the head's
registry, whichever node rank 0 runs on; under torchrun, rank 0's own
(``GRADYARD_PROMETHEUS_SD_DIR``, default /tmp/gradyard/prometheus_sd).  Why,
and the alternatives: :mod:`gradyard.telemetry.discovery`.

Labels: a target carries exactly the worker's identity labels
(:data:`~gradyard.telemetry.metrics.IDENTITY_LABELS`), the same dict its
series carry, so ``up`` has them too.  Never ``job`` or ``instance``: the
shipped Prometheus config keeps its own (``honor_labels`` is false) and drops
any other label a discovery file brings.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Optional

import torch.distributed as dist
from prometheus_client import start_http_server

from gradyard.events import Callback, Event
from gradyard.telemetry.discovery import open_registration, running_ray
from gradyard.telemetry.metrics import TelemetryMetrics, identity_labels

log = logging.getLogger(__name__)

PORTS_ENV = "GRADYARD_METRICS_PORTS"
"""The metrics ports the pod declares, ``FIRST-LAST`` or ``FIRST``; local rank r serves on FIRST + r."""


class MetricsPortError(OSError):
    """A declared metrics port this worker cannot serve on: its metrics will not be scraped."""


def declared_ports(environ: Optional[Mapping[str, str]] = None) -> Optional[range]:
    """The ports ``GRADYARD_METRICS_PORTS`` declares, or None where it is unset (VMs, torchrun)."""
    raw = (os.environ if environ is None else environ).get(PORTS_ENV, "").strip()
    if not raw:
        return None
    first, _, last = raw.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        lo = hi = -1
    if not 1 <= lo <= hi <= 65535:
        raise MetricsPortError(f"{PORTS_ENV}={raw!r} is not a port range; allowed: FIRST-LAST or FIRST, "
                               "ports 1 to 65535, e.g. 9500-9507")
    return range(lo, hi + 1)


def metrics_port(local_rank: int, configured: int = 0,
                 environ: Optional[Mapping[str, str]] = None) -> tuple[int, Optional[range]]:
    """(port, declared ports) of the worker of ``local_rank``: 0 means a free port, and declared is None
    unless the pod declares ports (:data:`PORTS_ENV`); ``configured`` is ``telemetry.port``."""
    declared = declared_ports(environ)
    if declared is not None:
        if configured and configured != declared.start:
            log.warning("telemetry.port %d is ignored: this pod declares its metrics ports (%s=%s)",
                        configured, PORTS_ENV, f"{declared.start}-{declared.stop - 1}")
        return declared.start + local_rank, declared
    return (configured + local_rank if configured > 0 else 0), None


def metrics_host() -> str:
    """Address to bind and advertise: GRADYARD_METRICS_HOST, Ray's node IP, or loopback."""
    host = os.environ.get("GRADYARD_METRICS_HOST")
    if host:
        return host
    ray = running_ray()
    if ray is not None:
        return ray.util.get_node_ip_address()
    return "127.0.0.1"


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PrometheusExporter(Callback):
    """Starts the worker's metrics server and registers it for discovery at FIT_START."""

    name = "prometheus_exporter"
    critical = False

    def __init__(self, metrics: TelemetryMetrics, *, port: int = 0, host: Optional[str] = None,
                 sd_directory: Optional[Path] = None):
        self.metrics = metrics
        self.base_port = port
        self.host = host
        self.sd_directory = Path(sd_directory) if sd_directory is not None else None
        self.port: Optional[int] = None
        self.targets: list[dict[str, Any]] = []
        """The file_sd groups of all ranks (on rank 0; this rank's own group elsewhere)."""
        self.registration = None
        """Rank 0's registration of the run's targets (:func:`~gradyard.telemetry.discovery.open_registration`)."""
        self._server = None
        self._thread: Optional[threading.Thread] = None

    events = frozenset((Event.FIT_START,))

    def on_event(self, event: Event, state: Any) -> None:
        if event is Event.FIT_START and self._server is None:
            self.metrics.bind(identity_labels(state))
            failed: Optional[Exception] = None
            try:
                self.start(local_rank=int(getattr(state, "local_rank", 0) or 0))
            except Exception as exc:  # noqa: BLE001 - still join the collective below, without a target
                failed = exc
            self.register(rank=int(state.rank))
            if failed is not None:
                raise failed

    def start(self, local_rank: int = 0) -> tuple[str, int]:
        """Serve the registry; returns (host, port).  Raises :class:`MetricsPortError` when a declared port
        cannot be served (see the module's "Declared ports")."""
        host = self.host or metrics_host()
        port, declared = metrics_port(local_rank, self.base_port)
        if declared is not None and port not in declared:
            # Served all the same (a port-forward still reaches it), but never scraped: say so.
            log.error("metrics of local rank %d on port %d will not be scraped: the pod declares %s=%d-%d, "
                      "one port per local rank; declare more", local_rank, port, PORTS_ENV,
                      declared.start, declared.stop - 1)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.metrics.registry)
        except OSError as exc:
            if declared is not None:
                raise MetricsPortError(
                    f"metrics port {port} of local rank {local_rank} on {host} is taken ({exc.strerror or exc}): "
                    f"this worker's metrics will not be scraped (the pod declares {PORTS_ENV}="
                    f"{declared.start}-{declared.stop - 1}; another job's worker on this pod?)") from None
            if port == 0:
                raise
            # A taken fixed port must not stop training; discovery carries the real one.
            log.warning("metrics port %d on %s unavailable (%s); using a free port", port, host, exc)
            self._server, self._thread = start_http_server(0, addr=host, registry=self.metrics.registry)
        self.host, self.port = host, self._server.server_port
        log.info("serving metrics on http://%s/metrics", _target(self.host, self.port))
        return self.host, self.port

    def register(self, *, rank: int) -> list[dict[str, Any]]:
        """Gather every rank's target; rank 0 registers them for discovery. Collective when distributed.

        Needs the identity bound (:meth:`TelemetryMetrics.bind`): the target's
        labels are that identity, less empty values (a label with no value is
        no label in Prometheus).
        """
        ident = self.metrics.identity
        if ident is None:
            raise RuntimeError("TelemetryMetrics.bind() has not been called (FIT_START not seen)")
        mine = {
            "targets": [_target(self.host, self.port)] if self.port else [],
            "labels": {k: v for k, v in ident.items() if v},
        }
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # On NCCL this runs on the current CUDA device, which the trainer
            # sets (torch.cuda.set_device) before FIT_START.
            groups: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(groups, mine)
        else:
            groups = [mine]
        groups = [g for g in groups if g["targets"]]
        self.targets = groups if rank == 0 else [mine]
        if rank == 0:
            registration = open_registration(f"{ident['ray_train_run_name']}-{ident['gradyard_run']}",
                                             self.sd_directory)
            registration.publish(groups)
            self.registration = registration  # only once published: nothing to withdraw otherwise
        return self.targets

    def close(self) -> None:
        try:
            if self.registration is not None:
                registration, self.registration = self.registration, None
                registration.withdraw()
        finally:
            if self._server is not None:
                self._server.shutdown()  # stops serve_forever; returns within its 0.5 s poll
                self._server.server_close()
                self._thread.join(timeout=5)
                self._server = self._thread = None
