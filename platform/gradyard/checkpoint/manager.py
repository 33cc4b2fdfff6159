"""When to save, what to save, and what to keep: the checkpoint manager.

The trainer calls :meth:`CheckpointManager.at_point` at its checkpoint points
(after each step's BATCH_END, after each epoch's evaluation, and once at the
end), and fires what it returns: ``CHECKPOINT`` when a checkpoint was taken
(its state copied to host memory and handed to the background writer) and
``CHECKPOINT_SAVED`` when one became durable, or failed for good.  Nothing
else fires checkpoint events, and "saved" always means durable.

At some checkpoint points every rank joins one small collective, the
*control sync*, that decides together what no rank may decide alone: a save
due by time (rank 0's clock), a preemption notice (any rank's SIGTERM or
Ray's drain notice), a non-finite loss (any rank's).  Its interval adapts to
the step time (about every :data:`SYNC_TARGET_S` seconds, every step at the
start), and every save is preceded by one, so a non-finite state is never
checkpointed.

Resume is :mod:`gradyard.checkpoint.resume`; which checkpoints go is
:mod:`gradyard.checkpoint.retention`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from gradyard.checkpoint.format import CheckpointInfo
from gradyard.checkpoint.record import RunRecord
from gradyard.checkpoint.states import LAYOUT, CallbackStates, RngStates
from gradyard.checkpoint.store import CheckpointStore, SaveResult
from gradyard.checkpoint.writer import Snapshot, to_cpu
from gradyard.storage import DEFAULT, PATIENT, RetryPolicy, Storage, redact_tree

log = logging.getLogger("gradyard.checkpoint")

SYNC_TARGET_S = 0.5
"""Seconds between control syncs once the step time is known."""
SYNC_MAX_EVERY = 64


class TrainingStopped(Exception):
    """Training ends early, on purpose; ``retry`` says whether a restart could help."""

    retry = False


class NonFiniteLoss(TrainingStopped):
    def __init__(self, step: int, rank: Optional[int] = None):
        self.step = step
        where = f" on rank {rank}" if rank is not None else ""
        super().__init__(
            f"the loss is not finite (NaN or inf) at step {step}{where}; stopped without checkpointing it "
            "(failure.on_nonfinite: stop). The newest checkpoint before it is kept. Lower optimizer.lr, "
            "use gradient clipping or fp32, or set failure.on_nonfinite: skip to skip such steps")


class Preempted(TrainingStopped):
    """A worker was told to stop (SIGTERM); its step was checkpointed and the group restarts from it."""

    retry = True


class CheckpointFailed(TrainingStopped):
    pass


@dataclass
class Control:
    """What a control sync agreed on."""

    preempt: bool = False
    stop: bool = False
    """The preemption is a SIGTERM: stop after the checkpoint (a drain notice only checkpoints)."""
    time_due: bool = False
    nonfinite_step: Optional[int] = None
    final_needed: bool = False
    fatal: bool = False


@dataclass
class Stats:
    saved_total: int = 0
    failures_total: int = 0
    blocked_seconds: list[float] = field(default_factory=list)
    last_error: str = ""

    def to_json(self) -> dict:
        b = self.blocked_seconds
        return {"saved_total": self.saved_total, "failures_total": self.failures_total,
                "blocked_seconds": b, "blocked_seconds_mean": sum(b) / len(b) if b else 0.0,
                "blocked_seconds_max": max(b) if b else 0.0, "last_error": self.last_error}


class CheckpointManager:
    """Owns a run's checkpoints on one rank (rank 0 writes; every rank joins the collectives)."""

    def __init__(self, spec: Any, storage: Storage, *, rank: int, world_size: int, record: RunRecord,
                 lease_token: Optional[str] = None, preemption: Any = None,
                 policy: RetryPolicy = DEFAULT, final_policy: RetryPolicy = PATIENT):
        self.spec, self.cfg = spec, spec.checkpoint
        self.storage, self.rank, self.world_size = storage, rank, world_size
        self.record, self.lease_token, self.preemption = record, lease_token, preemption
        self.policy, self.final_policy = policy, final_policy
        self.states: dict[str, Any] = {}
        self.stats = Stats()
        self.resumed: Optional[CheckpointInfo] = None
        self._done: deque[SaveResult] = deque()
        self.store = CheckpointStore(storage, run_id=lambda: self.record.run_id, keep=self.cfg.keep,
                                     best_metric=self.cfg.best_metric, best_mode=self.cfg.best_mode,
                                     lease_token=lease_token, on_done=self._done.append) if rank == 0 else None
        """Rank 0 writes; the other ranks join the collectives only."""
        self._pending: Optional[SaveResult] = None
        self._last_taken: Optional[SaveResult] = None
        self._last_save_time = time.monotonic()
        self._sync_every, self._last_sync = 1, (0, time.monotonic())
        self._nonfinite: Callable[[], tuple[bool, Optional[int]]] = lambda: (False, None)
        self._device = torch.device("cpu")
        self._drained_notice = False
        self._fatal: Optional[str] = None
        """Rank 0: a reason to stop every rank at the next control sync (the run lease was lost)."""

    # ------------------------------------------------------------ wiring

    def bind(self, trainer: Any) -> None:
        """Take the trainer's Stateful objects (the dict a checkpoint holds)."""
        s = trainer.state
        self.states = {
            "model": s.model, "optimizer": s.optimizer, "trainer": trainer,
            "rng": RngStates(self.rank, self.world_size, self.spec.schedule.seed, step_of=lambda: s.step),
            "callbacks": CallbackStates(trainer.callbacks),
        }
        self._nonfinite = trainer.guard.pending
        self._device = s.device if s.device.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------ the checkpoint points

    def at_point(self, state: Any, at: str) -> list[tuple[str, SaveResult]]:
        """Save if due at this point (``step``, ``epoch`` or ``final``); returns the events to fire.

        Every decision that starts a collective (a save gathers every rank's RNG
        state) is one all ranks reach together: step counts, or the control sync.
        """
        step, every, final = state.step, self.cfg.every_steps, at == "final"
        by_steps = bool(every) and step % every == 0
        due = (at != "final" and by_steps) or (at == "epoch" and self.cfg.at_epoch_end)
        if not (due or at != "step" or step % self._sync_every == 0):
            return self._drain()
        events: list[tuple[str, SaveResult]] = self._drain()
        control = self._control_sync(state, final_needed=final and self._needs_final(step))
        if control.fatal:
            raise CheckpointFailed(self._fatal or "stopped by rank 0: its checkpoints can no longer be written "
                                                   "(see rank 0's log)")
        if control.nonfinite_step is not None:
            raise NonFiniteLoss(control.nonfinite_step)
        if control.preempt:
            events += self._taken(self._save(state, final=True, wait=True))
            if self.store is not None:
                self.store.wait()
            events += self._drain()
            if self.preemption is not None:
                self.preemption.saved()
            if control.stop:
                raise Preempted(f"preempted after step {step}: checkpointed, restarting from it")
            return events
        if due or control.time_due or control.final_needed:
            events += self._taken(self._save(state, final=final, wait=final, force=control.final_needed))
        if final and self.store is not None:
            self.store.wait()
        events += self._drain()
        if final and self._agree(bool(self._final_failure(step))):
            raise CheckpointFailed(self._final_failure(step) or
                                   f"the final checkpoint at step {step} could not be written (see rank 0's log)")
        return events

    @staticmethod
    def _taken(result: Optional[SaveResult]) -> list[tuple[str, SaveResult]]:
        return [("taken", result)] if result is not None else []

    def _needs_final(self, step: int) -> bool:
        """Rank 0: whether the end of training still needs a checkpoint of ``step`` (others say False)."""
        if self.rank != 0:
            return False
        self.store.wait()
        last = self._last_taken
        if last is not None and last.step == step:
            return last.ok is not True
        return not (last is None and self.resumed is not None and self.resumed.step == step)

    def _final_failure(self, step: int) -> str:
        last = self._last_taken
        if self.rank == 0 and last is not None and last.step == step and last.ok is False:
            return (f"the final checkpoint at step {step} could not be written: {last.error}. "
                    f"The newest published checkpoint is kept; run again to resume from it")
        return ""

    def _agree(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a collective)."""
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor([float(flag)], device=self._device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item() > 0)
        return flag

    # ------------------------------------------------------------ control sync

    def _control_sync(self, state: Any, final_needed: bool = False) -> Control:
        now = time.monotonic()
        preempt = 0.0
        if self.preemption is not None:
            if self.preemption.requested:
                preempt = 2.0 if self.preemption.stop else 1.0
            elif not self._drained_notice and self.preemption.drain_notice(self.rank):
                self._drained_notice, preempt = True, 1.0
        bad, first = self._nonfinite()
        if self.rank == 0:
            time_due = self.cfg.every_seconds is not None and now - self._last_save_time >= self.cfg.every_seconds
            steps = state.step - self._last_sync[0]
            per_step = (now - self._last_sync[1]) / steps if steps > 0 else 0.0
            target = min(SYNC_TARGET_S, (self.cfg.every_seconds or SYNC_TARGET_S * 4) / 4)
            next_every = max(1, min(SYNC_MAX_EVERY, int(target / per_step))) if per_step > 0 else 1
        else:
            time_due, next_every = False, 0
        values = [preempt, float(time_due), float(bad), -float(first if first is not None else 1e18),
                  float(next_every), float(final_needed), float(self._fatal is not None)]
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor(values, dtype=torch.float64, device=self._device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # MAX: any rank's flag; -min for the first bad step
            values = t.tolist()
        self._sync_every = max(1, int(values[4]))
        self._last_sync = (state.step, now)
        return Control(preempt=values[0] > 0, stop=values[0] > 1, time_due=values[1] > 0,
                       nonfinite_step=int(-values[3]) if values[2] > 0 else None, final_needed=values[5] > 0,
                       fatal=values[6] > 0)

    # ------------------------------------------------------------ saving

    def _save(self, state: Any, *, final: bool, wait: bool, force: bool = False) -> Optional[SaveResult]:
        step = state.step
        last = self._last_taken
        if not force and last is not None and last.step == step:
            return None  # this step is taken already (e.g. every_steps and epoch end together)
        t0 = time.perf_counter()
        with state.progress.phase("checkpoint"):
            rng = self.states["rng"].state_dict()  # a collective: every rank, every save
            result = SaveResult(step=step, final=final)
            if self.rank == 0:
                files = {}
                for name, keys in LAYOUT.items():
                    parts = {k: rng if k == "rng" else to_cpu(self.states[k].state_dict()) for k in keys}
                    files[name] = parts[keys[0]] if len(keys) == 1 else parts
                snap = Snapshot(step=step, epoch=state.epoch, files=files, manifest={
                    "run_id": self.record.run_id, "attempt": self.record.attempt,
                    "spec_hash": self.spec.spec_hash(), "world_size": self.world_size,
                    "metrics": _plain(state.metrics)})
                policy = self.final_policy if final else self.policy
                self.store.submit(snap, result, policy)
                result.blocked_s = time.perf_counter() - t0
                if wait:
                    self.store.wait()
            else:
                result.blocked_s = time.perf_counter() - t0
                result.ok = True  # nothing to write here; rank 0 reports durability
        self.stats.blocked_seconds.append(round(result.blocked_s, 6))
        self._last_taken = result
        self._last_save_time = time.monotonic()
        if self.rank == 0:
            log.info("checkpoint at step %d handed to the background writer; training blocked %.3fs",
                     step, result.blocked_s)
        return result

    def _drain(self) -> list[tuple[str, SaveResult]]:
        """Completed saves, for CHECKPOINT_SAVED (on the training thread, in order)."""
        out = []
        while self._done:
            result = self._done.popleft()
            if result.ok:
                self.stats.saved_total += 1
            else:
                self.stats.failures_total += 1
                self.stats.last_error = result.error
            out.append(("saved", result))
            if result.fatal is not None and self._fatal is None:
                self._fatal = str(result.fatal)  # every rank stops at the next control sync
        return out

    # ------------------------------------------------------------ end

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and not math.isfinite(v))}


def redacted_spec(spec: Any) -> dict:
    """The job spec as stored in checkpoints and summaries: every URL without credentials."""
    return redact_tree(spec.model_dump(mode="json"))


__all__ = ["CheckpointFailed", "CheckpointManager", "Control", "NonFiniteLoss", "Preempted", "SaveResult",
           "Stats", "TrainingStopped", "redacted_spec"]
