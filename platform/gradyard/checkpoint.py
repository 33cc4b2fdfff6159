"""The checkpoint format, its background writer, and how checkpoints are found again.

Layout of one run directory (a :class:`~gradyard.storage.Storage`)::

    <run>/checkpoints/step_000000120/
        model.pt        plain state_dict of the unwrapped model
        optimizer.pt    optimizer state_dict
        state.pt        trainer state: epoch, step, position in the epoch, LR
                        scheduler, grad scaler, every rank's RNG states,
                        callbacks' state, metrics, the job spec and its hash
        manifest.json   size and sha256 of each file above; written last

A checkpoint without its manifest, or whose files do not match it, is never
loaded.  All files load with ``torch.load(..., weights_only=True)``.

The training loop is blocked only while state is copied to host memory (and
while a previous upload is still running); serialisation, hashing and upload
happen on a background thread with retries.  On local disk every file is
synced before the manifest is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from gradyard.storage import Storage, redact, with_retries

log = logging.getLogger("gradyard.checkpoint")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILES = ("model.pt", "optimizer.pt", "state.pt")
DIR_PREFIX = "step_"


def checkpoint_dirname(step: int) -> str:
    return f"{DIR_PREFIX}{step:09d}"


def to_cpu(obj: Any) -> Any:
    """Deep copy of a nested state with every tensor copied to host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def tensor_digest(obj: Any) -> str:
    """sha256 over a nested state's tensors and values, independent of pickling."""
    h = hashlib.sha256()

    def walk(o: Any, prefix: str) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().to("cpu").contiguous()
            h.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k], f"{prefix}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{prefix}[{i}]")
        else:
            h.update(f"{prefix}={o!r}".encode())

    walk(obj, "")
    return h.hexdigest()


@dataclass
class CheckpointInfo:
    step: int
    path: str
    """Path of the checkpoint directory on the run's filesystem."""
    status: str = "incomplete"
    """complete, incomplete (no manifest: never finished) or corrupt (files do not match)."""
    epoch: Optional[int] = None
    time: Optional[float] = None
    size_bytes: int = 0
    metrics: dict = field(default_factory=dict)
    problem: str = ""

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------- reading


