"""What every training worker runs, under Ray Train or plain torchrun: build, resume, train, report.

``run_worker(config)`` is Ray Train's ``train_loop_per_worker`` and the body of
``python -m gradyard.train`` under torchrun.  ``config`` is plain data: the
job spec, the run directory's storage spec, the launcher, the run lease's
token, and (tests only) extra callbacks, passed in explicitly.

A run that stops on purpose and cannot be helped by a restart (a non-finite
loss, a final checkpoint that cannot be written) returns normally with
``status: failed`` in ``summary.json``, so Ray Train does not retry it; the
driver turns that into an error and a non-zero exit.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import time
from typing import Optional

import torch

from gradyard.callbacks import ProgressCallback
from gradyard.checkpoint import CheckpointManager, TrainingStopped, record_start, resume, tensor_digest
from gradyard.checkpoint.manager import redacted_spec
from gradyard.collectives import broadcast, gather
from gradyard.events import Callback, Event
from gradyard.hostmem import tune_host_allocator
from gradyard.job import JobSpec
from gradyard.preemption import PreemptionNotice
from gradyard.storage import Storage, check_storage, open_storage, redact, storage_from_spec
from gradyard.storage.urls import ALLOWED
from gradyard.storage.urls import problem as url_problem
from gradyard.trainer import DistInfo, Trainer
from gradyard.watchdog import HangWatchdog

log = logging.getLogger("gradyard")

SUMMARY = "summary.json"


def dist_info(launcher: str) -> DistInfo:
    if launcher == "ray":
        import ray
        import ray.train

        ctx = ray.train.get_context()
        return DistInfo(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                        local_rank=ctx.get_local_rank(),
                        node=ray.get_runtime_context().get_node_id(),
                        node_ip=ray.util.get_node_ip_address())
    env = os.environ
    return DistInfo(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                    local_rank=int(env.get("LOCAL_RANK", 0)), node=socket.gethostname(),
                    node_ip=env.get("GRADYARD_NODE_IP", "127.0.0.1"))


def run_directory(spec: JobSpec, storage_url: Optional[str] = None, check: bool = True) -> Storage:
    """The run directory ``<storage>/<job name>``; ``check`` first proves the storage writable."""
    if storage_url is not None and url_problem(storage_url):
        from gradyard.job import JobError

        raise JobError(f"--storage: {url_problem(storage_url)} (allowed: {ALLOWED})")
    base = open_storage(storage_url or spec.storage.url, spec.storage.endpoint_url, spec.storage.region)
    if check:
        check_storage(base)
    return base.child(spec.name)


class RayReportCallback(Callback):
    """Reports the final metrics to Ray Train (every rank calls report).

    Once, at the end: each ``ray.train.report`` is a barrier across the worker
    group through Ray Train's controller, which costs about a second a call.
    Live metrics go to Prometheus instead.
    """

    name = "ray_report"
    events = frozenset((Event.FIT_END,))

    def on_event(self, event: Event, state) -> None:
        import ray.train

        ray.train.report({k: v for k, v in state.metrics.items() if isinstance(v, (int, float))})


def build_callbacks(spec: JobSpec, storage: Storage, info: DistInfo, launcher: str,
                    extra: Optional[list[Callback]] = None, metrics_host: Optional[str] = None) -> list[Callback]:
    """Progress, telemetry, analysis, the caller's extra callbacks, Ray's report, in firing order."""
    cbs: list[Callback] = [ProgressCallback()]
    if spec.telemetry.enabled:
        from gradyard.analysis.live import live_analysis
        from gradyard.telemetry import TelemetryMetrics, build_telemetry_callbacks

        host = metrics_host or (info.node_ip if launcher == "ray" else None)
        metrics = TelemetryMetrics()
        cbs.extend(build_telemetry_callbacks(spec, metrics=metrics, host=host,
                                             peak_profile=_device_profile(spec, info)))
        # Both read the trainer's step timer; the verdict goes to the metrics' regime series.
        from gradyard.checkpoint.manager import redacted_spec

        cbs.append(live_analysis(storage, info.rank, regime=metrics, batch_size=spec.data.batch_size,
                                 profile_ops=spec.telemetry.profile_ops, job=redacted_spec(spec)))
    cbs.extend(extra or [])
    if launcher == "ray":
        cbs.append(RayReportCallback())
    return cbs


def _device_profile(spec: JobSpec, info: DistInfo):
    """This worker's calibrated device profile: MFU is measured against it (cached per device)."""
    from gradyard.analysis.calibrate import load_or_calibrate

    use_cuda = spec.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    try:
        return load_or_calibrate(device, quick=True)
    except Exception as exc:  # noqa: BLE001 - no calibration means no MFU, not no training
        log.warning("device calibration failed (%s); MFU will use published peaks only", exc)
        return None


