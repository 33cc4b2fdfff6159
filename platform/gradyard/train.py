"""Training under plain torchrun: the same worker as under Ray, no Ray needed (e.g. on a GPU box).

Single node::

    torchrun --standalone --nproc-per-node 2 -m gradyard.train jobs/fashion-cnn.yaml

Several nodes::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HEAD:29500 -m gradyard.train jobs/alexnet.yaml --storage s3://bucket/runs

Add ``--max-restarts N`` to let torchrun's agent restart the workers after a
failure, a detected hang or a preemption: they resume from the newest
checkpoint.  With Ray (the usual way) use ``gradyard run`` or
``ray job submit ... -- python -m gradyard.launch``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """``python -m gradyard.train``; ``callbacks`` are extra training callbacks (tests pass faults here)."""
    from gradyard.checkpoint import LeaseHeld, LeaseKeeper, acquire
    from gradyard.job import JobError, load_job
    from gradyard.storage import DEFAULT, PATIENT, StorageError, redact
    from gradyard.collectives import broadcast
    from gradyard.worker import dist_info, run_directory, run_worker

    p = argparse.ArgumentParser(prog="python -m gradyard.train",
                                description="Train one job under torchrun (see the module docstring).")
    p.add_argument("job", help="job definition (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job key, e.g. --set schedule.epochs=3")
    p.add_argument("--storage", help="put the run directory at URL/<job name>")
    args = p.parse_args(argv)
    info = dist_info("torchrun")
    # A restart by torchrun's agent (after a failure, a hang, a preemption) is not a new driver: the
    # storage was checked at the first start, and an outage now is waited out, not failed fast.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    keeper = None
    try:
        spec = load_job(args.job, args.overrides)
        if info.world_size > 1 and not dist.is_initialized():
            init_process_group("nccl" if spec.scaling.use_gpu and torch.cuda.is_available() else "gloo")
        problem = None
        if info.rank == 0:
            try:
                run = run_directory(spec, args.storage, check=not restarted)
                keeper = LeaseKeeper(acquire(run, purpose="train", policy=PATIENT if restarted else DEFAULT))
            except (JobError, StorageError) as exc:
                problem = str(exc)
        problem = broadcast(problem, info.world_size)
        if problem:
            raise StorageError(problem)
        run = run_directory(spec, args.storage, check=False)
        token = broadcast(keeper.token if keeper else None, info.world_size)
    except (JobError, StorageError, LeaseHeld) as exc:
        if info.rank == 0:
            print(f"error: {redact(exc)}", file=sys.stderr)
        shutdown_process_group()
        return 2
    from gradyard.checkpoint import Preempted, TrainingStopped
    from gradyard.preemption import EXIT_PREEMPTED

    try:
        summary = run_worker({"spec": spec.model_dump(mode="json"), "storage": run.spec(),
                              "launcher": "torchrun", "lease": token, "callbacks": callbacks or []})
        failed = broadcast(summary.get("status") == "failed" if info.rank == 0 else None, info.world_size)
    except TrainingStopped as exc:  # a restart helps (torchrun --max-restarts): say why, no traceback
        print(f"[rank {info.rank}] {redact(exc)}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED if isinstance(exc, Preempted) else 1
    finally:
        if keeper is not None:
            keeper.release()
        shutdown_process_group()
    return 1 if failed else 0


def init_process_group(backend: str) -> None:
    """The default process group, its keys under this attempt's own prefix in the store.

    torchrun's agent keeps one store across the restarts of a worker group (``--standalone``, or an
    agent-hosted store), and the process group's keys carry no attempt: a restarted rank could read a
    dead predecessor's address and wait on it for the whole init timeout.  A prefix per restart
    (``TORCHELASTIC_RESTART_COUNT``) keeps every attempt to its own keys.
    """
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"gradyard/attempt_{attempt}/", store),
                            rank=rank, world_size=world_size)


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
