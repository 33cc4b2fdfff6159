"""Writing one checkpoint, and the background thread that does it.

:func:`write_checkpoint` serialises each file with ``torch.save`` into a
stream that hashes every chunk as it is produced (one pass over the bytes,
not a serialisation and then a second hashing pass), then publishes the
checkpoint in one atomic step:

* **local disk**: the files are written and synced inside
  ``checkpoints/.partial-<name>-<token>/``, the manifest last, the folder
  synced, then the folder is renamed to its final name (``rename`` of a
  folder onto an existing one fails: a published checkpoint is never
  replaced) and the parent synced;
* **object storage**: the files go under the final name, which nothing uses
  yet (the manager picks a fresh one), each as concurrent multipart parts
  (:mod:`gradyard.storage.transfer`), the next file serialised while the one
  before it uploads; then the manifest is created with a conditional PUT
  (``If-None-Match: *``): it becomes visible whole, once, and never over another.

:class:`BackgroundWriter` runs one such job at a time on a thread at the
lowest CPU priority, so its serialising and hashing take the time the
training threads leave idle rather than theirs (docs/checkpoints.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import queue
import shutil
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from gradyard.checkpoint.format import (
    CHECKPOINTS, FORMAT_VERSION, MANIFEST, PARTIAL_PREFIX, CheckpointInfo, COMPLETE,
)
from gradyard.storage import DEFAULT, RetryPolicy, Storage, dumps, sync_dir, write_local_durably

log = logging.getLogger("gradyard.checkpoint")

WRITER_NICE = 19
"""Nice value of the background writer thread (Linux: nice is per thread)."""


class PublishConflict(Exception):
    """The checkpoint's name was taken by another writer between choosing it and publishing."""


@dataclass
class Snapshot:
    """Host-memory copy of everything a checkpoint holds, taken on the training thread."""

    step: int
    epoch: int
    files: dict[str, Any]
    """File name -> the object ``torch.save`` writes (tensors already on the CPU)."""
    manifest: dict = field(default_factory=dict)
    """Extra manifest fields: run_id, attempt, spec_hash, metrics, world_size."""


def to_cpu(obj: Any) -> Any:
    """Deep copy of a nested state with every tensor copied to host memory."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class _HashingSink:
    """A write-only stream for ``torch.save``: hashes each chunk and passes it on."""

    def __init__(self, out: Any):
        self.out, self.size, self._h = out, 0, hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data)
        self._h.update(view)
        self.out.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        pass

    def meta(self) -> dict:
        return {"size": self.size, "sha256": self._h.hexdigest()}


def _serialise(obj: Any, out: Any) -> dict:
    import torch

    sink = _HashingSink(out)
    torch.save(obj, sink)
    return sink.meta()


def write_checkpoint(storage: Storage, snap: Snapshot, dirname: str,
                     before_publish: Callable[[], None] = lambda: None,
                     policy: RetryPolicy = DEFAULT) -> CheckpointInfo:
    """Write ``snap`` as ``checkpoints/<dirname>`` and publish it; returns its (verified) info.

    ``before_publish`` runs just before the commit point (the manager checks
    the run lease there).  On failure nothing is published; what was written
    is left for retention to clear.
    """
    base = storage.join(CHECKPOINTS)
    final = posixpath.join(base, dirname)
    files: dict[str, dict] = {}
    if storage.is_local:
        partial = posixpath.join(base, f"{PARTIAL_PREFIX}{dirname}-{uuid.uuid4().hex[:8]}")
        os.makedirs(partial)
        try:
            for name, obj in snap.files.items():
                with open(posixpath.join(partial, name), "wb") as f:
                    files[name] = _serialise(obj, f)
                    f.flush()
                    os.fsync(f.fileno())
                    if hasattr(os, "posix_fadvise"):  # see storage.write_local_durably
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            manifest = _manifest(snap, files)
            write_local_durably(posixpath.join(partial, MANIFEST), dumps(manifest), drop_cache=False)
            sync_dir(partial)
            before_publish()
            try:
                os.rename(partial, final)
            except OSError as exc:  # EEXIST / ENOTEMPTY: the name is published already
                raise PublishConflict(f"{dirname} exists already ({exc.strerror})") from None
            sync_dir(base)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    else:
        _upload_overlapped(storage, snap, final, files, policy)
        manifest = _manifest(snap, files)
        before_publish()
        if not storage.create_exclusive(posixpath.join(final, MANIFEST), dumps(manifest), policy):
            raise PublishConflict(f"{dirname} has a manifest already")
    return CheckpointInfo(step=snap.step, path=final, status=COMPLETE, epoch=snap.epoch,
                          time=manifest["time"], size_bytes=sum(m["size"] for m in files.values()),
                          metrics=dict(snap.manifest.get("metrics") or {}),
                          run_id=snap.manifest.get("run_id"), attempt=snap.manifest.get("attempt"),
                          files=files, verified=True)


def _upload_overlapped(storage: Storage, snap: Snapshot, final: str, files: dict[str, dict],
                       policy: RetryPolicy) -> None:
    """Upload each file as ``torch.save`` writes it, and serialise the next while the last finishes.

    Each full part of a file goes up while the rest of it is serialised (a multipart upload,
    :class:`gradyard.storage.transfer.PartUpload`), so host memory holds a few parts per file,
    never a file's serialised bytes whole.  The first failure is raised once every started upload
    has ended; nothing of a failed upload becomes visible.
    """
    streams = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradyard-ckpt-finish") as pool:
        finishing: Optional[Future] = None
        try:
            for name, obj in snap.files.items():
                stream = storage.open_upload(posixpath.join(final, name), policy)
                streams.append(stream)
                files[name] = _serialise(obj, stream)
                if finishing is not None:
                    finishing.result()
                finishing = pool.submit(stream.close)  # its last parts and the completion
            if finishing is not None:
                finishing.result()
        except BaseException:
            if finishing is not None:
                finishing.cancel()
            pool.shutdown(wait=True)
            for stream in streams:
                stream.abort()
            raise


def _manifest(snap: Snapshot, files: dict[str, dict]) -> dict:
    return {"format": FORMAT_VERSION, "step": snap.step, "epoch": snap.epoch, "time": time.time(),
            **snap.manifest, "files": files}


# --------------------------------------------------------------- background thread


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority to ``WRITER_NICE`` (Linux: nice is per thread)."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere setpriority(PRIO_PROCESS, tid) would name a process, not this thread
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), WRITER_NICE))
    except OSError as exc:  # e.g. a seccomp profile that forbids it: write at normal priority
        log.debug("could not lower the checkpoint writer's priority: %s", exc)


class BackgroundWriter:
    """Runs checkpoint jobs one at a time on a background thread.

    ``submit`` waits only for the previous job (one in flight, so host memory
    holds at most two snapshots) and returns how long it waited.  A job's
    exceptions are its own to report: the thread only logs what escapes.
    """

    def __init__(self, name: str = "gradyard-ckpt-writer"):
        self._queue: "queue.Queue[Optional[Callable[[], None]]]" = queue.Queue(maxsize=1)
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def wait(self, timeout: Optional[float] = None) -> float:
        t0 = time.perf_counter()
        self._idle.wait(timeout)
        return time.perf_counter() - t0

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def submit(self, job: Callable[[], None]) -> float:
        waited = self.wait()
        self._idle.clear()
        self._queue.put(job)
        return waited

    def close(self, timeout: Optional[float] = None) -> None:
        self._idle.wait(timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        _lower_priority()
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # noqa: BLE001 - a job reports its own failures; this is the backstop
                log.exception("checkpoint job failed")
            finally:
                self._idle.set()
