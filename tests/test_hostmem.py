"""gradyard.hostmem: the worker's glibc malloc settings, and when gradyard leaves them alone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
from gradyard import hostmem

pytestmark = pytest.mark.unit

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Held 16 MiB block: mmapped under glibc's defaults (threshold 128 KiB at start), from the heap
# once the threshold is fixed at 256 MiB.  mallinfo2().hblks counts the mmapped blocks held.
PROBE = r"""
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
from gradyard.hostmem import tune_host_allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
result = tune_host_allocator()
before = libc.mallinfo2().hblks
block = libc.malloc(16 << 20)
held = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"result": result, "mmapped_blocks_while_held": held}))
"""


def _probe(**env) -> dict:
    src = os.path.join(os.path.dirname(__file__), "..", "platform")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LD_PRELOAD", hostmem.ENV) and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, os.path.abspath(src)], env=clean | env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_tuned_worker_keeps_a_large_block_on_the_reusable_heap():
    tuned = _probe()
    assert tuned["result"] == {"allocator": "glibc", "tuned": True,
                               "mmap_threshold": hostmem.MMAP_THRESHOLD,
                               "trim_threshold": hostmem.TRIM_THRESHOLD}
    assert tuned["mmapped_blocks_while_held"] == 0
    # The same probe with the opt-out: glibc's defaults map the block afresh.
    default = _probe(**{hostmem.ENV: "0"})
    assert default["result"] == {"allocator": "glibc", "tuned": False, "reason": f"{hostmem.ENV}=0"}
    assert default["mmapped_blocks_while_held"] == 1


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
@pytest.mark.parametrize("env, reason", [
    ({"GRADYARD_MALLOC_TUNING": "off"}, "GRADYARD_MALLOC_TUNING=0"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc is preloaded"),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "tcmalloc is preloaded"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "configured by the environment (MALLOC_TRIM_THRESHOLD_)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, "configured by the environment (GLIBC_TUNABLES)"),
])
def test_a_users_own_allocator_settings_are_left_alone(env, reason):
    tune, why = hostmem.allocator_choice(env)
    assert tune is False and reason in why
    assert hostmem.allocator_choice({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=0"}) == (True, "")
    assert hostmem.allocator_choice({}) == (True, "")
