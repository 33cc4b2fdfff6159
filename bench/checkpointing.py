"""2. Checkpoints: training blocked per checkpoint, the writer's upload against a plain s3fs put, CPU.

States: torchvision AlexNet with 1000 classes (61.1 M parameters, SGD momentum:
~0.49 GB) and fashion-cnn's (small; retention runs every time, ``keep=3``).  One
process, one thread (one worker's share of this machine).  Each round trains 2
steps, then checkpoints to local disk and to S3 (moto) exactly as rank 0 does
(state copied to host memory and handed to gradyard's CheckpointStore),
timing how long training is blocked and waiting for each write; then a plain
s3fs ``put`` uploads the files the writer wrote to local disk, to the same
endpoint: the writer's bytes per second against the put's, in the same round.
CPU per background write is counted for this process (writer thread, s3fs's
event loop) and for the S3 server, which shares the training cores here, with
py-spy on the server during the first S3 write.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

from bench.env import BUCKET, Bench
from bench.profile import Spy
from bench.settings import Size
from bench.stats import paired, ratio, summary

NAME = "checkpoint"
TITLE = "2. Checkpoints"
NEEDS_CLUSTER = False

UPLOAD_TARGET = 1.0
"""The writer's upload of AlexNet's state must be at least as fast as a plain s3fs put of the same bytes."""
BATCH = 8


def _state(kind: str):
    """(model, optimizer, one training step) of the state ``kind``."""
    import torch

    torch.manual_seed(0)
    if kind == "alexnet":
        import torchvision

        model, shape, classes = torchvision.models.alexnet(weights=None, num_classes=1000), (3, 224, 224), 1000
    else:
        from bench.contenders import Workload
        from bench.scripts.plain_models import build_model

        shape, classes = Workload("fashion-cnn", steps=1, checkpoint_every=1).shape()
        model = build_model("fashion_cnn", shape, classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(BATCH, *shape), torch.randint(0, classes, (BATCH,))

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

    files = {"model.pt": to_cpu(model.state_dict()), "optimizer.pt": to_cpu(optimizer.state_dict()),
             "state.pt": {"trainer": {"step": step_no}, "rng": [rng_state()], "callbacks": {}}}
    return Snapshot(step=step_no, epoch=0, files=files, manifest={"run_id": "bench"})


def _measure(bench: Bench, kind: str, rounds: int, keep: int, spy: bool) -> dict:
    import s3fs

    from gradyard.checkpoint import CheckpointStore, SaveResult
    from gradyard.storage import open_storage

    model, optimizer, step = _state(kind)
    params = sum(p.numel() for p in model.parameters())
    for _ in range(2):  # warm-up; momentum buffers exist from here on
        step()
    storages = {"local": open_storage(str(bench.fresh(f"ckpt-{kind}"))),
                "s3": open_storage(f"s3://{BUCKET}/{bench.unique('ckpt')}", endpoint_url=bench.s3.endpoint)}
    stores = {k: CheckpointStore(s, run_id=lambda: "bench", keep=keep) for k, s in storages.items()}
    plain = s3fs.S3FileSystem(client_kwargs={"endpoint_url": bench.s3.endpoint})
    steps, nbytes, profile = [], 0, None
    blocked = {k: [] for k in stores}
    write = {k: [] for k in stores}
    rates = {"writer": [], "put": []}
    cpu = {"writer_local": [], "writer_s3": [], "s3_server": []}
    try:
        for r in range(rounds):
            steps += [step(), step()]
            for k, store in stores.items():
                result = SaveResult(step=2 * r + 3)
                with (Spy(bench.s3.proc.pid, bench.tmp / "s3-server.pyspy") if spy and k == "s3" and r == 0
                      else contextlib.nullcontext()) as watcher:
                    t0 = time.perf_counter()
                    store.submit(_snapshot(model, optimizer, result.step), result)
                    blocked[k].append(time.perf_counter() - t0)
                    c0, s0 = time.process_time(), bench.s3_cpu_seconds()
                    store.wait()
                    cpu[f"writer_{k}"].append(time.process_time() - c0)
                    if k == "s3":
                        cpu["s3_server"].append(bench.s3_cpu_seconds() - s0)
                if watcher is not None:
                    profile = watcher.functions if watcher.functions is not None else "py-spy could not attach"
                if result.ok is False:
                    raise RuntimeError(f"a checkpoint failed to write: {result.error}")
                write[k].append(result.write_s)
                if k == "local":
                    local_dir = storages["local"].join("checkpoints", result.name)
            nbytes = sum(storages["local"].fs.du(local_dir, total=False).values())
            rates["writer"].append(nbytes / write["s3"][-1])
            target = f"{BUCKET}/s3fs-put/{bench.unique('round')}"
            t0 = time.perf_counter()
            plain.put(local_dir + "/", target + "/", recursive=True)
            rates["put"].append(nbytes / (time.perf_counter() - t0))
            plain.rm(target, recursive=True)
    finally:
        for store in stores.values():
            store.close()
    mean_step = sum(steps) / len(steps)
    return {"state": kind, "parameters": params, "checkpoint_bytes": nbytes, "mean_step_seconds": mean_step,
            "blocked_seconds": {k: summary(v) for k, v in blocked.items()},
            "blocked_over_mean_step": {k: summary([b / mean_step for b in v]) for k, v in blocked.items()},
            "write_seconds": {k: summary(v) for k, v in write.items()},
            "upload_bytes_per_second": {k: summary(v) for k, v in rates.items()},
            "upload_ratio": ratio(paired(rates["writer"], rates["put"]), UPLOAD_TARGET if kind == "alexnet" else None),
            "cpu_seconds": {k: summary(v) for k, v in cpu.items()}, "s3_server_profile": profile}


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        states = [_measure(bench, size.checkpoint_state, size.checkpoint_rounds, keep=1, spy=True)]
        if size.checkpoint_state == "alexnet":
            states.append(_measure(bench, "fashion-cnn", 10, keep=3, spy=False))
    finally:
        torch.set_num_threads(threads)
    for s in states:
        say(f"  {s['state']}: writer / s3fs put {s['upload_ratio']['estimate']:.2f}x, blocked "
            f"{s['blocked_seconds']['s3']['median']:.3f}s")
    tables = []
    for s in states:
        mb = {k: {**v, **{q: v[q] / 1e6 for q in ("median", "min", "max") if q in v}}
              for k, v in s["upload_bytes_per_second"].items()}
        tables.append({
            "title": f"{s['state']}: {s['parameters']:,} parameters, {s['checkpoint_bytes'] / 1e6:,.1f} MB a checkpoint, "
                     f"mean step {s['mean_step_seconds']:.3g} s (one thread, batch {BATCH})",
            "columns": ["", "local disk", "S3 (moto)"],
            "rows": [["training blocked per checkpoint, s", s["blocked_seconds"]["local"], s["blocked_seconds"]["s3"]],
                     ["… / mean step", s["blocked_over_mean_step"]["local"], s["blocked_over_mean_step"]["s3"]],
                     ["background write, s", s["write_seconds"]["local"], s["write_seconds"]["s3"]],
                     ["writer CPU-s per checkpoint", s["cpu_seconds"]["writer_local"], s["cpu_seconds"]["writer_s3"]],
                     ["S3 server CPU-s per checkpoint", "", s["cpu_seconds"]["s3_server"]],
                     ["upload MB/s: writer, plain s3fs put", "", f"{mb['writer'].get('median', 0):.0f}, "
                                                                  f"{mb['put'].get('median', 0):.0f}"],
                     ["upload: writer / s3fs put, per round", "", s["upload_ratio"]]]})
        if isinstance(s["s3_server_profile"], list) and s["s3_server_profile"]:
            tables.append({"title": "Where the S3 server's CPU goes in one checkpoint (py-spy, innermost function)",
                           "columns": ["function", "share"],
                           "rows": [[f["function"], f"{100 * f['share']:.1f}%"] for f in s["s3_server_profile"]]})
    targets = [{"name": f"{s['state']}: checkpoint writer upload / plain s3fs put", **s["upload_ratio"]}
               for s in states if "target" in s["upload_ratio"]]
    return {"targets": targets, "tables": tables, "states": states,
            "commands": {"plain s3fs put": "s3fs.S3FileSystem(client_kwargs={'endpoint_url': $S3_ENDPOINT})"
                                           ".put('<the writer's local checkpoint>/', 'bucket/prefix/', recursive=True)",
                         "checkpoint writer": "gradyard.checkpoint.CheckpointStore(open_storage('s3://...', "
                                              "endpoint_url=$S3_ENDPOINT), keep=1).submit(snapshot, result); .wait()"}}
