"""2. Checkpoints of AlexNet-sized state: training blocked per checkpoint, and upload throughput.

State: torchvision AlexNet with 1000 classes (61.1 M parameters) and SGD with
momentum, i.e. ~0.49 GB of model + optimizer state.  One process, one thread
(one worker's share of this machine), real training steps at batch 8.  Each
round:

1. trains 2 steps (the mean step time);
2. checkpoints to local disk and then to S3 (moto) exactly as gradyard's
   CheckpointCallback does on rank 0 (copy state to host memory, hand it to the
   background writer, gradyard.checkpoint.CheckpointStore), timing how long training is blocked, and
   waiting for each write to finish (nothing trains in between, so both
   checkpoints hold the same bytes);
3. uploads the local checkpoint's files with a plain s3fs ``put`` to the same
   endpoint: the checkpoint writer's bytes per second (serialise, sha256,
   upload, manifest, retention) against the put's, in the same round.

It also counts the CPU each background write costs: this process's (the
writer thread and s3fs's event loop; the training thread only waits) and the
S3 server's, with py-spy on the server during the first round's S3 write.
On this machine the S3 server shares the training cores; that CPU is what the
S3 contenders of the throughput benchmark pay for and production storage
does not take.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

from bench.env import BUCKET, Bench
from bench.profile import Spy
from bench.settings import Size
from bench.stats import paired, summary

NAME = "checkpoint"
TITLE = "Checkpoints of AlexNet-sized state"
NEEDS_CLUSTER = False

BATCH = 8
STEPS_PER_ROUND = 2


def _alexnet():
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None, num_classes=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(BATCH, 3, 224, 224)
    y = torch.randint(0, 1000, (BATCH,))

    def step() -> float:
        t0 = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        return time.perf_counter() - t0

    return model, optimizer, step


def _snapshot(model, optimizer, step_no: int):
    """Rank 0's side of gradyard's CheckpointManager save, on one process."""
    from gradyard.checkpoint import Snapshot, to_cpu
    from gradyard.checkpoint.states import rng_state

    files = {"model.pt": to_cpu(model.state_dict()),
             "optimizer.pt": to_cpu(optimizer.state_dict()),
             "state.pt": {"trainer": {"step": step_no}, "rng": [rng_state()], "callbacks": {}}}
    return Snapshot(step=step_no, epoch=0, files=files, manifest={"run_id": "bench"})


class _Store:
    """gradyard's CheckpointStore (what rank 0's manager writes through), with each save's result kept."""

    def __init__(self, storage, keep: int):
        from gradyard.checkpoint import CheckpointStore

        self.results: list = []
        self.store = CheckpointStore(storage, run_id=lambda: "bench", keep=keep)

    def submit(self, snap) -> None:
        from gradyard.checkpoint import SaveResult

        result = SaveResult(step=snap.step)
        self.results.append(result)
        self.store.submit(snap, result)

    def wait(self) -> None:
        self.store.wait()

    def close(self) -> None:
        self.store.close()

    @property
    def seconds(self) -> list[float]:
        return [r.write_s for r in self.results]

    @property
    def failed(self) -> list:
        return [r for r in self.results if r.ok is False]


SMALL_CHECKPOINTS = 10