def run_worker(config: dict) -> dict:
    """Body of every training worker (see the module docstring)."""
    t_start = time.time()
    launcher = config.get("launcher", "torchrun")
    if launcher == "ray":
        # Ray Train's worker logging already prints the root logger; adding
        # a handler here would print every line twice.
        logging.getLogger("gradyard").setLevel(logging.INFO)
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host_allocator = tune_host_allocator()  # before anything allocates (see gradyard.hostmem)
    spec = JobSpec.model_validate(config["spec"])
    storage = storage_from_spec(config["storage"])
    info = dist_info(launcher)
    name = spec.name

    def say(message: str) -> None:
        print(f"[{name}] {redact(message)}", flush=True)

    record = broadcast(record_start(storage, say=say) if info.rank == 0 else None, info.world_size)
    preemption = PreemptionNotice(spec.failure.preemption_grace_s)
    preemption.install(launcher)
    manager = CheckpointManager(spec, storage, rank=info.rank, world_size=info.world_size, record=record,
                                lease_token=config.get("lease"), preemption=preemption)
    callbacks = build_callbacks(spec, storage, info, launcher, config.get("callbacks"), config.get("metrics_host"))
    trainer = Trainer(spec, storage, info, record.run_id, callbacks, checkpointer=manager)
    s = trainer.state
    s.restarts = record.restarts
    watchdog = None
    if spec.failure.hang_timeout_s:
        watchdog = HangWatchdog(s.progress, rank=info.rank, world_size=info.world_size,
                                key=f"gradyard/hb/{record.run_id}/{record.attempt}", name=name,
                                floor_s=spec.failure.hang_timeout_s, factor=spec.failure.hang_factor).start()
    status, error, stopped = "succeeded", "", None
    try:
        resumed = resume(manager, say=say if info.rank == 0 else (lambda m: None))
        s.run_id = record.run_id  # resume may have adopted a checkpoint's lineage
        if resumed is not None and info.rank == 0:
            say(f"resumed from checkpoint at step {resumed.step} (epoch {s.epoch}, "
                f"{s.consumed_in_epoch} samples into it)")
        trainer.fit()
    except TrainingStopped as exc:
        if exc.retry:
            raise
        status, error, stopped = "failed", redact(str(exc)), exc
        if info.rank == 0:
            say(f"error: {error}")
    finally:
        preemption.finished()
        if watchdog is not None:
            watchdog.close()
    ranks = gather({"rank": info.rank, "node": info.node, "node_ip": info.node_ip,
                     "hostname": socket.gethostname(), "device": str(s.device), "pid": os.getpid()},
                    info.world_size)
    if info.rank != 0:
        return {}
    summary = {
        "job": name,
        "status": status,
        "error": error,
        "spec": redacted_spec(spec),
        "spec_hash": spec.spec_hash(),
        "run_id": record.run_id,
        "data": {"source": redact(spec.data.source), "name": trainer.info.name,
                 "synthetic": bool(trainer.info.synthetic)},
        "model": spec.model.arch,
        "world_size": s.world_size,
        "steps": s.step,
        "epochs": s.epoch,
        "metrics": {k: v for k, v in s.metrics.items() if isinstance(v, (int, float))},
        "history": trainer.history,
        "restarts": s.restarts,
        "resumed_from_step": manager.resumed.step if manager.resumed else None,
        "skipped_steps": s.skipped_steps,
        "observer_errors": dict(s.observer_errors),
        "host_allocator": host_allocator,
        "started_at": _dt.datetime.fromtimestamp(record.started_at).isoformat(),
        "finished_at": _dt.datetime.now().isoformat(),
        "wall_seconds": round(time.time() - record.started_at, 3),
        "attempt_wall_seconds": round(time.time() - t_start, 3),
        # This attempt's: time.time() of its first step's end, and its rate after
        # steptime.STEADY_AFTER_STEPS steps (checkpoint stalls included).
        "first_step_at": trainer.timer.first_step_at,
        "steady_steps_per_second": trainer.timer.steady_steps_per_second(),
        "model_sha256": tensor_digest(s.model.state_dict()),
        "optimizer_sha256": tensor_digest(s.optimizer.state_dict()),
        "checkpoints": manager.stats.to_json(),
        "ranks": ranks,
    }
    try:
        storage.write_json(storage.join(SUMMARY), summary)
    except Exception:
        if stopped is not None:  # the storage that refused the checkpoint refuses the summary too:
            raise stopped from None  # the run's own error is the news
        raise
    if status == "succeeded":
        say(f"done: {json.dumps(summary['metrics'], sort_keys=True)}")
    return summary
