"""The callbacks every run has: progress lines and checkpoints."""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from gradyard.checkpoint import CheckpointWriter, Snapshot, to_cpu
from gradyard.events import Callback, Event
from gradyard.storage import Storage

log = logging.getLogger("gradyard")


def _distributed(state) -> bool:
    return dist.is_available() and dist.is_initialized() and state.world_size > 1


class ProgressCallback(Callback):
    """Rank 0 prints one line per epoch, and one every ``every_s`` seconds in between."""

    name = "progress"

    def __init__(self, every_s: float = 15.0):
        self.every_s = every_s
        self._last = time.monotonic()

    def on_event(self, event: Event, state) -> None:
        if state.rank != 0:
            return
        if event is Event.BATCH_END and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            total = state.trainer.total_steps
            loss = float(state.loss.detach()) if state.loss is not None else float("nan")
            print(f"[{state.spec.name}] epoch {state.epoch + 1} step {state.step}/{total} "
                  f"loss {loss:.4f}", flush=True)
        elif event is Event.EPOCH_END:
            self._last = time.monotonic()
            m = state.metrics
            parts = [f"[{state.spec.name}] epoch {m.get('epoch', state.epoch)}",
                     f"step {state.step}/{state.trainer.total_steps}",
                     f"loss {m.get('train_loss', float('nan')):.4f}"]
            if "train_accuracy" in m:
                parts.append(f"acc {m['train_accuracy']:.4f}")
            if "test_loss" in m:
                parts.append(f"test_loss {m['test_loss']:.4f}")
            if "test_accuracy" in m:
                parts.append(f"test_acc {m['test_accuracy']:.4f}")
            parts.append(f"samples/s {m.get('samples_per_second', 0):.0f}")
            print("  ".join(parts), flush=True)


class CheckpointCallback(Callback):
    """Takes checkpoints by steps, seconds and epoch end; rank 0 writes them in the background."""

    name = "checkpoint"

    def __init__(self, storage: Storage, spec, rank: int):
        c = spec.checkpoint
        self.cfg = c
        self.rank = rank
        self.writer = (CheckpointWriter(storage, keep=c.keep, best_metric=c.best_metric,
                                        best_mode=c.best_mode) if rank == 0 else None)
        self._last_time = time.monotonic()
        self._last_step = -1

    def _due_by_time(self, state) -> bool:
        if self.cfg.every_seconds is None:
            return False
        flag = torch.tensor([1 if time.monotonic() - self._last_time >= self.cfg.every_seconds else 0])
        if _distributed(state):
            # Rank 0's clock decides, so every rank joins the same checkpoint.
            if state.device.type == "cuda":
                flag = flag.to(state.device)
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def on_event(self, event: Event, state) -> None:
        if event is Event.BATCH_END:
            every = self.cfg.every_steps
            if (every and state.step % every == 0) or self._due_by_time(state):
                self.save(state)
        elif event is Event.EPOCH_END and self.cfg.at_epoch_end:
            self.save(state)
        elif event is Event.FIT_END:
            self.save(state)
            if self.writer is not None:
                self.writer.wait()
                self._sync_stats(state)

    def save(self, state) -> None:
        if state.step == self._last_step:
            return
        t0 = time.perf_counter()
        rng = state.trainer.rng_states()
        if self.rank == 0:
            files = {
                "model.pt": to_cpu(state.model.state_dict()),
                "optimizer.pt": to_cpu(state.optimizer.state_dict()),
                "state.pt": {"trainer": to_cpu(state.trainer.state_dict()), "rng": rng},
            }
            snap = Snapshot(step=state.step, epoch=state.epoch, files=files,
                            metrics=_plain(state.metrics), spec_hash=state.spec.spec_hash())
            self.writer.submit(snap)
            self._sync_stats(state)
        blocked = time.perf_counter() - t0
        stats = state.checkpoint_stats
        stats["last_blocked_seconds"] = blocked
        stats["blocked_seconds"].append(round(blocked, 6))
        self._last_step = state.step
        self._last_time = time.monotonic()
        if self.rank == 0:
            log.info("checkpoint at step %d handed to the background writer; training blocked %.3fs",
                     state.step, blocked)
        state.trainer.fire(Event.CHECKPOINT_SAVED)

    def _sync_stats(self, state) -> None:
        state.checkpoint_stats["failures_total"] = self.writer.failures_total
        state.checkpoint_stats["saved_total"] = self.writer.saved_total

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
