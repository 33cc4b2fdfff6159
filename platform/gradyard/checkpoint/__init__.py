"""Checkpoints: one package for the format, the writer, the save policy, resume, retention and the lease.

- :mod:`.format`     the layout, the manifest, listing and verification
- :mod:`.writer`     serialise-and-hash in one pass, atomic publishing, the background thread
- :mod:`.states`     the dict of Stateful objects a checkpoint holds, and its files
- :mod:`.manager`    when to save (steps, seconds, epochs, the end, preemption), the control sync
- :mod:`.store`      rank 0's writing side: the index of what is stored, fresh names, the writer thread
- :mod:`.resume`     the newest checkpoint that verifies, checked on every rank
- :mod:`.retention`  which checkpoints may go (own lineage, verified, never the newest)
- :mod:`.record`     the run record (``attempts.json``): lineage and starts
- :mod:`.lease`      one live driver per run directory

``docs/checkpoints.md`` states each guarantee and names the test that proves it.
"""

from gradyard.checkpoint.format import (
    CHECKPOINTS, COMPLETE, CORRUPT, FILES, INCOMPLETE, MANIFEST, CheckpointInfo, CorruptCheckpoint,
    checkpoint_dirname, list_checkpoints, load_blobs, read_verified, scan, tensor_digest,
)
from gradyard.checkpoint.lease import LeaseHeld, LeaseKeeper, LeaseLost, acquire
from gradyard.checkpoint.manager import CheckpointFailed, CheckpointManager, NonFiniteLoss, Preempted, TrainingStopped
from gradyard.checkpoint.record import RunRecord, read_record, record_start
from gradyard.checkpoint.resume import resume
from gradyard.checkpoint.store import CheckpointStore, SaveResult
from gradyard.checkpoint.writer import BackgroundWriter, Snapshot, to_cpu, write_checkpoint

__all__ = [
    "CHECKPOINTS", "COMPLETE", "CORRUPT", "FILES", "INCOMPLETE", "MANIFEST", "BackgroundWriter", "CheckpointStore",
    "CheckpointFailed", "CheckpointInfo", "CheckpointManager", "CorruptCheckpoint", "LeaseHeld", "LeaseKeeper",
    "LeaseLost", "NonFiniteLoss", "Preempted", "RunRecord", "SaveResult", "Snapshot", "TrainingStopped",
    "acquire", "checkpoint_dirname", "list_checkpoints", "load_blobs", "read_record", "read_verified",
    "record_start", "resume", "scan", "tensor_digest", "to_cpu", "write_checkpoint",
]
