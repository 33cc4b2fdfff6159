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


def kill_tagged(var: str, value: str, spare=lambda proc, env: False) -> int:
    """Terminate (then kill) the processes whose environment has ``var=value``; not this one."""
    ps = psutil()

    mine = []
    for proc in ps.process_iter(["pid"]):
        try:
            env = proc.environ()
            if proc.pid != os.getpid() and env.get(var) == value and not spare(proc, env):
                mine.append(proc)
        except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
            pass
    for proc in mine:
        try:
            proc.terminate()
        except ps.NoSuchProcess:
            pass
    _, alive = ps.wait_procs(mine, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except ps.NoSuchProcess:
            pass
    return len(mine)
