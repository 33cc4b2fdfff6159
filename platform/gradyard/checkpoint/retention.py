"""Which checkpoints retention may delete: a pure function of what is known about each.

The rules, each one a guarantee (docs/checkpoints.md names the tests):

* Only checkpoints of the run's own lineage (``manifest.run_id``) are ever
  deleted.  Foreign ones (another run's) and format-1 ones (no lineage) are
  left for a human, and ``gradyard checkpoints`` lists them.
* Corrupt checkpoints are never deleted: they are evidence, and a human decides.
* ``keep`` counts *verified* checkpoints only: those this attempt wrote (hashed
  as they were written) and the one it resumed from (hashed as it was read).
  A checkpoint of the right size but unverified never takes a verified one's place.
* The newest verified checkpoint, the one the attempt resumed from and the
  best one by ``best_metric`` are never deleted.
* An own complete checkpoint goes only once ``keep`` verified ones newer than
  it exist.
* Incomplete checkpoints (no manifest: never published) older than the newest
  verified one are a crash's leftovers and go; so do abandoned ``.partial-``
  folders.  Deleting them loses nothing that was ever published.
"""

from __future__ import annotations

from typing import Iterable, Optional

from gradyard.checkpoint.format import COMPLETE, INCOMPLETE, CheckpointInfo


def to_delete(infos: Iterable[CheckpointInfo], *, run_id: str, keep: int,
              protected: Iterable[str] = (), best_metric: Optional[str] = None,
              best_mode: str = "max") -> list[CheckpointInfo]:
    """The checkpoints of ``infos`` that retention removes (see the module docstring)."""
    infos = sorted(infos, key=lambda i: (i.step, i.time or 0.0))
    own = [i for i in infos if i.status == COMPLETE and i.lineage(run_id) == "own"]
    verified = [i for i in own if i.verified]
    kept = {i.name for i in verified[-keep:]} | set(protected)
    if verified:
        kept.add(verified[-1].name)
    scored = [i for i in own if best_metric and _number(i.metrics.get(best_metric)) is not None]
    if scored:
        pick = max if best_mode == "max" else min
        kept.add(pick(scored, key=lambda i: _number(i.metrics[best_metric])).name)
    out: list[CheckpointInfo] = []
    if len(verified) >= keep:
        oldest_kept = verified[-keep].step
        out += [i for i in own if i.name not in kept and i.step < oldest_kept]
    if verified:
        newest = verified[-1].step
        out += [i for i in infos if i.status == INCOMPLETE and i.step < newest and i.name not in kept]
    return out


def _number(value) -> Optional[float]:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if x == x else None  # NaN is not a score
