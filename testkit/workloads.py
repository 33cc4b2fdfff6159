"""Reference workloads whose regime is known, for tests and for checking a device.

Each returns a :class:`~gradyard.analysis.probe.Workload` sized for the
device type (CPU sizes keep a 2-core machine under a second per step).  Test
support, outside the installed package: the same code runs in the CPU tests,
the CUDA test and a 2-process gloo job.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Optional

import torch
from torch import nn

from gradyard.analysis.probe import Workload, probe


def _dev(device: Optional[str]) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def matmul(n: Optional[int] = None, device: Optional[str] = None, dtype: torch.dtype = torch.float32) -> Workload:
    """Compute-bound: one large square matmul per step."""
    dev = _dev(device)
    n = n or (4096 if dev.type == "cuda" else 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    return Workload(data=lambda: (a, b), forward=lambda ab: torch.mm(ab[0], ab[1], out=out), device=dev.type,
                    batch_size=n)


def elementwise_chain(nbytes: Optional[int] = None, pairs: int = 10, device: Optional[str] = None) -> Workload:
    """Memory-bound: a chain of multiply/add over a large tensor (1 FLOP per 8 bytes moved).

    Results go to preallocated buffers (``out=``), as a caching allocator would
    give them, so the chain measures bandwidth rather than page faults.
    """
    dev = _dev(device)
    nbytes = nbytes or ((256 if dev.type == "cuda" else 64) * 2 ** 20)
    x = torch.rand(nbytes // 4, device=dev)
    y = torch.empty_like(x)

    def chain(_batch: object) -> torch.Tensor:
        for _ in range(pairs):
            torch.mul(x, 1.0001, out=y)
            torch.add(y, -0.0001, out=x)
        return x

    return Workload(data=lambda: None, forward=chain, device=dev.type)


def tiny_ops(ops: int = 2000, size: int = 8, device: Optional[str] = None) -> Workload:
    """Overhead-bound: thousands of elementwise ops on tensors of a few elements."""
    dev = _dev(device)
    t = torch.ones(size, device=dev)

    def many(_batch: object) -> torch.Tensor:
        z = t
        for i in range(ops):
            z = z * 1.0001 if i % 2 else z + 0.5
        return z

    return Workload(data=lambda: None, forward=many, device=dev.type, batch_size=size)


class _SleepyDataset(torch.utils.data.Dataset):
    def __init__(self, sleep_s: float, shape: tuple[int, ...]):
        self.sleep_s, self.shape = sleep_s, shape

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.sleep_s)  # a slow decoder / remote read
        return torch.ones(self.shape)


def sleepy_loader(sleep_s: float = 0.03, batch: int = 4, device: Optional[str] = None) -> Workload:
    """Input-bound: a DataLoader (no workers) whose batches take ``sleep_s`` each, and a small matmul."""
    dev = _dev(device)
    # batch_size=None: each dataset item is a whole batch, so each batch sleeps sleep_s.
    loader = iter(torch.utils.data.DataLoader(_SleepyDataset(sleep_s, (batch, 256)), batch_size=None))
    w = torch.randn(256, 256, device=dev)
    return Workload(data=lambda: next(loader).to(dev), forward=lambda x: (x @ w).sum(), device=dev.type,
                    batch_size=batch)


class OneBigParameter(nn.Module):
    """A model that is all gradient and no compute: one huge parameter, summed."""

    def __init__(self, numel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(numel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.sum() * x


def allreduce_heavy(ddp_model: nn.Module, device: Optional[str] = None) -> Workload:
    """Communication-bound under DDP: every step allreduces the whole (huge) gradient."""
    dev = _dev(device)
    x = torch.ones((), device=dev)
    # zero_grad(set_to_none) before each backward, as the trainer does, so a step with and
    # one without the allreduce do the same gradient work.
    return Workload(data=lambda: x, forward=ddp_model, backward=lambda loss: loss.backward(),
                    optimizer=lambda: ddp_model.zero_grad(set_to_none=True), no_sync=ddp_model.no_sync,
                    device=dev.type)


def ddp_comm_probe(rank: int, world_size: int, port: int, numel: int, out_path: str, threads: int = 1) -> None:
    """One rank of a gloo job on 127.0.0.1: allreduce bus bandwidth, then a probe of :func:`allreduce_heavy`.

    Rank 0 writes ``{"busbw": ..., "record": StepRecord.to_dict()}`` to ``out_path``.
    Meant for ``torch.multiprocessing.spawn(ddp_comm_probe, args=(world, port, numel, path), nprocs=world)``.
    """
    import torch.distributed as dist

    from gradyard.analysis.calibrate import measure_allreduce_busbw

    torch.set_num_threads(threads)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        busbw = measure_allreduce_busbw(nbytes=numel * 4, quick=True)
        model = nn.parallel.DistributedDataParallel(OneBigParameter(numel))
        record = probe(allreduce_heavy(model, "cpu"), steps=3, warmup=1)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"busbw": busbw, "record": record.to_dict()}, f)
    finally:
        dist.destroy_process_group()


def trainer_census_cycles(rank: int, world_size: int, port: int, job: str, overrides: list[str],
                          cycles: int, out_dir: str, threads: int = 1) -> None:
    """One rank of a gloo job on 127.0.0.1 training ``job`` with the real Trainer, the gradient-sync
    telemetry (the step timer's comm clock) and the live analysis repeated every few steps.

    Rank 0 writes each cycle's ``analysis/step.json`` as ``<out_dir>/cycle-<n>.json``: ``cycles``
    independent verdicts of one run (every cycle times, counts and profiles steps of its own).
    Meant for ``torch.multiprocessing.spawn(trainer_census_cycles, args=(...), nprocs=world_size)``.
    """
    import torch.distributed as dist

    from gradyard.analysis.callback import CensusCallback
    from gradyard.job import load_job
    from gradyard.steptime import CENSUS_AFTER_STEPS, CENSUS_AT_STEP, CENSUS_TIMING_STEPS
    from gradyard.storage import open_storage
    from gradyard.telemetry.comm import GradSyncMonitor
    from gradyard.telemetry.metrics import TelemetryMetrics
    from gradyard.trainer import DistInfo, Trainer

    torch.set_num_threads(threads)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        every = CENSUS_TIMING_STEPS + 2 + CENSUS_AFTER_STEPS
        steps = CENSUS_AT_STEP + every * cycles + 2
        spec = load_job(job, [*overrides, "schedule.epochs=null", f"schedule.steps={steps}",
                              "checkpoint.every_steps=100000"])
        written: list[int] = []

        def sink(record) -> None:
            if rank == 0:
                with open(os.path.join(out_dir, f"cycle-{len(written)}.json"), "w") as f:
                    json.dump(record.to_dict(), f)
                written.append(record.step)

        callbacks = [GradSyncMonitor(TelemetryMetrics()),
                     CensusCallback(every=every, sink=sink, batch_size=spec.data.batch_size, profile_ops=False,
                                    measure_allreduce=True)]
        storage = open_storage(f"file://{os.path.join(out_dir, 'run')}")
        Trainer(spec, storage, DistInfo(rank=rank, world_size=world_size), spec.name, callbacks).fit()
    finally:
        from gradyard.train import shutdown_process_group

        shutdown_process_group()  # the DDP reducer collected first, as the torchrun entry does
