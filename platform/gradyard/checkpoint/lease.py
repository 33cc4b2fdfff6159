"""The run lease: one live driver per run directory.

Two drivers on one run directory would delete each other's checkpoints,
resume from each other's lineage and write the same discovery file.  So a
driver (``gradyard run``, ``python -m gradyard.launch``, rank 0 under
torchrun) holds ``<run>/lease.json`` while it runs:

* **taking it** is an exclusive create (``os.link`` of a synced temporary
  file on local disk; a conditional PUT, ``If-None-Match: *``, on S3), so of
  two drivers starting together exactly one wins;
* the holder **renews** it every ``ttl_s / 3`` seconds from a thread; the
  workers of that driver check before publishing or deleting a checkpoint that
  the lease is still theirs (:func:`holds`);
* another driver is **refused at once**, with the holder's host, process and
  age and when the lease expires;
* a lease **expires** ``ttl_s`` after its last renewal, or at once when its
  holder is a process on this host that no longer exists (a SIGKILLed
  driver); then the next driver takes it over (on S3 with a conditional
  overwrite, ``If-Match`` on the old lease's ETag; on local disk by renaming
  the old lease aside, which only one taker can do).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from gradyard.storage import DEFAULT, RecordError, RetryPolicy, Storage, StorageError, dumps

log = logging.getLogger("gradyard.checkpoint")

LEASE = "lease.json"
DEFAULT_TTL_S = 60.0


class LeaseHeld(StorageError):
    """Another live driver holds the run directory; the message says who and until when."""


class LeaseLost(StorageError):
    """This driver's lease was taken over by another (it expired while this driver was stalled)."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid,
            "process_start": _process_start(pid), "command": " ".join(os.path.basename(a) if i == 0 else a
                                                                      for i, a in enumerate(sys.argv[:4]))}


def _gone(holder: dict) -> bool:
    """The holder is a process on this machine that no longer runs (SIGKILLed, crashed)."""
    if holder.get("host") != socket.gethostname() or holder.get("boot_id") != _boot_id():
        return False
    start = _process_start(int(holder.get("pid", -1)))
    return start is None or (holder.get("process_start") is not None and start != holder["process_start"])


@dataclass
class Lease:
    run: Storage
    token: str
    ttl_s: float
    acquired_at: float
    _etag: Optional[str] = None

    @property
    def path(self) -> str:
        return self.run.join(LEASE)


def _doc(token: str, ttl_s: float, acquired_at: float) -> dict:
    now = time.time()
    return {"token": token, "holder": _holder(), "acquired_at": acquired_at, "renewed_at": now,
            "ttl_s": ttl_s, "expires_at": now + ttl_s}


def _read(run: Storage, policy: RetryPolicy = DEFAULT,
          etag: bool = False) -> tuple[Optional[dict], Optional[str]]:
    """(lease document, its ETag on S3 when asked); a torn or foreign file reads as an expired lease."""
    path = run.join(LEASE)
    try:
        doc = run.read_json(path, policy)
    except RecordError:
        return {"token": "", "holder": {}, "expires_at": 0}, None
    if doc is None or not etag:
        return doc, None
    if not run.is_local:
        try:
            return doc, run.fs.info(path).get("ETag")
        except FileNotFoundError:
            return None, None
    return doc, None


def describe(doc: dict) -> str:
    h = doc.get("holder") or {}
    now = time.time()
    age = now - float(doc.get("renewed_at") or 0)
    left = float(doc.get("expires_at") or 0) - now
    return (f"{h.get('command') or 'a gradyard driver'} (pid {h.get('pid', '?')} on {h.get('host', '?')}, "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(doc.get('acquired_at') or 0)))}; "
            f"renewed {age:.0f}s ago, expires in {max(0.0, left):.0f}s)")


def acquire(run: Storage, ttl_s: float = DEFAULT_TTL_S, purpose: str = "train",
            policy: RetryPolicy = DEFAULT) -> Lease:
    """Take the run's lease, or raise :class:`LeaseHeld` naming its holder."""
    token = uuid.uuid4().hex
    now = time.time()
    for _ in range(3):
        if run.create_exclusive(run.join(LEASE), dumps(_doc(token, ttl_s, now)), policy):
            return Lease(run, token, ttl_s, now)
        doc, etag = _read(run, policy, etag=True)
        if doc is None:
            continue  # released between our create and our read: try again
        expired = time.time() > float(doc.get("expires_at") or 0) or _gone(doc.get("holder") or {})
        if not expired:
            raise LeaseHeld(
                f"{run.shown} is in use: {describe(doc)}. Only one driver may {purpose} a run directory at "
                f"a time. If that driver is gone, its lease expires on its own (at the latest "
                f"{ttl_s:.0f}s after its last renewal); run again then, or delete {run.shown}/{LEASE} "
                "once you are sure it is not running")
        if _take_over(run, doc, etag, token, ttl_s, now):
            log.warning("took over the expired lease of %s", describe(doc))
            return Lease(run, token, ttl_s, now)
    raise LeaseHeld(f"{run.shown}: could not take the run lease (another driver is taking it)")


def _take_over(run: Storage, old: dict, etag: Optional[str], token: str, ttl_s: float, now: float) -> bool:
    path = run.join(LEASE)
    if run.is_local:
        aside = f"{path}.expired-{token[:8]}"
        try:
            os.rename(path, aside)  # only one taker renames the same file
        except FileNotFoundError:
            return False
        try:
            with open(aside) as f:
                moved = json.load(f)
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != old.get("token"):  # a fresh lease, taken meanwhile: put it back
            os.rename(aside, path)
            return False
        os.unlink(aside)
        return run.create_exclusive(path, dumps(_doc(token, ttl_s, now)))
    from fsspec.asyn import sync

    bucket, _, key = path.partition("/")
    extra = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        sync(run.fs.loop, run.fs._call_s3, "put_object", Bucket=bucket, Key=key,
             Body=dumps(_doc(token, ttl_s, now)), **extra)
    except (FileExistsError, OSError) as exc:
        if "Precondition" in str(exc) or isinstance(exc, FileExistsError):
            return False
        raise
    run.fs.invalidate_cache(path)
    return True


def holds(run: Storage, token: Optional[str]) -> bool:
    """Whether the lease on ``run`` is still ``token``'s (True when no token is given: no lease in use)."""
    if not token:
        return True
    doc, _ = _read(run)
    return doc is not None and doc.get("token") == token


class LeaseKeeper:
    """Holds a lease for a driver: renews it on a thread, releases it at the end."""

    def __init__(self, lease: Lease):
        self.lease = lease
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradyard-lease", daemon=True)
        self._thread.start()

    @property
    def token(self) -> str:
        return self.lease.token

    def _run(self) -> None:
        lease = self.lease
        while not self._stop.wait(lease.ttl_s / 3):
            try:
                doc, _ = _read(lease.run)
                if doc is None or doc.get("token") != lease.token:
                    self.lost = describe(doc) if doc else "nobody (the lease file was removed)"
                    log.error("the run lease of %s is no longer this driver's: now held by %s",
                              lease.run.shown, self.lost)
                    return
                lease.run.write_json(lease.path, _doc(lease.token, lease.ttl_s, lease.acquired_at))
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried at the next tick
                log.warning("could not renew the run lease of %s: %s", lease.run.shown, exc)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lost:
            return
        try:
            if holds(self.lease.run, self.lease.token):
                self.lease.run.remove(self.lease.path)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("could not release the run lease of %s: %s", self.lease.run.shown, exc)

    def __enter__(self) -> "LeaseKeeper":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
