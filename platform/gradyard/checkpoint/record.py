"""The run record, ``<run>/attempts.json``: the run's lineage and how often its workers started.

``run_id`` names the lineage: every checkpoint's manifest carries it, and
retention deletes only checkpoints of its own lineage.  ``starts`` counts
worker-group starts (restarts = starts - 1); ``start_times`` lists when each
began (``time.time()`` on rank 0, the last 100).

Written atomically (a reader sees the old record or the new one).  A record
that exists but cannot be read (torn by a crash, truncated by a full disk,
edited by hand) does not block the run: a new record is started and the run
says so; its lineage is then taken from the newest verified checkpoint
(:meth:`RunRecord.adopt`), so retention keeps recognising the run's own checkpoints.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from gradyard.storage import PATIENT, RecordError, Storage

log = logging.getLogger("gradyard.checkpoint")

RECORD = "attempts.json"


@dataclass
class RunRecord:
    run_id: str
    starts: int = 0
    started_at: float = field(default_factory=time.time)
    last_start: float = 0.0
    start_times: list[float] = field(default_factory=list)
    new: bool = True
    """No readable record existed: the lineage may be adopted from a checkpoint."""
    problem: str = ""
    """Why an existing record could not be used, if one could not."""

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    @property
    def attempt(self) -> int:
        return self.starts

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "starts": self.starts, "started_at": self.started_at,
                "last_start": self.last_start, "start_times": self.start_times[-100:]}

    def adopt(self, run_id: Optional[str]) -> bool:
        """Take the lineage of a checkpoint when this record is new; True when it changed."""
        if self.new and run_id and run_id != self.run_id:
            self.run_id = run_id
            return True
        return False


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def read_record(run: Storage) -> RunRecord:
    """The run's record as it is (a new one when there is none or it is unreadable)."""
    try:
        doc = run.read_json(run.join(RECORD), PATIENT)
    except RecordError as exc:
        return RunRecord(run_id=new_run_id(), problem=str(exc))
    if not isinstance(doc, dict) or not isinstance(doc.get("run_id"), str) or not isinstance(
            doc.get("starts"), int):
        if doc is None:
            return RunRecord(run_id=new_run_id())
        return RunRecord(run_id=new_run_id(), problem=f"{run.shown}/{RECORD} is not a gradyard run record")
    times = [float(t) for t in doc.get("start_times", []) if isinstance(t, (int, float))]
    return RunRecord(run_id=doc["run_id"], starts=doc["starts"], started_at=float(doc.get("started_at") or 0),
                     last_start=float(doc.get("last_start") or 0), start_times=times, new=False)


def record_start(run: Storage, say=log.warning) -> RunRecord:
    """Count one more worker-group start in the run record and write it back."""
    rec = read_record(run)
    if rec.problem:
        say(f"{rec.problem}; starting a new run record")
    now = time.time()
    rec.starts += 1
    rec.last_start = now
    rec.start_times = [*rec.start_times, now][-100:]
    save_record(run, rec)
    return rec


def save_record(run: Storage, rec: RunRecord) -> None:
    """Written when workers start, so an outage is waited out (the patient policy), not a failed start."""
    run.write_json(run.join(RECORD), rec.to_json(), PATIENT)