def _read_manifest(storage: Storage, ckpt_path: str) -> Optional[dict]:
    mpath = posixpath.join(ckpt_path, MANIFEST)
    try:
        with storage.fs.open(mpath, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def verify(storage: Storage, info: CheckpointInfo, manifest: dict, deep: bool = True) -> CheckpointInfo:
    total = 0
    for name, meta in manifest.get("files", {}).items():
        fpath = posixpath.join(info.path, name)
        try:
            size = storage.fs.size(fpath)
        except FileNotFoundError:
            info.status, info.problem = "corrupt", f"{name} is missing"
            return info
        if size != meta["size"]:
            info.status, info.problem = "corrupt", f"{name} has {size} bytes, manifest says {meta['size']}"
            return info
        if deep:
            h = hashlib.sha256()
            with storage.fs.open(fpath, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != meta["sha256"]:
                info.status, info.problem = "corrupt", f"{name} does not match its sha256"
                return info
        total += size
    info.status, info.size_bytes = "complete", total
    return info


def list_checkpoints(storage: Storage, deep: bool = True) -> list[CheckpointInfo]:
    """Every checkpoint under ``<run>/checkpoints``, oldest first, with its status."""
    base = storage.join("checkpoints")
    # Another process may have written since this filesystem listed (s3fs caches listings).
    storage.fs.invalidate_cache(base)
    try:
        entries = storage.fs.ls(base, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        name = posixpath.basename(entry.rstrip("/"))
        if not name.startswith(DIR_PREFIX):
            continue
        try:
            step = int(name[len(DIR_PREFIX):])
        except ValueError:
            continue
        info = CheckpointInfo(step=step, path=posixpath.join(base, name))
        manifest = _read_manifest(storage, info.path)
        if manifest is None:
            info.status, info.problem = "incomplete", "no manifest"
            try:
                info.size_bytes = sum(storage.fs.du(info.path, total=False).values())
            except Exception:  # noqa: BLE001 - size of a broken checkpoint is best effort
                pass
        else:
            info.epoch = manifest.get("epoch")
            info.time = manifest.get("time")
            info.metrics = manifest.get("metrics", {})
            verify(storage, info, manifest, deep=deep)
        out.append(info)
    out.sort(key=lambda i: i.step)
    return out


def newest_complete(storage: Storage, say: Callable[[str], None] = log.warning) -> Optional[CheckpointInfo]:
    """The newest checkpoint that verifies; says which newer ones were skipped and why."""
    for info in reversed(list_checkpoints(storage, deep=True)):
        if info.status == "complete":
            return info
        say(f"skipping checkpoint at step {info.step}: {info.status} ({info.problem}); "
            "falling back to an older one")
    return None


def load_checkpoint(storage: Storage, info: CheckpointInfo, names=FILES) -> dict[str, Any]:
    out = {}
    for name in names:
        with storage.fs.open(posixpath.join(info.path, name), "rb") as f:
            data = f.read()
        out[name] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return out


# --------------------------------------------------------------- writing


@dataclass
class Snapshot:
    """Host-memory copy of everything a checkpoint holds, taken on the training thread."""

    step: int
    epoch: int
    files: dict[str, Any]
    metrics: dict
    spec_hash: str


WRITER_NICE = 19
"""Nice value of the background writer thread (Linux).  Serialising, hashing and
writing a checkpoint costs CPU (AlexNet's 456 MB: 1-2 CPU-s); at a lower
priority it runs in the time the training threads leave (waiting for the
accelerator, the data or a collective) instead of taking theirs."""


def write_local_durably(path: str, data) -> None:
    """Write a local file and sync it to disk, then drop it from the page cache.

    Synced before the manifest that names it is written (and the directory after
    it), a checkpoint whose manifest exists survives a machine crash, not only a
    process's.  Dropping the written pages keeps checkpoints from pushing the
    training data out of the page cache; the next checkpoint reuses the freed
    pages, where fresh ones cost more CPU than the copy itself (0.6 against
    0.1 CPU-s per 228 MB on the bench's VM: docs/checkpoints.md).
    """
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _sync_dir(path: str) -> None:
    """Make a directory's entries (the files just created in it) durable; POSIX only."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority to ``WRITER_NICE`` (Linux: nice is per thread)."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere setpriority(PRIO_PROCESS, tid) would name a process, not this thread
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), WRITER_NICE))
    except OSError as exc:  # e.g. a seccomp profile that forbids it: write at normal priority
        log.debug("could not lower the checkpoint writer's priority: %s", exc)


class CheckpointWriter:
    """Writes snapshots to storage on one background thread.

    ``submit`` waits only for the previous upload (one in flight at a time, so
    host memory holds at most two snapshots) and returns how long it waited.
    """

    def __init__(self, storage: Storage, keep: int, best_metric: Optional[str] = None,
                 best_mode: str = "max", retry_attempts: int = 6,
                 on_done: Optional[Callable[[Snapshot, bool, float], None]] = None):
        self.storage = storage
        self.keep = keep
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.retry_attempts = retry_attempts
        self.on_done = on_done
        self.saved_total = 0
        self.failures_total = 0
        self.last_error: Optional[str] = None
        self._index: Optional[dict[int, CheckpointInfo]] = None
        """What is under ``checkpoints/``: listed from storage once, then kept up to date here
        (this thread is the run's only writer), so retention costs no listing or manifest reads."""
        self._written: dict[int, list[str]] = {}
        """Every file of each checkpoint this writer completed: removed without listing."""
        self._queue: "queue.Queue[Optional[Snapshot]]" = queue.Queue(maxsize=1)
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="gradyard-ckpt-writer", daemon=True)
        self._thread.start()

    # -- training-thread side
    def wait(self) -> float:
        t0 = time.perf_counter()
        self._idle.wait()
        return time.perf_counter() - t0

    def submit(self, snap: Snapshot) -> float:
        waited = self.wait()
        self._idle.clear()
        self._queue.put(snap)
        return waited

    def close(self, timeout: Optional[float] = None) -> None:
        self._idle.wait(timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    # -- background side
    def _run(self) -> None:
        _lower_priority()
        while True:
            snap = self._queue.get()
            if snap is None:
                return
            t0 = time.perf_counter()
            ok = False
            try:
                self._write(snap)
                self.saved_total += 1
                ok = True
                try:
                    self._retain(snap)
                except Exception as exc:  # noqa: BLE001 - retention failure must not kill training
                    log.warning("checkpoint retention failed: %s", redact(str(exc))[:200])
            except Exception as exc:  # noqa: BLE001 - an unwritable checkpoint is logged, counted, survived
                if self._index is not None:  # whatever part of it landed goes at the next retention
                    self._index[snap.step] = CheckpointInfo(step=snap.step, path=self._path(snap))
                self.failures_total += 1
                self.last_error = redact(f"{type(exc).__name__}: {exc}")[:300]
                log.error("checkpoint at step %d could not be written: %s; training goes on",
                          snap.step, self.last_error)
            finally:
                if self.on_done:
                    try:
                        self.on_done(snap, ok, time.perf_counter() - t0)
                    except Exception:  # noqa: BLE001
                        log.exception("checkpoint callback failed")
                self._idle.set()

    def _path(self, snap: Snapshot) -> str:
        return self.storage.join("checkpoints", checkpoint_dirname(snap.step))

    def _write(self, snap: Snapshot) -> None:
        fs = self.storage.fs
        ckpt_path = self._path(snap)
        local = self.storage.is_local
        if local:
            os.makedirs(ckpt_path, exist_ok=True)
            put = write_local_durably
        else:
            # pipe_file: one PUT (or one multipart upload) per file, no buffered-file machinery.
            put = fs.pipe_file
        files_meta = {}
        for name, obj in snap.files.items():
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getvalue()
            files_meta[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            fpath = posixpath.join(ckpt_path, name)
            with_retries(lambda fpath=fpath, data=data: put(fpath, data),
                         what=f"upload {name} (step {snap.step})",
                         attempts=self.retry_attempts, log=log.warning)
        manifest = {
            "format": FORMAT_VERSION,
            "step": snap.step,
            "epoch": snap.epoch,
            "time": time.time(),
            "spec_hash": snap.spec_hash,
            "metrics": snap.metrics,
            "files": files_meta,
        }
        mdata = json.dumps(manifest, indent=1, sort_keys=True).encode()
        with_retries(lambda: put(posixpath.join(ckpt_path, MANIFEST), mdata),
                     what=f"upload manifest (step {snap.step})",
                     attempts=self.retry_attempts, log=log.warning)
        if local:
            _sync_dir(ckpt_path)
        self._written[snap.step] = [posixpath.join(ckpt_path, n) for n in (*files_meta, MANIFEST)]
        if self._index is not None:
            self._index[snap.step] = CheckpointInfo(
                step=snap.step, path=ckpt_path, status="complete", epoch=snap.epoch,
                time=manifest["time"], size_bytes=sum(m["size"] for m in files_meta.values()),
                metrics=snap.metrics)

    def _retain(self, latest: Snapshot) -> None:
        if self._index is None:  # the first time: what earlier attempts of this run left
            self._index = {i.step: i for i in list_checkpoints(self.storage, deep=False)}
        infos = sorted(self._index.values(), key=lambda i: i.step)
        complete = [i for i in infos if i.status == "complete"]
        keep_steps = {i.step for i in complete[-self.keep:]}
        scored = [i for i in complete if self.best_metric and self.best_metric in i.metrics]
        if scored:
            pick = max if self.best_mode == "max" else min
            keep_steps.add(pick(scored, key=lambda i: float(i.metrics[self.best_metric])).step)
        for info in infos:
            # Older incomplete ones are left-overs of a crash or an outage.
            stale_incomplete = info.status != "complete" and info.step < latest.step
            if (info.status == "complete" and info.step not in keep_steps) or stale_incomplete:
                written = self._written.pop(info.step, None)
                try:
                    if written and not self.storage.is_local:
                        self.storage.fs.rm(written)  # one bulk delete, no listing
                    else:
                        self.storage.fs.rm(info.path, recursive=True)
                except FileNotFoundError:
                    pass  # a failed write that left nothing behind
                del self._index[info.step]
