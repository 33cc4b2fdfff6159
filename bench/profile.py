"""Where a worker's time goes: py-spy samples sorted by the module of their innermost Python frame.

A sample's category is the module its innermost Python frame belongs to, named
by the first two parts of the module's dotted name (``torch.nn``,
``torch.optim``, ``gradyard.telemetry``, ...), found from the frame's file and
the directories Python imports from, so no file of gradyard is named here.
Only samples of a thread inside ``Trainer.fit`` count (start-up and Ray's own
threads are not the loop).  py-spy samples a thread only while it runs (a wait
in C that released the GIL is idle), so the counts are busy time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from bench.env import ROOT, VENV_BIN, Bench

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")
_ROOTS = sorted({os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}, key=len, reverse=True)


def module_of(file: str) -> str:
    """``a/b/site-packages/torch/nn/modules/conv.py`` → ``torch.nn``; a script → its file name."""
    real = os.path.realpath(file)
    for root in _ROOTS:
        if real.startswith(root + os.sep):
            parts = Path(real[len(root) + 1:]).with_suffix("").parts
            return ".".join(parts[:2]) if parts[0] not in ("__main__",) else parts[-1]
    parts = Path(file).with_suffix("").parts  # py-spy may print paths relative to the process
    for i, p in enumerate(parts):
        if p in ("gradyard", "torch"):
            return ".".join(parts[i:i + 2])
    return Path(file).name


def _frames(stack: str) -> list[tuple[str, str]]:
    return [(m["func"], m["file"]) for part in stack.split(";") if (m := _FRAME.match(part.strip()))]


def categorize(frames: list[tuple[str, str]]) -> Optional[str]:
    """The module of the innermost frame of a sample in the training loop; None outside it."""
    if not any(func == "Trainer.fit" for func, _ in frames):
        return None
    return module_of(frames[-1][1])


def parse(text: str, thread: Optional[str] = None) -> dict[str, Counter]:
    """py-spy ``--format raw`` (``--threads`` when ``thread`` is a pattern with one group naming
    the arm) → samples per category per thread group (``"all"`` without ``thread``)."""
    out: dict[str, Counter] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        key = "all"
        if thread is not None:
            head, _, stack = stack.partition(";")
            m = re.match(thread, head.strip())
            if not m:
                continue
            key = m[1]
        cat = categorize(_frames(stack))
        if cat is not None:
            out.setdefault(key, Counter())[cat] += int(count)
    return out


def record(pid: int, out: Path, rate: int = 100, threads: bool = False) -> subprocess.Popen:
    """``py-spy record`` of one process into ``out`` (raw format) until it exits or gets SIGINT."""
    return subprocess.Popen(
        [str(VENV_BIN / "py-spy"), "record", "--pid", str(pid), "--nonblocking", "--format", "raw",
         "--rate", str(rate), "--output", str(out), *(["--threads"] if threads else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def leaf_functions(text: str, top: int = 6) -> list[dict]:
    """The busiest innermost Python functions of any process (the S3 server's, say)."""
    counts: Counter = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = _frames(stack) if count.isdigit() else []
        if frames:
            counts[f"{frames[-1][0]} ({module_of(frames[-1][1])})"] += int(count)
    total = sum(counts.values()) or 1
    return [{"function": k, "samples": v, "share": v / total} for k, v in counts.most_common(top)]


class Spy:
    """``py-spy record`` of one process while the ``with`` block runs; ``.functions`` on exit
    (None when py-spy wrote nothing: it could not attach)."""

    def __init__(self, pid: int, out: Path):
        self.pid, self.out, self.functions = pid, out, None

    def __enter__(self) -> "Spy":
        self.proc = record(self.pid, self.out)
        time.sleep(1.0)  # attached before the work starts
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.out.exists():
            self.functions = leaf_functions(self.out.read_text())


def _rank0_child(parent: subprocess.Popen, timeout: float = 120) -> Optional[int]:
    """PID of the torchrun worker with RANK=0 under ``parent``, once it exists."""
    from testkit.processes import psutil as _psutil

    ps = _psutil()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and parent.poll() is None:
        try:
            for child in ps.Process(parent.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "0" and "python" in child.name():
                        return child.pid
                except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                    pass
        except ps.NoSuchProcess:
            return None
        time.sleep(0.1)
    return None


def profile_arms(bench: Bench, cmd: list[str], folder: Path, rate: int) -> dict:
    """Run a telemetry A/B command with py-spy on its rank 0, each arm's thread (``arm-NAME``) apart."""
    out, log = folder / "rank0.pyspy", open(folder / "run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    spy = None
    try:
        pid = _rank0_child(proc)
        if pid is None:
            raise RuntimeError(f"no rank-0 worker appeared (see {folder / 'run.log'})")
        spy = record(pid, out, rate=rate, threads=True)
        if proc.wait(timeout=900) != 0:
            raise RuntimeError(f"the profiled run failed (see {folder / 'run.log'})")
        spy.wait(timeout=60)
        arms = parse(out.read_text(), thread=r"thread \(\w+\): arm-(\w+)$")
        if set(arms) != {"on", "off"}:
            raise RuntimeError(f"py-spy saw the arms {sorted(arms)}, not on and off")
        return {"arms": {k: dict(v.most_common()) for k, v in arms.items()}, "rate": rate}
    finally:
        log.close()
        for p in (proc, spy):
            if p is not None and p.poll() is None:
                p.kill()
