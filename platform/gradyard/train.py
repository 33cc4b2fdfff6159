"""What every training worker runs: under Ray Train, or under plain torchrun.

Single node, no Ray (e.g. on a GPU box where Ray is not installed)::

    torchrun --standalone --nproc-per-node 2 -m gradyard.train jobs/fashion-cnn.yaml

Several nodes with torchrun::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HEAD:29500 -m gradyard.train jobs/alexnet.yaml --storage s3://bucket/runs

With Ray (the usual way) use ``gradyard run`` or ``ray job submit ... -- python -m gradyard.launch``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import socket
import sys
import time
import uuid

import torch
import torch.distributed as dist

from gradyard.callbacks import CheckpointCallback, ProgressCallback
from gradyard.checkpoint import load_checkpoint, newest_complete, tensor_digest
from gradyard.events import Callback, Event
from gradyard.hostmem import tune_host_allocator
from gradyard.job import JobSpec
from gradyard.storage import Storage, storage_from_spec, with_retries
from gradyard.trainer import DistInfo, Trainer, set_rng_state

log = logging.getLogger("gradyard")


def _dist_info(launcher: str) -> DistInfo:
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


def _broadcast(obj, rank: int, world_size: int):
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        box = [obj if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _gather(obj, world_size: int) -> list:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        out: list = [None] * world_size
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _read_json(storage: Storage, name: str) -> dict | None:
    def get():
        with storage.fs.open(storage.join(name), "rb") as f:
            return json.loads(f.read())

    try:
        return with_retries(get, what=f"read {name}", attempts=8, log=log.warning)
    except FileNotFoundError:
        return None


def _write_json(storage: Storage, name: str, data: dict) -> None:
    blob = json.dumps(data, indent=2, sort_keys=True).encode()

    def put():
        with storage.fs.open(storage.join(name), "wb") as f:
            f.write(blob)

    with_retries(put, what=f"write {name}", attempts=8, log=log.warning)


def _record_attempt(storage: Storage) -> dict:
    """Count worker-group starts for this run directory (restarts = starts - 1).

    ``start_times`` lists when each start began (``time.time()`` on rank 0),
    so a run's restarts can be timed against its logs.
    """
    now = time.time()
    rec = _read_json(storage, "attempts.json") or {
        "run_id": uuid.uuid4().hex[:12], "starts": 0, "started_at": now}
    rec["starts"] += 1
    rec["last_start"] = now
    rec["start_times"] = [*rec.get("start_times", []), now][-100:]
    _write_json(storage, "attempts.json", rec)
    return rec


class RayReportCallback(Callback):
    """Reports the final metrics to Ray Train (every rank calls report).

    Once, at the end: each ``ray.train.report`` is a barrier across the
    worker group through Ray Train's controller, which costs about a second
    (measured: 25 epochs of circles took 50 s reporting every epoch, 5.5 s
    without).  Live metrics go to Prometheus instead.
    """

    name = "ray_report"

    def on_event(self, event: Event, state) -> None:
        if event is Event.FIT_END:
            import ray.train

            ray.train.report({k: v for k, v in state.metrics.items()
                              if isinstance(v, (int, float))})


def build_callbacks(spec: JobSpec, storage: Storage, info: DistInfo, launcher: str,
                    faults: dict | None = None) -> list[Callback]:
    """Progress, telemetry, checkpoints, analysis (and test faults), in firing order.

    Telemetry comes before checkpointing so a checkpoint's stall is not booked
    as step time (it has its own metric).
    """
    cbs: list[Callback] = [ProgressCallback()]
    metrics = timer = None
    if spec.telemetry.enabled:
        from gradyard.telemetry import StepTimer, build_telemetry_callbacks, find_metrics

        telemetry = build_telemetry_callbacks(spec, host=info.node_ip if launcher == "ray" else None,
                                              peak_profile=_device_profile(spec, info))
        cbs.extend(telemetry)
        metrics = find_metrics(telemetry)
        timer = next((cb for cb in telemetry if isinstance(cb, StepTimer)), None)
    cbs.append(CheckpointCallback(storage, spec, info.rank))
    if spec.telemetry.enabled:
        from gradyard.analysis.live import live_analysis

        cbs.append(live_analysis(storage, info.rank, metrics=metrics, timer=timer,
                                 batch_size=spec.data.batch_size,
                                 profile_ops=spec.telemetry.profile_ops))
    if faults:  # tests and benchmarks only
        from gradyard.testing.faults import build_fault_callbacks

        cbs.extend(build_fault_callbacks(faults))
    if launcher == "ray":
        cbs.append(RayReportCallback())
    return cbs


def _device_profile(spec: JobSpec, info: DistInfo):
    """This worker's calibrated device profile: MFU is measured against it.

    Cached per device (and CPU thread count); the first run on a device pays a
    quick calibration (about a second) before training starts.
    """
    from gradyard.analysis.calibrate import load_or_calibrate

    use_cuda = spec.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    try:
        return load_or_calibrate(device, quick=True)
    except Exception as exc:  # noqa: BLE001 - no calibration means no MFU, not no training
        log.warning("device calibration failed (%s); MFU will use published peaks only", exc)
        return None


def _resume(trainer: Trainer, storage: Storage) -> int | None:
    s = trainer.state
    chosen = None
    if s.rank == 0:
        info = newest_complete(storage, say=lambda m: print(f"[{s.spec.name}] {m}", flush=True))
        chosen = info
    chosen = _broadcast(chosen, s.rank, s.world_size)
    if chosen is None:
        return None
    loaded = load_checkpoint(storage, chosen)
    s.model.load_state_dict(loaded["model.pt"])
    s.optimizer.load_state_dict(loaded["optimizer.pt"])
    state = loaded["state.pt"]
    trainer.load_state_dict(state["trainer"])
    rngs = state["rng"]
    if len(rngs) == s.world_size and state["trainer"].get("world_size") == s.world_size:
        set_rng_state(rngs[s.rank])
    else:
        # Elastic resize: no saved stream for this rank; derive one deterministically.
        torch.manual_seed(s.spec.schedule.seed + 1_000 * s.step + s.rank)
    if s.rank == 0:
        print(f"[{s.spec.name}] resumed from checkpoint at step {chosen.step} "
              f"(epoch {s.epoch}, {s.consumed_in_epoch} samples into it)", flush=True)
    return chosen.step


def run_worker(config: dict) -> dict:
    """Body of every training worker; ``config`` is plain data (spec, storage, launcher)."""
    t_start = time.time()
    launcher = config.get("launcher", "torchrun")
    if launcher == "ray":
        # Ray Train's worker logging already prints the root logger; adding
        # a handler here would print every line twice.
        logging.getLogger("gradyard").setLevel(logging.INFO)
    else:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Before the model, data and trainer allocate anything (see gradyard.hostmem).
    host_allocator = tune_host_allocator()
    spec = JobSpec.model_validate(config["spec"])
    storage = storage_from_spec(config["storage"])
    info = _dist_info(launcher)
    attempt = _record_attempt(storage) if info.rank == 0 else None
    attempt = _broadcast(attempt, info.rank, info.world_size)
    callbacks = build_callbacks(spec, storage, info, launcher, config.get("faults"))
    trainer = Trainer(spec, storage, info, attempt["run_id"], callbacks)
    trainer.state.restarts = attempt["starts"] - 1
    resumed_from = _resume(trainer, storage)
    trainer.fit()
    s = trainer.state
    ranks = _gather({"rank": info.rank, "node": info.node, "node_ip": info.node_ip,
                     "hostname": socket.gethostname(), "device": str(s.device),
                     "pid": os.getpid()}, info.world_size)
    summary = {}
    if info.rank == 0:
        blocked = s.checkpoint_stats["blocked_seconds"]
        summary = {
            "job": spec.name,
            "spec_hash": spec.spec_hash(),
            "run_id": s.run_id,
            "data": {"source": spec.data.source, "name": trainer.info.name,
                     "synthetic": bool(trainer.info.synthetic)},
            "model": spec.model.arch,
            "world_size": s.world_size,
            "steps": s.step,
            "epochs": s.epoch,
            "metrics": {k: v for k, v in s.metrics.items() if isinstance(v, (int, float))},
            "history": trainer.history,
            "restarts": s.restarts,
            "resumed_from_step": resumed_from,
            "host_allocator": host_allocator,
            "started_at": _dt.datetime.fromtimestamp(attempt["started_at"]).isoformat(),
            "finished_at": _dt.datetime.now().isoformat(),
            "wall_seconds": round(time.time() - attempt["started_at"], 3),
            "attempt_wall_seconds": round(time.time() - t_start, 3),
            # This attempt's: time.time() of its first step's end, and its rate after
            # trainer.STEADY_AFTER_STEPS steps (checkpoint stalls included).
            "first_step_at": trainer.clock.first_step_at,
            "steady_steps_per_second": trainer.clock.steady_steps_per_second(),
            "model_sha256": tensor_digest(s.model.state_dict()),
            "optimizer_sha256": tensor_digest(s.optimizer.state_dict()),
            "checkpoints": {
                "blocked_seconds": blocked,
                "blocked_seconds_mean": sum(blocked) / len(blocked) if blocked else 0.0,
                "blocked_seconds_max": max(blocked) if blocked else 0.0,
                "saved_total": s.checkpoint_stats["saved_total"],
                "failures_total": s.checkpoint_stats["failures_total"],
            },
            "ranks": ranks,
        }
        summary.update(s.extra_labels.get("summary", {}))
        _write_json(storage, "summary.json", summary)
        print(f"[{spec.name}] done: {json.dumps(summary['metrics'], sort_keys=True)}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point under torchrun: ``torchrun ... -m gradyard.train JOB.yaml``."""
    from gradyard.job import JobError, load_job
    from gradyard.runner import prepare_run
    from gradyard.storage import StorageError

    p = argparse.ArgumentParser(prog="python -m gradyard.train")
    p.add_argument("job")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--storage")
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        spec = load_job(args.job, args.overrides)
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if spec.scaling.use_gpu and torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        run = prepare_run(spec, args.storage, fresh=False, check=(rank == 0))
    except (JobError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run_worker({"spec": spec.model_dump(mode="json"), "storage": run.spec(),
                    "launcher": "torchrun"})
    finally:
        shutdown_process_group()
    return 0


def shutdown_process_group() -> None:
    """End a torchrun worker's process group once its trainers are dropped.

    A trainer's DDP wrapper sits in reference cycles (callbacks and hooks hold
    its state); left to interpreter shutdown, its reducer outlived the process
    group and the process aborted ("terminate called without an active
    exception") after a finished run, 2-3 times in 10.  Collect it first, and
    let every rank get here.
    """
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
