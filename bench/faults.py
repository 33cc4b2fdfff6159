"""4. Faults: seconds from a rank's SIGSTOP to the hang report, and from a SIGTERM to a durable checkpoint.

Plain torchrun (2 gloo workers, circles, slow steps so the fault lands mid-run, checkpoints to local
disk), gradyard's torchrun entry with the slow steps passed in by testkit's wrapper.  Each round, in
one run:

* **hang**: after the first checkpoint, SIGSTOP rank 1; time to rank 0's "hang detected" line (the
  bound is ``failure.hang_timeout_s``, the floor, since these steps are short) and to the first line
  of the restarted group's resume;
* **preemption**: once the resumed group has checkpointed again, SIGTERM rank 1; time until the checkpoint of the step in
  progress is on disk (its manifest, of a step off the schedule), and to the restarted group's resume
  from exactly that step.

Lines are timed as they arrive from torchrun's output (unbuffered), on this machine's clock.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from bench.env import JOBS, PY, ROOT, Bench
from bench.settings import Size
from bench.stats import summary

NAME = "faults"
TITLE = "4. A hang, and a SIGTERM"
NEEDS_CLUSTER = False

HANG_FLOOR_S = 4.0
EVERY = 50


class _Run:
    """One torchrun of circles with slow steps; its output lines timed on arrival."""

    def __init__(self, storage: Path, *overrides: str):
        self.storage = storage
        sets = [a for o in ("schedule.epochs=null", "schedule.steps=2000", f"checkpoint.every_steps={EVERY}",
                            "checkpoint.at_epoch_end=false", "telemetry.enabled=false", "scaling.num_workers=2",
                            *overrides) for a in ("--set", o)]
        self.cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "--max-restarts", "3", "--monitor-interval", "0.2", str(ROOT / "testkit" / "torchrun_faults.py"),
                    "--slow", "0.03", str(JOBS / "circles.yaml"), "--storage", str(storage), *sets]
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def wait_for(self, pattern: str, after: float = 0.0, timeout: float = 120) -> tuple[float, str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if t >= after and rx.search(line):
                    return t, line
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        tail = "\n".join(l for _, l in self.lines[-40:])
        raise RuntimeError(f"no line matching {pattern!r}:\n{tail}")

    def manifests(self) -> dict[str, float]:
        d = self.storage / "circles" / "checkpoints"
        return {p.parent.name: p.stat().st_mtime for p in d.glob("*/manifest.json")} if d.is_dir() else {}

    def rank_pid(self, rank: int) -> int:
        from testkit.processes import psutil

        ps = psutil()
        for child in ps.Process(self.proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "torchrun_faults.py" in " ".join(child.cmdline()):
                    return child.pid
            except (ps.NoSuchProcess, ps.AccessDenied):
                pass
        raise RuntimeError(f"no rank {rank} worker")

    def stop(self) -> None:
        from testkit.processes import psutil

        ps = psutil()
        try:
            procs = [ps.Process(self.proc.pid), *ps.Process(self.proc.pid).children(recursive=True)]
        except ps.NoSuchProcess:
            return
        for p in procs:
            try:
                p.kill()
            except ps.NoSuchProcess:
                pass
        self.proc.wait(30)


def _first_checkpoint(run: _Run, after: dict[str, float] | None = None) -> None:
    """Wait for a checkpoint not in ``after`` (the first one, by default)."""
    deadline = time.monotonic() + 180
    while not set(run.manifests()) - set(after or {}):
        if time.monotonic() > deadline or run.proc.poll() is not None:
            raise RuntimeError("no checkpoint:\n" + "\n".join(l for _, l in run.lines[-40:]))
        time.sleep(0.05)
    time.sleep(0.5)


def _round(bench: Bench, i: int) -> dict:
    """In one run: SIGSTOP rank 1 until the hang is reported and the group resumes; then SIGTERM it."""
    run = _Run(bench.fresh(f"faults-{i}"), f"failure.hang_timeout_s={HANG_FLOOR_S}")
    try:
        _first_checkpoint(run)
        os.kill(run.rank_pid(1), signal.SIGSTOP)
        t0 = time.monotonic()
        t_detect, report = run.wait_for(r"hang detected", after=t0)
        t_resumed, _ = run.wait_for(r"resumed from checkpoint at step", after=t_detect)
        if "rank(s) 1 did not arrive" not in report:
            raise RuntimeError(f"the report does not name rank 1: {report}")
        hang = {"detect_seconds": t_detect - t0, "resumed_seconds": t_resumed - t0}
        _first_checkpoint(run, after=run.manifests())  # the resumed group checkpoints again
        before = run.manifests()
        os.kill(run.rank_pid(1), signal.SIGTERM)
        t0 = time.monotonic()
        deadline = t0 + 60
        while not (new := [n for n in run.manifests() if n not in before and int(n.split("_")[1][:9]) % EVERY]):
            if time.monotonic() > deadline:
                raise RuntimeError("no preemption checkpoint:\n" + "\n".join(l for _, l in run.lines[-40:]))
            time.sleep(0.005)
        t_durable = time.monotonic()
        step = int(new[0].split("_")[1][:9])
        t_resumed, line = run.wait_for(r"resumed from checkpoint at step", after=t0)
        if f"at step {step} " not in line:
            raise RuntimeError(f"resumed elsewhere than the preemption checkpoint (step {step}): {line}")
        return {**{f"hang_{k}": v for k, v in hang.items()},
                "term_durable_seconds": t_durable - t0, "term_resumed_seconds": t_resumed - t0, "term_step": step}
    finally:
        run.stop()


ROWS = [("SIGSTOP → \"hang detected\" report naming rank 1", "hang_detect_seconds"),
        ("SIGSTOP → the restarted group resumes", "hang_resumed_seconds"),
        ("SIGTERM → the checkpoint of the step in progress is durable", "term_durable_seconds"),
        ("SIGTERM → the restarted group resumes from it", "term_resumed_seconds")]


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    rounds = []
    for i in range(size.fault_rounds):
        rounds.append(_round(bench, i))
        say(f"  faults round {i + 1}/{size.fault_rounds}: hang reported after {rounds[-1]['hang_detect_seconds']:.1f}s "
            f"(floor {HANG_FLOOR_S:g}s), SIGTERM's checkpoint durable after {rounds[-1]['term_durable_seconds']:.2f}s")
    return {"tables": [{"title": f"circles, 2 torchrun workers, slow steps, a checkpoint every {EVERY} steps, "
                                 f"failure.hang_timeout_s {HANG_FLOOR_S:g} (the floor); absolute times",
                        "columns": ["interval", "seconds"],
                        "rows": [[what, summary([r[k] for r in rounds])] for what, k in ROWS]}],
            "rounds": rounds,
            "commands": {"each round": "torchrun --standalone --nproc-per-node 2 --max-restarts 3 "
                         f"testkit/torchrun_faults.py --slow 0.03 jobs/circles.yaml --set checkpoint.every_steps={EVERY} "
                         f"--set failure.hang_timeout_s={HANG_FLOOR_S:g} ..."}}
