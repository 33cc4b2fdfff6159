"""What a checkpoint holds: a dict of Stateful objects, and the files they go into.

As in torchtitan's checkpointer, the manager saves "everything that is
Stateful" rather than a hand-kept list::

    states = {"model": model, "optimizer": optimizer, "trainer": trainer,
              "rng": RngStates(trainer), "callbacks": CallbackStates(callbacks)}

:data:`LAYOUT` says which file each goes into.  ``model.pt`` and
``optimizer.pt`` hold a plain ``state_dict`` each (what ``gradyard export``
writes out); ``state.pt`` holds ``{"trainer", "rng", "callbacks"}``.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

log = logging.getLogger("gradyard.checkpoint")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


LAYOUT: dict[str, tuple[str, ...]] = {
    "model.pt": ("model",),
    "optimizer.pt": ("optimizer",),
    "state.pt": ("trainer", "rng", "callbacks"),
}
"""File -> the states it holds; a file of one state holds that state's dict directly."""


def rng_state() -> dict:
    """This process's RNG states as tensors and plain lists (loadable with weights_only)."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    import random

    import numpy as np

    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class RngStates:
    """Every rank's RNG states, in rank order.  ``state_dict`` is a collective: every rank calls it."""

    def __init__(self, rank: int, world_size: int, seed: int, step_of=lambda: 0):
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.step_of = step_of
        """The resumed step (read after the trainer's state is loaded), for an elastic resize's streams."""

    def state_dict(self) -> list[dict]:
        import torch.distributed as dist

        mine = rng_state()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            out: list = [None] * self.world_size
            dist.all_gather_object(out, mine)
            return out
        return [mine]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) == self.world_size:
            set_rng_state(states[self.rank])
        else:
            # Elastic resize: no saved stream for this rank; derive one deterministically.
            torch.manual_seed((self.seed + 1_000 * self.step_of() + self.rank) % (2 ** 63))


class CallbackStates:
    """The state of every callback that has one, by callback name (rolling windows survive a resume)."""

    def __init__(self, callbacks: list):
        self.callbacks = callbacks

    def state_dict(self) -> dict:
        out = {}
        for cb in self.callbacks:
            state = cb.state_dict()
            if state:
                out[cb.name] = state
        return out

    def load_state_dict(self, states: dict) -> None:
        for cb in self.callbacks:
            if cb.name in states:
                try:
                    cb.load_state_dict(states[cb.name])
                except Exception as exc:  # noqa: BLE001 - an observer's window is not worth a failed resume
                    log.warning("callback %s could not restore its state (%s); it starts afresh", cb.name, exc)


def upgrade(files: dict[str, Any]) -> dict[str, Any]:
    """Format-1 ``state.pt`` kept the callbacks inside the trainer's dict: move them up."""
    state = files.get("state.pt")
    if isinstance(state, dict) and "callbacks" not in state and isinstance(state.get("trainer"), dict):
        state = dict(state)
        state["callbacks"] = state["trainer"].get("callbacks", {})
        files = {**files, "state.pt": state}
    return files


def load_into(states: dict[str, Stateful], files: dict[str, Any]) -> None:
    """Restore every state from loaded checkpoint files (see :data:`LAYOUT`)."""
    files = upgrade(files)
    for name, keys in LAYOUT.items():
        content = files[name]
        if len(keys) == 1:
            states[keys[0]].load_state_dict(content)
        else:
            for key in keys:
                states[key].load_state_dict(content[key])
