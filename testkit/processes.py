"""Stop the processes a test or benchmark started, and only those.

Not ``ray stop``: it would take down every Ray cluster on the machine.  The
tests and the bench tag what they start with an environment variable and
stop by that tag.
"""

from __future__ import annotations

import importlib
import os


def psutil():
    """psutil, which this venv has only inside Ray's third-party folder (on sys.path once ray is imported)."""
    importlib.import_module("ray")
    return importlib.import_module("psutil")


def kill_tagged(var: str, value: str, spare=lambda proc, env: False, grace_s: float = 10) -> int:
    """Terminate (then, after ``grace_s``, kill) the processes whose environment has ``var=value``;
    not this one.  ``grace_s=0`` kills at once."""
    ps = psutil()

    mine = []
    for proc in ps.process_iter(["pid"]):
        try:
            env = proc.environ()
            if proc.pid != os.getpid() and env.get(var) == value and not spare(proc, env):
                mine.append(proc)
        except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
            pass
    for proc in mine if grace_s > 0 else ():
        try:
            proc.terminate()
        except ps.NoSuchProcess:
            pass
    _, alive = ps.wait_procs(mine, timeout=grace_s) if grace_s > 0 else ((), mine)
    for proc in alive:
        try:
            proc.kill()
        except ps.NoSuchProcess:
            pass
    ps.wait_procs(alive, timeout=5)  # gone (ports and files released) before the caller goes on
    return len(mine)