def _small_state(bench: Bench, local, s3) -> dict:
    """CPU and wall time per checkpoint of fashion-cnn's state (the throughput benchmark's small
    workload), to local disk and to S3, ``keep=3`` as its job keeps: retention runs every time."""
    import torch

    from bench.contenders import Workload
    from bench.scripts.plain_models import build_model

    wl = Workload("fashion-cnn", steps=1, checkpoint_every=1)
    (shape, classes), o = wl.shape(), wl.spec().optimizer
    model = build_model("fashion_cnn", shape, classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    torch.nn.functional.cross_entropy(model(torch.randn(2, *shape)), torch.tensor([0, 1])).backward()
    optimizer.step()
    cpu: dict[str, list[float]] = {"writer_local": [], "writer_s3": [], "s3_server": []}
    wall: dict[str, list[float]] = {"local": [], "s3": []}
    for kind, storage in (("local", local), ("s3", s3)):
        writer = _Store(storage, keep=wl.spec().checkpoint.keep)
        try:
            for i in range(1, SMALL_CHECKPOINTS + 1):
                snap = _snapshot(model, optimizer, i)
                t0, c0, s0 = time.perf_counter(), time.process_time(), bench.s3_cpu_seconds()
                writer.submit(snap)
                writer.wait()
                wall[kind].append(time.perf_counter() - t0)
                cpu[f"writer_{kind}"].append(time.process_time() - c0)
                if kind == "s3":
                    cpu["s3_server"].append(bench.s3_cpu_seconds() - s0)
        finally:
            writer.close()
        if writer.failed:
            raise RuntimeError(f"a small checkpoint failed to write: {writer.failed[0].error}")
    return {"parameters": sum(p.numel() for p in model.parameters()), "checkpoints": SMALL_CHECKPOINTS,
            "keep": wl.spec().checkpoint.keep,
            "cpu_seconds_per_checkpoint": {k: summary(v) for k, v in cpu.items()},
            "write_seconds": {k: summary(v) for k, v in wall.items()}}


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    import s3fs
    import torch

    from gradyard.storage import open_storage

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    writers = {}
    try:
        model, optimizer, step = _alexnet()
        params = sum(p.numel() for p in model.parameters())
        for _ in range(2):  # warm-up; momentum buffers exist from here on
            step()
        storages = {"local": open_storage(str(bench.fresh("ckpt-local"))),
                    "s3": open_storage(f"s3://{BUCKET}/ckpt-bench", endpoint_url=bench.s3.endpoint)}
        writers = {k: _Store(s, keep=1) for k, s in storages.items()}
        plain = s3fs.S3FileSystem(client_kwargs={"endpoint_url": bench.s3.endpoint})
        steps: list[float] = []
        blocked: dict[str, list[float]] = {k: [] for k in storages}
        rates: dict[str, list[float]] = {"checkpoint_writer": [], "s3fs_put": []}
        cpu: dict[str, list[float]] = {"writer_local": [], "writer_s3": [], "s3_server": []}
        server_profile = None
        n, nbytes = 0, 0
        for r in range(size.checkpoint_rounds):
            steps += [step() for _ in range(STEPS_PER_ROUND)]
            n += STEPS_PER_ROUND
            for kind, writer in writers.items():
                spy = Spy(bench.s3.proc.pid, bench.tmp / "s3-server.pyspy") \
                    if kind == "s3" and r == 0 else contextlib.nullcontext()
                with spy:
                    t0 = time.perf_counter()
                    writer.submit(_snapshot(model, optimizer, n))
                    blocked[kind].append(time.perf_counter() - t0)
                    c0, s0 = time.process_time(), bench.s3_cpu_seconds()
                    writer.wait()
                    cpu[f"writer_{kind}"].append(time.process_time() - c0)
                    if kind == "s3":
                        cpu["s3_server"].append(bench.s3_cpu_seconds() - s0)
                if isinstance(spy, Spy):
                    server_profile = spy.result
            local_dir = storages["local"].join("checkpoints", writers["local"].results[-1].name)
            nbytes = sum(storages["local"].fs.du(local_dir, total=False).values())
            rates["checkpoint_writer"].append(nbytes / writers["s3"].seconds[-1])
            target = f"{BUCKET}/s3fs-put/round-{r}"
            t0 = time.perf_counter()
            plain.put(local_dir + "/", target + "/", recursive=True)
            rates["s3fs_put"].append(nbytes / (time.perf_counter() - t0))
            plain.rm(target, recursive=True)
            say(f"  checkpoint round {r + 1}/{size.checkpoint_rounds}: blocked "
                f"{blocked['local'][-1]:.3f}s local, {blocked['s3'][-1]:.3f}s S3; S3 writer "
                f"{rates['checkpoint_writer'][-1] / 1e6:.0f} MB/s, s3fs put {rates['s3fs_put'][-1] / 1e6:.0f} MB/s")
        if any(w.failed for w in writers.values()):
            raise RuntimeError("a checkpoint failed to write")
        small = _small_state(bench, storages["local"].child("small"),
                             open_storage(f"s3://{BUCKET}/ckpt-bench-small", endpoint_url=bench.s3.endpoint))
        say(f"  fashion-cnn-sized checkpoints: {small['cpu_seconds_per_checkpoint']}")
        mean_step = sum(steps) / len(steps)
        by_storage = {kind: {"blocked_seconds": summary(v),
                             "blocked_over_mean_step": summary([b / mean_step for b in v]),
                             "background_write_seconds": summary(writers[kind].seconds)}
                      for kind, v in blocked.items()}
        return {"parameters": params, "checkpoint_bytes": nbytes, "batch": BATCH, "threads": 1,
                "cpu_seconds_per_checkpoint": {k: summary(v) for k, v in cpu.items()},
                "s3_server_profile": server_profile, "small_state": small,
                "step_seconds": summary(steps), "by_storage": by_storage,
                "upload": {"bytes": nbytes, "bytes_per_second": {k: summary(v) for k, v in rates.items()},
                           "ratio": summary(paired(rates["checkpoint_writer"], rates["s3fs_put"])),
                           "commands": {
                               "s3fs_put": "s3fs.S3FileSystem(client_kwargs={'endpoint_url': $S3_ENDPOINT})"
                                           ".put('<local checkpoint>/', 'gradyard-bench/s3fs-put/round-N/', "
                                           "recursive=True)",
                               "checkpoint_writer": "gradyard.checkpoint.CheckpointStore(open_storage("
                                                    "'s3://gradyard-bench/ckpt-bench', endpoint_url="
                                                    "$S3_ENDPOINT), keep=1).submit(snapshot, result); .wait()"}}}
    finally:
        for w in writers.values():
            w.close()
        torch.set_num_threads(threads)
