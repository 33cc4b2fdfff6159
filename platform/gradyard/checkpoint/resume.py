"""Resume: the newest checkpoint that verifies, checked by every rank, loaded from the bytes hashed.

Rank 0 lists the run's checkpoints once and walks them newest first,
verifying each only until one passes (reading every byte of it once, with
the patient retry policy: a storage hiccup is not a restart).  It broadcasts
the choice and its digests; every other rank reads the same checkpoint from
its own view of storage and checks it against those digests, so a rank never
loads bytes rank 0 did not verify.  If any rank's copy differs, all move on
to the next older checkpoint together.  Skipped checkpoints are named, with why.

Which checkpoints may be resumed from: the run's own lineage and format-1
checkpoints (no lineage recorded).  Checkpoints of another run are named and
left alone, unless this run's record was lost, in which case the run adopts
the lineage of the newest checkpoint that verifies.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from gradyard.checkpoint.format import COMPLETE, CheckpointInfo, CorruptCheckpoint, load_blobs, read_verified
from gradyard.checkpoint.format import scan
from gradyard.checkpoint.manager import CheckpointManager
from gradyard.checkpoint.record import save_record
from gradyard.checkpoint.states import load_into
from gradyard.collectives import broadcast, gather
from gradyard.storage import PATIENT

log = logging.getLogger("gradyard.checkpoint")


def resume(manager: CheckpointManager, say: Callable[[str], None] = print) -> Optional[CheckpointInfo]:
    """Load the newest verified checkpoint into the manager's states; None when there is none."""
    m, rank, world = manager, manager.rank, manager.world_size
    candidates: list[CheckpointInfo] = []
    if rank == 0:
        infos, partials = scan(m.storage, policy=PATIENT)
        m.store.set_index(infos, partials)
        for info in reversed(infos):
            lineage = info.lineage(m.record.run_id)
            if info.status != COMPLETE:
                say(f"skipping checkpoint {info.name}: {info.status} ({info.problem}); "
                    "falling back to an older one")
            elif lineage == "foreign" and not m.record.new:
                say(f"not resuming from checkpoint {info.name}: it belongs to another run "
                    f"(run id {info.run_id}, this run is {m.record.run_id}); left in place")
            else:
                candidates.append(info)
    blobs: Optional[dict[str, bytes]] = None
    while True:
        choice = None
        if rank == 0:
            while candidates and choice is None:
                info = candidates.pop(0)
                try:
                    blobs = read_verified(m.storage, info)
                    choice = info
                except CorruptCheckpoint as exc:
                    m.store.note_corrupt(info, str(exc))
                    say(f"skipping checkpoint {info.name}: corrupt ({exc}); falling back to an older one")
        shared = broadcast(None if choice is None else
                            {"name": choice.name, "path": choice.path, "step": choice.step,
                             "files": choice.files, "run_id": choice.run_id}, world)
        if shared is None:
            return None
        if rank == 0:
            ok: Any = True
        else:
            mine = CheckpointInfo(step=shared["step"], path=shared["path"], files=shared["files"])
            try:
                blobs = read_verified(m.storage, mine, digests=shared["files"])
                ok = True
            except CorruptCheckpoint as exc:
                ok = str(exc)
        verdicts = gather(ok, world)
        bad = {r: v for r, v in enumerate(verdicts) if v is not True}
        if not bad:
            break
        if rank == 0:
            problem = "; ".join(f"rank {r}: {v}" for r, v in bad.items())
            m.store.note_corrupt(choice, f"other ranks read different bytes ({problem})")
            say(f"skipping checkpoint {shared['name']}: not every rank read rank 0's bytes ({problem}); "
                "falling back to an older one")
    load_into(m.states, load_blobs(blobs))
    info = CheckpointInfo(step=shared["step"], path=shared["path"], status=COMPLETE, files=shared["files"],
                          run_id=shared["run_id"], verified=True)
    m.resumed = m.store.index.get(shared["name"], info) if rank == 0 else info
    m.resumed.verified = True
    if m.store is not None:
        m.store.protected = m.resumed.name
    if m.record.adopt(shared["run_id"]):
        if rank == 0:
            say(f"continuing the lineage of checkpoint {shared['name']} (run id {shared['run_id']})")
            save_record(m.storage, m.record)
    return m.resumed
