"""The writing side of a run's checkpoints (rank 0): what is on storage, fresh names, writing, retention.

:class:`CheckpointStore` keeps an index of every checkpoint directory of the
run, listed once (at resume) and then kept up to date by its own background
thread, the run's only writer (the run lease makes it so).  Each saved
snapshot is one job on that thread: pick a name nothing uses, write and
publish (:func:`~gradyard.checkpoint.writer.write_checkpoint`), then apply
retention (:mod:`~gradyard.checkpoint.retention`).  So retention costs no
listing and no manifest reads, and on S3 a checkpoint costs its PUTs, one
small GET (the lease) and one bulk delete when an old one goes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from gradyard.checkpoint import retention
from gradyard.checkpoint.format import COMPLETE, CORRUPT, MANIFEST, PARTIAL_PREFIX, CheckpointInfo, checkpoint_dirname
from gradyard.checkpoint.lease import LeaseLost, holds
from gradyard.checkpoint.writer import BackgroundWriter, Snapshot, write_checkpoint
from gradyard.storage import DEFAULT, RetryPolicy, Storage, redact

log = logging.getLogger("gradyard.checkpoint")


@dataclass
class SaveResult:
    step: int
    blocked_s: float = 0.0
    """Training-thread time the checkpoint took (host copy, RNG gather, waiting for the previous upload)."""
    ok: Optional[bool] = None
    """None while the writer is at it; then True (durable) or False (failed)."""
    write_s: float = 0.0
    size_bytes: int = 0
    name: str = ""
    error: str = ""
    final: bool = False
    fatal: Optional[Exception] = field(default=None, repr=False)


class CheckpointStore:
    def __init__(self, storage: Storage, *, run_id: Callable[[], str], keep: int,
                 best_metric: Optional[str] = None, best_mode: str = "max", lease_token: Optional[str] = None,
                 on_done: Callable[[SaveResult], None] = lambda result: None):
        self.storage, self.run_id, self.keep = storage, run_id, keep
        self.best_metric, self.best_mode, self.lease_token = best_metric, best_mode, lease_token
        self.on_done = on_done
        self.index: dict[str, CheckpointInfo] = {}
        self.partials: list[str] = []
        self.protected: Optional[str] = None
        """The checkpoint the attempt resumed from: never deleted by this attempt."""
        self.writer = BackgroundWriter()

    # ------------------------------------------------------------ what is there

    def set_index(self, infos: list[CheckpointInfo], partials: list[str]) -> None:
        self.index = {i.name: i for i in infos}
        self.partials = [p for p in partials if p.rsplit("/", 1)[-1].startswith(PARTIAL_PREFIX)]

    def note_corrupt(self, info: CheckpointInfo, problem: str) -> None:
        info.status, info.problem = CORRUPT, problem
        self.index[info.name] = info

    # ------------------------------------------------------------ writing

    def submit(self, snap: Snapshot, result: SaveResult, policy: RetryPolicy = DEFAULT) -> float:
        """Hand ``snap`` to the background thread; returns how long the previous job held it up."""
        return self.writer.submit(lambda: self._job(snap, result, policy))

    def wait(self) -> float:
        return self.writer.wait()

    def close(self) -> None:
        self.writer.close()

    def _job(self, snap: Snapshot, result: SaveResult, policy: RetryPolicy) -> None:
        t0 = time.perf_counter()
        try:
            info = write_checkpoint(self.storage, snap, self._fresh_name(snap.step),
                                    before_publish=self._check_lease, policy=policy)
            self.index[info.name] = info
            result.ok, result.name, result.size_bytes = True, info.name, info.size_bytes
        except Exception as exc:  # noqa: BLE001 - an unwritable checkpoint is reported; training decides
            result.ok = False
            result.error = redact(f"{type(exc).__name__}: {exc}")[:300]
            if isinstance(exc, LeaseLost):
                result.fatal = exc
            log.error("checkpoint at step %d could not be written: %s", snap.step, result.error)
        result.write_s = time.perf_counter() - t0
        self.on_done(result)
        if result.ok:
            try:
                self._retain()
            except Exception as exc:  # noqa: BLE001 - retention failing must not fail training
                log.warning("checkpoint retention failed: %s", redact(str(exc))[:200])

    def _fresh_name(self, step: int) -> str:
        name, n = checkpoint_dirname(step), 0
        while name in self.index:  # that step is taken (a published or a broken checkpoint): never reuse it
            n += 1
            name = checkpoint_dirname(step, f"{time.strftime('%Y%m%d%H%M%S')}{n}")
        return name

    def _check_lease(self) -> None:
        if not holds(self.storage, self.lease_token):
            raise LeaseLost(f"{self.storage.shown}: another driver holds the run lease now; this run's "
                            "workers stop writing to it")

    def _retain(self) -> None:
        doomed = retention.to_delete(self.index.values(), run_id=self.run_id(), keep=self.keep,
                                     protected=[self.protected] if self.protected else [],
                                     best_metric=self.best_metric, best_mode=self.best_mode)
        # The lease was checked just before this job published its checkpoint.
        for info in doomed:
            if info.status == COMPLETE and info.files and not self.storage.is_local:
                # One bulk delete of the known files, no listing.
                self.storage.remove([f"{info.path}/{n}" for n in (*info.files, MANIFEST)])
            else:
                self.storage.remove(info.path, recursive=True)
            self.index.pop(info.name, None)
        for path in self.partials:
            self.storage.remove(path, recursive=True)
        self.partials = []
