"""The callback every run has: progress lines (checkpoints are the trainer's, see gradyard.checkpoint)."""

from __future__ import annotations

import time

from gradyard.events import Callback, Event


class ProgressCallback(Callback):
    """Rank 0 prints one line per epoch, and one every ``every_s`` seconds in between."""

    name = "progress"
    critical = False
    events = frozenset((Event.BATCH_END, Event.EPOCH_END))

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
