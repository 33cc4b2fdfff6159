"""Ray's known noise, kept out of a driver's output: a successful run prints no error line.

Ray forwards every worker's and actor's output to the driver (``log_to_driver``).
Two messages arrive on every successful run, read as failures by anyone who
sees them, and no setting prevents them without losing something:

* ``Actor with class name: 'PreemptionWatcher' ... has constructor arguments in
  the object store and max_restarts > 0 ...`` (an ``E`` line of Ray core): Ray Train's controller
  creates the watcher that relays node-drain notices (which gradyard answers
  with a checkpoint, :mod:`gradyard.preemption`) with actor handles as
  arguments and unlimited restarts.  Switching the watcher off
  (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``) would lose the notice.
* ``Failed to stop PlacementGroupCleaner gracefully`` and its traceback
  (``GetTimeoutError``): at shutdown the controller waits for its
  placement-group cleaner no longer than the cleaner's own worst case (a
  state-API call of up to 10 s), so on a busy head the wait runs out; the
  cleaner still exits with the controller and nothing is lost.  The timeout is
  a constant of Ray Train, not a setting.

Both are dropped from what the driver prints, nothing else; the full output
stays in Ray's log files.  This reaches into Ray's log dispatcher (a private
module): if its shape changes, :func:`install` does nothing and says so at
debug level, and the noise is back, not an error.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Callable

log = logging.getLogger("gradyard.raylogs")

NOISE = ((("'PreemptionWatcher'", "has constructor arguments in the object store"), False),
         (("Failed to stop PlacementGroupCleaner gracefully",), True))
"""(parts a line holds every one of, whether the traceback right after it goes too)."""
_TRACEBACK = re.compile(r"^(Traceback \(most recent call last\):|\s+\S.*|\s*"
                        r"|During handling of the above exception.*|The above exception was the direct cause.*)$")
_LAST = re.compile(r"^[\w.]+(Error|Exception|Timeout)\b.*$")
"""The exception line that ends a traceback."""


class NoiseFilter:
    """Drops :data:`NOISE` lines (and the one traceback that follows the cleaner's) per source process."""

    def __init__(self) -> None:
        self._in_traceback: dict[Any, bool] = {}
        self._lock = threading.Lock()

    def lines(self, source: Any, lines: list[str]) -> list[str]:
        keep = []
        with self._lock:
            dropping = self._in_traceback.get(source, False)
            for line in lines:
                noise = next((tb for parts, tb in NOISE if all(p in line for p in parts)), None)
                if noise is not None:
                    dropping = noise
                    continue
                if dropping and _LAST.match(line):  # its last line: what follows is shown again
                    dropping = False
                    continue
                if dropping and _TRACEBACK.match(line):
                    continue
                dropping = False
                keep.append(line)
            self._in_traceback[source] = dropping
        return keep


def install() -> bool:
    """Filter the driver's forwarded worker output (after ``ray.init``); whether it could."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            handlers = dispatcher.handlers
            for i, (name, handler) in enumerate(handlers):
                if name == "ray_print_logs" and not isinstance(handler, _Filtered):
                    handlers[i] = (name, _Filtered(handler))
                    return True
    except Exception as exc:  # noqa: BLE001 - Ray's private shape changed: keep its output as is
        log.debug("Ray's log dispatcher is not as expected (%s); its output is not filtered", exc)
    return False


class _Filtered:
    def __init__(self, handler: Callable[[dict], None]):
        self.handler = handler
        self.filter = NoiseFilter()

    def __call__(self, data: dict) -> None:
        lines = data.get("lines")
        if isinstance(lines, list):
            kept = self.filter.lines((data.get("pid"), data.get("is_err")), lines)
            if not kept:
                return
            data = {**data, "lines": kept}
        self.handler(data)
