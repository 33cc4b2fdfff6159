"""Driver side of a run: take the run lease, check storage and data, hand the job to Ray Train, read the summary.

``run_job`` is what ``gradyard run`` and ``python -m gradyard.launch`` (the
``ray job submit`` entrypoint) both call.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Optional

from gradyard import capacity
from gradyard.checkpoint import LeaseKeeper, acquire
from gradyard.job import JobError, JobSpec
from gradyard.storage import Storage, StorageError, open_storage, redact
from gradyard.worker import SUMMARY, run_directory

log = logging.getLogger("gradyard")

FRESH_REMOVES = ("checkpoints", SUMMARY, "attempts.json", "analysis")
"""What ``--fresh`` deletes from a run directory before starting over."""


class RunError(Exception):
    """Training failed; the message is the root cause, without Ray's tracebacks."""


def prepare_run(spec: JobSpec, storage_url: Optional[str] = None, fresh: bool = False,
                check: bool = True) -> tuple[Storage, Optional[LeaseKeeper]]:
    """The run directory, checked writable, with this driver's lease on it (taken before ``--fresh``)."""
    run = run_directory(spec, storage_url, check=check)
    keeper = LeaseKeeper(acquire(run, purpose="--fresh" if fresh else "train"))
    try:
        if fresh:
            for name in FRESH_REMOVES:
                path = run.join(name)
                if run.exists(path):
                    run.remove(path, recursive=True)
                    print(f"--fresh: removed {run.shown}/{name}", flush=True)
    except BaseException:
        keeper.release()
        raise
    return run, keeper


def preflight_data(spec: JobSpec) -> None:
    """A missing dataset or weights file fails here, naming the job key, before any worker starts."""
    for key, url in (("data.source", spec.data.source if spec.data.is_url else None),
                     ("model.pretrained", spec.model.pretrained)):
        if not url:
            continue
        try:
            src = open_storage(url, spec.storage.endpoint_url, spec.storage.region)
            present = src.exists(src.root_path)
        except Exception:  # noqa: BLE001 - unreachable storage reads as "not there"
            present = False
        if not present and key == "data.source":
            raise JobError(
                f"data.source: nothing at {redact(url)} (format {spec.data.format}). "
                "Point data.source at a local or object-storage copy of the dataset, "
                "or run with --set data.source=synthetic")
        if not present:
            raise JobError(f"model.pretrained: no weights at {redact(url)}; "
                           "point it at a local or object-storage copy (nothing is downloaded)")


def _unreachable(address: str) -> Optional[str]:
    """Why nothing answers at a HOST:PORT GCS address (None: something does, or not that form).

    Ray's own connect retries for minutes before it gives up; a closed port is known at once."""
    if "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        return exc.strerror or str(exc)
    return None


def preflight_placement(spec: JobSpec, run: Storage) -> None:
    """Local storage is only one node's: refuse it when workers may run on several, unless declared shared."""
    if not run.is_local or spec.storage.shared or spec.scaling.max_workers < 2:
        return
    nodes = [n for n in capacity.alive_nodes() if n.get("Resources", {}).get("CPU", 0) > 0]
    spread = spec.scaling.placement in ("SPREAD", "STRICT_SPREAD")
    if len(nodes) > 1 or spread:
        raise JobError(
            f"storage.url: {run.shown} is a local path, but this cluster has {len(nodes)} nodes "
            f"(placement {spec.scaling.placement}): every worker must read and write the same run directory. "
            "Use object storage (s3://bucket/prefix), or, if that path is a filesystem every node mounts, "
            "say so with storage.shared: true")


def preflight_capacity(spec: JobSpec, embedded: bool) -> None:
    """A job the cluster can never hold fails here, naming the job key; one that only nodes an
    autoscaler may add would hold waits for them, saying so, for scaling.resource_wait_s.

    Without this Ray waits for ever: its placement group stays pending, and its autoscaler says
    once that no node type fits.  The comparison is gradyard.capacity's.
    """
    demand = capacity.Demand.of(spec.scaling)
    label = "this machine's embedded Ray cluster" if embedded else "this cluster"
    addable = [] if embedded else capacity.addable_node_types()  # an embedded cluster is this machine
    verdict = capacity.assess(demand, capacity.node_totals(), addable, label)
    if verdict.state == "never":
        raise JobError(verdict.message)
    if verdict.state == "wait":
        capacity.wait_for_nodes(spec.name, demand, verdict, spec.scaling.resource_wait_s, label)


def scaling_config(spec: JobSpec):
    from ray.train import ScalingConfig

    s = spec.scaling
    resources = dict(s.resources_per_worker) or None
    num_workers = s.num_workers if isinstance(s.num_workers, int) else tuple(s.num_workers)
    return ScalingConfig(num_workers=num_workers, use_gpu=s.use_gpu,
                         resources_per_worker=resources, placement_strategy=s.placement)


