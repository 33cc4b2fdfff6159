"""2. Checkpoints of AlexNet-sized state: training blocked per checkpoint, and upload throughput.

State: torchvision AlexNet with 1000 classes (61.1 M parameters) and SGD with
momentum, i.e. ~0.49 GB of model + optimizer state.  One process, one thread
(one worker's share of this machine), real training steps at batch 8.  Each
round:

1. trains 2 steps (the mean step time);
2. checkpoints to local disk and then to S3 (moto) exactly as gradyard's
   CheckpointCallback does on rank 0 (copy state to host memory, hand it to the
   background CheckpointWriter), timing how long training is blocked, and
   waiting for each write to finish (nothing trains in between, so both
   checkpoints hold the same bytes);
3. uploads the local checkpoint's files with a plain s3fs ``put`` to the same
   endpoint: the CheckpointWriter's bytes per second (serialise, sha256,
   upload, manifest, retention) against the put's, in the same round.
"""

from __future__ import annotations

import time
from typing import Callable

from bench.env import BUCKET, Bench
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
    """Rank 0's side of gradyard.callbacks.CheckpointCallback.save, on one process."""
    from gradyard.checkpoint import Snapshot, to_cpu
    from gradyard.trainer import rng_state

    files = {"model.pt": to_cpu(model.state_dict()),
             "optimizer.pt": to_cpu(optimizer.state_dict()),
             "state.pt": {"trainer": {"step": step_no}, "rng": [rng_state()]}}
    return Snapshot(step=step_no, epoch=0, files=files, metrics={}, spec_hash="bench")


class _Timed:
    """on_done hook of a CheckpointWriter: seconds each snapshot took in the background."""

    def __init__(self):
        self.seconds: list[float] = []
        self.ok: list[bool] = []

    def __call__(self, snap, ok: bool, seconds: float) -> None:
        self.ok.append(ok)
        self.seconds.append(seconds)


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    import s3fs
    import torch

    from gradyard.checkpoint import CheckpointWriter, checkpoint_dirname
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
        timers = {k: _Timed() for k in storages}
        writers = {k: CheckpointWriter(s, keep=1, on_done=timers[k]) for k, s in storages.items()}
        plain = s3fs.S3FileSystem(client_kwargs={"endpoint_url": bench.s3.endpoint})
        steps: list[float] = []
        blocked: dict[str, list[float]] = {k: [] for k in storages}
        rates: dict[str, list[float]] = {"checkpoint_writer": [], "s3fs_put": []}
        n, nbytes = 0, 0
        for r in range(size.checkpoint_rounds):
            steps += [step() for _ in range(STEPS_PER_ROUND)]
            n += STEPS_PER_ROUND
            for kind, writer in writers.items():
                t0 = time.perf_counter()
                writer.submit(_snapshot(model, optimizer, n))
                blocked[kind].append(time.perf_counter() - t0)
                writer.wait()
            local_dir = storages["local"].join("checkpoints", checkpoint_dirname(n))
            nbytes = sum(storages["local"].fs.du(local_dir, total=False).values())
            rates["checkpoint_writer"].append(nbytes / timers["s3"].seconds[-1])
            target = f"{BUCKET}/s3fs-put/round-{r}"
            t0 = time.perf_counter()
            plain.put(local_dir + "/", target + "/", recursive=True)
            rates["s3fs_put"].append(nbytes / (time.perf_counter() - t0))
            plain.rm(target, recursive=True)
            say(f"  checkpoint round {r + 1}/{size.checkpoint_rounds}: blocked "
                f"{blocked['local'][-1]:.3f}s local, {blocked['s3'][-1]:.3f}s S3; S3 writer "
                f"{rates['checkpoint_writer'][-1] / 1e6:.0f} MB/s, s3fs put {rates['s3fs_put'][-1] / 1e6:.0f} MB/s")
        if not all(all(t.ok) for t in timers.values()):
            raise RuntimeError("a checkpoint failed to write")
        mean_step = sum(steps) / len(steps)
        by_storage = {kind: {"blocked_seconds": summary(v),
                             "blocked_over_mean_step": summary([b / mean_step for b in v]),
                             "background_write_seconds": summary(timers[kind].seconds)}
                      for kind, v in blocked.items()}
        return {"parameters": params, "checkpoint_bytes": nbytes, "batch": BATCH, "threads": 1,
                "step_seconds": summary(steps), "by_storage": by_storage,
                "upload": {"bytes": nbytes, "bytes_per_second": {k: summary(v) for k, v in rates.items()},
                           "ratio": summary(paired(rates["checkpoint_writer"], rates["s3fs_put"])),
                           "commands": {
                               "s3fs_put": "s3fs.S3FileSystem(client_kwargs={'endpoint_url': $S3_ENDPOINT})"
                                           ".put('<local checkpoint>/', 'gradyard-bench/s3fs-put/round-N/', "
                                           "recursive=True)",
                               "checkpoint_writer": "gradyard.checkpoint.CheckpointWriter(open_storage("
                                                    "'s3://gradyard-bench/ckpt-bench', endpoint_url="
                                                    "$S3_ENDPOINT), keep=1).submit(snapshot); .wait()"}}}
    finally:
        for w in writers.values():
            w.close()
        torch.set_num_threads(threads)
