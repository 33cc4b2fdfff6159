"""Driver side of a run: prepare storage, hand the job to Ray Train, read the summary back."""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from gradyard.job import JobError, JobSpec
from gradyard.storage import Storage, StorageError, check_storage, open_storage, redact

log = logging.getLogger("gradyard")


class RunError(Exception):
    """Training failed; the message is the root cause, without Ray's tracebacks."""


def prepare_run(spec: JobSpec, storage_url: Optional[str] = None, fresh: bool = False,
                check: bool = True) -> Storage:
    """The run directory ``<storage>/<job name>``, checked writable before any worker starts."""
    base = open_storage(storage_url or spec.storage.url, spec.storage.endpoint_url, spec.storage.region)
    if check:
        check_storage(base)
    run = base.child(spec.name)
    if fresh:
        for name in ("checkpoints", "summary.json", "attempts.json", "analysis", "telemetry"):
            path = run.join(name)
            if run.fs.exists(path):
                run.fs.rm(path, recursive=True)
                print(f"--fresh: removed {redact(run.url)}/{name}", flush=True)
    return run


def preflight_data(spec: JobSpec) -> None:
    """A missing dataset fails here, naming the job key, before any worker starts."""
    if not spec.data.is_url:
        return
    try:
        src = open_storage(spec.data.source, spec.storage.endpoint_url, spec.storage.region)
        present = src.fs.exists(src.root_path)
    except StorageError:
        present = False
    except Exception:  # noqa: BLE001 - unreachable storage reads as "not there"
        present = False
    if not present:
        raise JobError(
            f"data.source: nothing at {redact(spec.data.source)} (format {spec.data.format}). "
            "Point data.source at a local or object-storage copy of the dataset, "
            "or run with --set data.source=synthetic")
    if spec.model.pretrained:
        w = open_storage(spec.model.pretrained, spec.storage.endpoint_url, spec.storage.region)
        if not w.fs.exists(w.root_path):
            raise JobError(f"model.pretrained: no weights at {redact(spec.model.pretrained)}; "
                           "point it at a local or object-storage copy (nothing is downloaded)")


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
            fresh: bool = False, on_cluster: bool = False, faults: Optional[dict] = None) -> dict:
    """Train ``spec`` on Ray Train and return the run's summary."""
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from gradyard.train import run_worker

    # Ray Train re-routes worker print() through its logger, which also echoes
    # to stdout: each progress line would show twice.  Propagated to workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    run = prepare_run(spec, storage_url, fresh=fresh)
    preflight_data(spec)
    base = open_storage(storage_url or spec.storage.url, spec.storage.endpoint_url, spec.storage.region)
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        elif on_cluster:
            ray.init(log_to_driver=True)  # inside `ray job submit`: the job's own cluster
        else:
            # An embedded cluster; never attach to whatever this machine ran last.
            # The dashboard serves Ray's state API, which Ray Train's
            # placement-group cleaner polls; loopback only.
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                     log_to_driver=True)

    def make_trainer() -> TorchTrainer:
        return TorchTrainer(
            run_worker,
            train_loop_config={"spec": spec.model_dump(mode="json"), "storage": run.spec(),
                               "launcher": "ray",
                               # Test-only fault injection (see gradyard.testing.faults).
                               "faults": faults or json.loads(os.environ.get("GRADYARD_FAULTS", "null"))},
            scaling_config=scaling_config(spec),
            run_config=RunConfig(
                name=spec.name,
                storage_path=base.root_path,
                storage_filesystem=base.to_pyarrow(),
                failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            ),
        )

    print(f"[{spec.name}] training on Ray: {spec.scaling.num_workers} worker(s), run directory "
          f"{redact(run.url)}", flush=True)
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
    try:
        with run.fs.open(run.join("summary.json"), "rb") as f:
            summary = json.loads(f.read())
        summary["run_url"] = redact(run.url)
        return summary
    except FileNotFoundError:
        raise RunError(f"training finished but {redact(run.url)}/summary.json is missing") from None