def root_cause(exc: BaseException) -> str:
    """The last line of the innermost error, the one a user needs."""
    text = str(exc)
    seen = exc
    while getattr(seen, "__cause__", None) is not None:
        seen = seen.__cause__
        text = str(seen) or text
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("Error" in ln or "error" in ln) and not ln.startswith("File "):
            return redact(ln)
    return redact(lines[-1]) if lines else type(exc).__name__


def _controller_lost(exc: BaseException) -> bool:
    names = set()
    seen: Optional[BaseException] = exc
    while seen is not None:
        names.add(type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    return bool(names & {"ActorDiedError", "RayActorError", "NodeDiedError", "ActorUnavailableError",
                         "OwnerDiedError"})


def run_job(spec: JobSpec, *, address: Optional[str] = None, storage_url: Optional[str] = None,
            fresh: bool = False, on_cluster: bool = False, callbacks: Optional[list[Any]] = None) -> dict:
    """Train ``spec`` on Ray Train and return the run's summary.

    ``callbacks`` are extra training callbacks every worker adds (tests use it
    to inject faults); they must pickle.
    """
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from gradyard import raylogs
    from gradyard.worker import run_worker

    # Ray Train re-routes worker print() through its logger, which also echoes
    # to stdout: each progress line would show twice.  Propagated to workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    run, keeper = prepare_run(spec, storage_url, fresh=fresh)
    try:
        preflight_data(spec)
        base = open_storage(storage_url or spec.storage.url, spec.storage.endpoint_url, spec.storage.region)
        embedded = False
        if not ray.is_initialized():
            if address:
                unreachable = _unreachable(address)
                if unreachable:
                    raise JobError(f"--address {redact(address)}: no Ray cluster listens there ({unreachable}); "
                                   "pass a running cluster's GCS address (HOST:6379), or none for an "
                                   "embedded cluster")
                try:
                    ray.init(address=address, log_to_driver=True)
                except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                    raise JobError(f"--address {redact(address)}: no Ray cluster could be reached there "
                                   f"({redact(first)}); pass a running cluster's GCS address (HOST:6379), "
                                   "or none for an embedded cluster") from None
            elif on_cluster:
                ray.init(log_to_driver=True)  # inside `ray job submit`: the job's own cluster
            else:
                # An embedded cluster; never attach to whatever this machine ran last.
                # The dashboard serves Ray's state API, which Ray Train's
                # placement-group cleaner polls; loopback only.
                ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                         log_to_driver=True)
                embedded = True
        raylogs.install()  # Ray's known noise (see gradyard.raylogs) out of what this driver prints
        # Capacity first: a cluster that cannot hold the job makes where it writes moot.
        preflight_capacity(spec, embedded)
        preflight_placement(spec, run)

        def make_trainer() -> TorchTrainer:
            return TorchTrainer(
                run_worker,
                train_loop_config={"spec": spec.model_dump(mode="json"), "storage": run.spec(),
                                   "launcher": "ray", "lease": keeper.token, "callbacks": callbacks or [],
                                   # An embedded cluster is this machine alone: serve metrics on loopback.
                                   "metrics_host": "127.0.0.1" if embedded else None},
                scaling_config=scaling_config(spec),
                run_config=RunConfig(
                    name=spec.name,
                    storage_path=base.root_path,
                    storage_filesystem=base.to_pyarrow(),
                    failure_config=FailureConfig(max_failures=spec.failure.max_failures),
                ),
            )

        print(f"[{spec.name}] training on Ray: {spec.scaling.num_workers} worker(s), run directory "
              f"{run.shown}", flush=True)
        relaunches = 0
        while True:
            try:
                make_trainer().fit()
                break
            except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; show the cause only
                # Ray Train restarts lost workers itself; a lost node can also take
                # the train controller with it, which ends fit().  Start again:
                # the workers resume from the newest complete checkpoint.
                if _controller_lost(exc) and relaunches < max(spec.failure.max_failures, 0):
                    relaunches += 1
                    print(f"[{spec.name}] the training controller was lost ({root_cause(exc)}); "
                          "resuming from the newest checkpoint", flush=True)
                    continue
                raise RunError(root_cause(exc)) from None
        if keeper.lost:
            raise RunError(f"this driver lost the run lease of {run.shown} to {keeper.lost}")
        try:
            summary = run.read_json(run.join(SUMMARY))
        except StorageError as exc:
            raise RunError(f"training finished but its summary cannot be read: {exc}") from None
        if summary is None:
            raise RunError(f"training finished but {run.shown}/{SUMMARY} is missing")
        if summary.get("status") == "failed":
            raise RunError(summary.get("error") or "training failed (see the log)")
        summary["run_url"] = run.shown
        return summary
    finally:
        keeper.release()
