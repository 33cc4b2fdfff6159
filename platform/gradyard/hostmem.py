"""Host-memory allocator settings of a training worker (glibc malloc's mmap and trim thresholds).

Why: a training step allocates and frees the same large CPU tensors every
step (activations, gradient buckets, optimizer temporaries; on GPU nodes the
data pipeline's batches).  With glibc's defaults a block above the *mmap
threshold* (128 KiB, raised on the fly up to 32 MiB) is a fresh ``mmap`` and is
unmapped again when freed, and freed heap memory above the *trim threshold*
is handed back to the kernel.  Either way the next step's tensors land on
fresh pages: a page fault and a zeroed page for every 4 KiB, every step.
With the defaults, two training *threads* in one process also each settle
into a speed of their own for the rest of the run; with the thresholds fixed
they do not.  ``docs/benchmarks.md`` has the measured effect, with the command
that measures it (``GRADYARD_MALLOC_TUNING=0`` turns it off).

Limit: glibc gives every thread its own arena, and a thread arena's heaps
hold at most 64 MiB, so on a thread other than the main one (Ray Train runs
the training loop in one) a larger block is still mapped afresh each step;
torchrun workers train on their main thread.

What: :func:`tune_host_allocator` fixes both thresholds high
(``mallopt(M_MMAP_THRESHOLD)``, ``mallopt(M_TRIM_THRESHOLD)``), which also turns
glibc's dynamic threshold off.  Freed memory then stays with the process and
is reused by the next step: the same trade every caching allocator makes
(PyTorch's CUDA caching allocator; jemalloc and tcmalloc, which PyTorch's CPU
performance guide recommends through ``LD_PRELOAD``).  A worker's resident
memory stays near its peak instead of falling between steps.

Decision: ``mallopt`` through ctypes, not an ``LD_PRELOAD`` of jemalloc or
tcmalloc: nothing to install on every node, it works under Ray and plain
torchrun alike (the environment of a Ray worker is fixed before gradyard's
code runs), and glibc is what the image and the test machines have.  A user
who preloads another allocator, or sets glibc's own knobs
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``), keeps
theirs: gradyard then changes nothing.  ``GRADYARD_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform as _platform
from typing import Optional

log = logging.getLogger(__name__)

ENV = "GRADYARD_MALLOC_TUNING"
"""Set to 0 (or false/no/off) to keep glibc's defaults in the workers."""

MMAP_THRESHOLD = 256 << 20
"""Blocks up to 256 MiB come from the heap and are reused, not mapped and unmapped each step."""

TRIM_THRESHOLD = 1 << 30
"""Up to 1 GiB of free memory at the top of the heap stays with the process."""

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3

_USER_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied: Optional[dict] = None


def _disabled(env: dict) -> bool:
    return env.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")


def allocator_choice(env: Optional[dict] = None) -> tuple[bool, str]:
    """(tune?, why): whether :func:`tune_host_allocator` changes anything in this process, and why not."""
    env = os.environ if env is None else env
    if _disabled(env):
        return False, f"{ENV}=0"
    preload = env.get("LD_PRELOAD", "")
    other = next((a for a in _OTHER_ALLOCATORS if a in preload), None)
    if other:
        return False, f"{other} is preloaded (LD_PRELOAD)"
    knobs = [k for k in _USER_KNOBS if k in env and (k != "GLIBC_TUNABLES" or "malloc" in env[k])]
    if knobs:
        return False, f"glibc malloc is configured by the environment ({', '.join(knobs)})"
    if _platform.system() != "Linux" or _platform.libc_ver()[0] != "glibc":
        return False, "not glibc"
    return True, ""


def tune_host_allocator() -> dict:
    """Fix glibc malloc's mmap and trim thresholds in this process (once); returns what holds.

    ``{"allocator": "glibc", "tuned": True, "mmap_threshold": ..., "trim_threshold": ...}``
    or ``{"allocator": ..., "tuned": False, "reason": ...}``.  Never raises: a
    worker trains with the defaults if the call is refused.
    """
    global _applied
    if _applied is not None:
        return dict(_applied)
    tune, why = allocator_choice()
    result: dict = {"allocator": "glibc" if _platform.libc_ver()[0] == "glibc" else "other", "tuned": False}
    if not tune:
        result["reason"] = why
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
        except (OSError, AttributeError) as exc:
            ok, why = False, f"mallopt unavailable ({exc})"
        else:
            why = "mallopt refused the thresholds"
        if ok:
            result.update(tuned=True, mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD)
        else:
            result["reason"] = why
            log.warning("host allocator left at glibc's defaults: %s", why)
    _applied = result
    return dict(result)
