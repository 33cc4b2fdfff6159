"""Preemption: a SIGTERM (spot reclaim, node drain, ``kubectl delete pod``) costs no training steps.

On SIGTERM a worker does not die mid-step.  Its handler only raises a flag;
at the next control sync (:mod:`gradyard.checkpoint.manager`, at most about
half a second later) every rank learns of it, together they checkpoint the
step just finished, wait until it is durable, and stop with
:class:`~gradyard.checkpoint.manager.Preempted`; the restarted group resumes
from that very step.  If the checkpoint is not durable within
``failure.preemption_grace_s`` the process exits anyway (a second SIGTERM
exits at once), since whoever sent the signal will not wait forever.

Ray's own preemption notice (a node being drained, ``ray.train``'s
``PreemptionInfo``) is read at the same syncs and answered with a checkpoint;
training goes on, and Ray restarts the group if the node does go.

Installing the handler: a Python signal handler can only be set from the
process's main thread.  Under torchrun the training loop runs there.  Under
Ray Train it runs in a thread of the worker actor, whose main thread serves
the actor's calls; the handler is set there through the actor's
``__ray_call__`` (it runs a function on the actor's own executor thread).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Optional

log = logging.getLogger("gradyard.preemption")

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a process killed by SIGTERM reports


class PreemptionNotice:
    """This process's preemption state: set by the signal handler, read at control syncs."""

    def __init__(self, grace_s: float = 30.0):
        self.grace_s = grace_s
        self.reason: Optional[str] = None
        self._requested = threading.Event()
        self._saved = threading.Event()
        self._timer: Optional[threading.Timer] = None
        self._finished = False
        self.previous: Any = signal.SIG_DFL
        """The handler this one replaced: what a SIGTERM does once training is over."""

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    @property
    def stop(self) -> bool:
        """A SIGTERM asks the process to go: stop after the checkpoint."""
        return self._requested.is_set()

    def request(self, reason: str) -> None:
        if self._requested.is_set():  # a second signal: the sender will not wait
            log.error("%s again: exiting now", reason)
            os._exit(EXIT_PREEMPTED)
        self.reason = reason
        self._requested.set()
        # If the checkpoint cannot be made durable in time, go anyway.
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        log.warning("%s: checkpointing the current step, then stopping (grace %.0fs)", reason, self.grace_s)

    def _expire(self) -> None:
        if not self._saved.is_set():
            log.error("preemption: no durable checkpoint within %.0fs of the %s; exiting", self.grace_s, self.reason)
            os._exit(EXIT_PREEMPTED)

    def saved(self) -> None:
        """The preemption checkpoint is done (durable, or failed for good)."""
        self._saved.set()

    def drain_notice(self, rank: int) -> bool:
        """Ray Train's preemption info says this worker's node is being drained (once per notice)."""
        context = "ray.train.v2._internal.execution.context"
        if context not in sys.modules:  # not a Ray Train worker (torchrun): nothing to ask, and no Ray to import
            return False
        try:
            from ray.train.v2._internal.execution.context import get_train_context

            info = get_train_context().preemption_context.preemption_info
        except Exception:  # noqa: BLE001 - not under Ray Train v2, or its internals moved
            return False
        return info is not None and rank in getattr(info, "preempted_ranks", ())

    # -------------------------------------------------------------- installing

    def finished(self) -> None:
        """Training is over (done or failed): a SIGTERM now is the launcher shutting the worker down."""
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()

    def _handler(self, signum: int, frame: Any) -> None:
        if self._finished:
            if callable(self.previous):
                self.previous(signum, frame)
            elif self.previous != signal.SIG_IGN:
                os._exit(EXIT_PREEMPTED)
            return
        self.request(signal.Signals(signum).name)

    def install(self, launcher: str) -> bool:
        """Catch SIGTERM in this process; True when the handler is in place."""
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handler)
            return True
        if launcher == "ray":
            try:
                import ray

                _PROCESS_NOTICE[0] = self  # the actor's main thread is in this process: it finds it here
                actor = ray.get_runtime_context().current_actor
                ray.get(actor.__ray_call__.remote(_install_on_main), timeout=30)
                return True
            except Exception as exc:  # noqa: BLE001 - without it a SIGTERM ends the worker as Ray's default does
                log.warning("preemption: could not catch SIGTERM in this Ray worker (%s); a SIGTERM ends it "
                            "without a checkpoint of the current step", exc)
        return False


def _install_on_main(actor_self: Any) -> None:
    """Runs on the Ray worker actor's main thread (``__ray_call__``): set this process's handler."""
    notice = _PROCESS_NOTICE[0]
    notice.previous = signal.signal(signal.SIGTERM, notice._handler)


_PROCESS_NOTICE: list[Optional[PreemptionNotice]] = [None]
