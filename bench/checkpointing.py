"""2. Checkpoints of AlexNet-sized state: training blocked per checkpoint, and upload throughput.

State: torchvision AlexNet with 1000 classes (61.1 M parameters) and SGD with
momentum, i.e. ~0.49 GB of model + optimizer state.  One process, one thread
(one worker's share of this machine), real training steps at batch 8.

* Blocked time: what gradyard's CheckpointCallback does on rank 0 for each
  checkpoint (copy state to host memory, hand it to the background
  CheckpointWriter), timed, against the mean step time.  Local disk and S3
  (moto) alternate; training goes on while the writer uploads, and those
  steps are timed too (the writer competes for the same cores).
* Upload throughput: the CheckpointWriter writing one snapshot to S3
  (serialise, sha256, upload, manifest, retention) against a plain s3fs
  ``put`` of the same files' bytes from local disk, to the same endpoint,
  alternating.
"""

from __future__ import annotations

import io
import os
import time
from typing import Callable

from bench.env import BUCKET, Bench
from bench.settings import Size
from bench.stats import paired, summary

NAME = "checkpoint"
TITLE = "Checkpoints of AlexNet-sized state"
NEEDS_CLUSTER = False

BATCH = 8
QUIET_STEPS = 2
"""Steps timed before each checkpoint, with no upload running."""


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
    """on_done hook of the CheckpointWriter: seconds each snapshot took in the background."""

    def __init__(self):
        self.seconds: list[float] = []
        self.ok: list[bool] = []

    def __call__(self, snap, ok: bool, seconds: float) -> None:
        self.ok.append(ok)
        self.seconds.append(seconds)


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    import torch

    from gradyard.checkpoint import CheckpointWriter
    from gradyard.storage import open_storage

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, optimizer, step = _alexnet()
        params = sum(p.numel() for p in model.parameters())
        for _ in range(2):  # warm-up; momentum buffers exist from here on
            step()
        storages = {
            "local": open_storage(str(bench.fresh("ckpt-local"))),
            "s3": open_storage(f"s3://{BUCKET}/ckpt-bench", endpoint_url=bench.s3.endpoint),
        }
        timers = {k: _Timed() for k in storages}
        writers = {k: CheckpointWriter(s, keep=1, on_done=timers[k]) for k, s in storages.items()}
        quiet: list[float] = []
        during: dict[str, list[float]] = {k: [] for k in storages}
        blocked: dict[str, list[float]] = {k: [] for k in storages}
        n = 0
        for r in range(size.checkpoint_rounds):
            for kind, writer in writers.items():
                quiet += [step() for _ in range(QUIET_STEPS)]
                n += QUIET_STEPS
                t0 = time.perf_counter()
                writer.submit(_snapshot(model, optimizer, n))
                blocked[kind].append(time.perf_counter() - t0)
                while len(timers[kind].seconds) < r + 1:  # train on while it writes
                    during[kind].append(step())
                    n += 1
                say(f"  checkpoint round {r + 1}/{size.checkpoint_rounds} {kind}: blocked "
                    f"{blocked[kind][-1]:.3f}s, written in {timers[kind].seconds[-1]:.2f}s")
        for w in writers.values():
            w.close()
        if not all(all(t.ok) for t in timers.values()):
            raise RuntimeError("a checkpoint failed to write")
        nbytes = _checkpoint_bytes(storages["s3"])
        mean_step = sum(quiet) / len(quiet)
        blocked_result = {
            kind: {"blocked_seconds": summary(v),
                   "blocked_over_mean_step": summary([b / mean_step for b in v]),
                   "background_write_seconds": summary(timers[kind].seconds),
                   "step_seconds_while_writing": summary(during[kind]),
                   "steps_while_writing": len(during[kind])}
            for kind, v in blocked.items()}
        upload = _upload_rounds(bench, model, optimizer, storages["s3"], size.checkpoint_rounds, say)
        return {"parameters": params, "checkpoint_bytes": nbytes, "batch": BATCH,
                "threads": 1, "step_seconds": summary(quiet), "by_storage": blocked_result,
                "upload": upload}
    finally:
        torch.set_num_threads(threads)


def _checkpoint_bytes(storage) -> int:
    from gradyard.checkpoint import list_checkpoints

    infos = [i for i in list_checkpoints(storage, deep=False) if i.status == "complete"]
    return infos[-1].size_bytes


def _upload_rounds(bench: Bench, model, optimizer, storage, rounds: int,
                   say: Callable[[str], None]) -> dict:
    """CheckpointWriter vs a plain s3fs put of the same bytes, alternating, nothing else running."""
    import s3fs
    import torch

    from gradyard.checkpoint import CheckpointWriter

    snap = _snapshot(model, optimizer, 10_000)
    local = bench.fresh("ckpt-bytes")
    nbytes = 0
    for name, obj in snap.files.items():  # the very bytes the writer uploads
        buf = io.BytesIO()
        torch.save(obj, buf)
        (local / name).write_bytes(buf.getvalue())
        nbytes += buf.tell()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": bench.s3.endpoint})
    timer = _Timed()
    writer = CheckpointWriter(storage, keep=1, on_done=timer)
    w_rates, p_rates = [], []
    for r in range(rounds):
        writer.submit(snap)
        writer.wait()
        w_rates.append(nbytes / timer.seconds[-1])
        target = f"{BUCKET}/s3fs-put/round-{r}"
        t0 = time.perf_counter()
        fs.put(str(local) + "/", target + "/", recursive=True)
        p_rates.append(nbytes / (time.perf_counter() - t0))
        fs.rm(target, recursive=True)
        say(f"  upload round {r + 1}/{rounds}: CheckpointWriter {w_rates[-1] / 1e6:.0f} MB/s, "
            f"s3fs put {p_rates[-1] / 1e6:.0f} MB/s")
    writer.close()
    ratio = summary(paired(w_rates, p_rates))
    return {"bytes": nbytes, "files": sorted(os.listdir(local)),
            "bytes_per_second": {"checkpoint_writer": summary(w_rates), "s3fs_put": summary(p_rates)},
            "ratio": ratio,
            "commands": {"s3fs_put": "s3fs.S3FileSystem(client_kwargs={'endpoint_url': $S3_ENDPOINT})"
                                     ".put('$BENCH_TMP/ckpt-bytes/', 'gradyard-bench/s3fs-put/round-N/', "
                                     "recursive=True)",
                         "checkpoint_writer": "gradyard.checkpoint.CheckpointWriter(open_storage("
                                              "'s3://gradyard-bench/ckpt-bench', endpoint_url=$S3_ENDPOINT), "
                                              "keep=1).submit(snapshot); .wait()"}}
