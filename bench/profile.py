"""Where a gradyard worker's time goes: py-spy samples of its Ray workers, sorted into phases.

One more gradyard run of the benchmark's workload (on the bench's cluster with
a client driver, or on an embedded cluster, as its rounds ran), with
``py-spy record --nonblocking`` attached to both RayTrainWorker processes.
Rank 0 (the one whose samples show the checkpoint writer) is reported: its
samples inside the training loop are sorted into model compute (forward,
backward with DDP's allreduce, optimizer), data loading, and each gradyard
component met on the way (the outermost gradyard frame below the trainer
names it).  Samples of its background checkpoint writer thread, of the
telemetry's census and FLOP count (steps 1-7: before the timing), and of the
process's other threads and start-up, are counted beside the loop's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from bench.contenders import Workload, gradyard_command, gradyard_storage, read_summary
from bench.env import ROOT, VENV_BIN, Bench

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")
_LOOP_FILES = ("gradyard/trainer.py", "gradyard/train.py")
_COMPUTE_FILES = ("gradyard/models.py",)
_ONE_OFF_FILES = ("gradyard/analysis/census.py", "torch/utils/flop_counter.py")
"""The census (steps 3-7) and the FLOP count (step 1, then every 500): in the bench's runs, all
before the timed steps begin, so their samples are not shares of the timed loop.  Their callbacks'
dispatch on every other step (``CensusCallback``/``FlopsMonitor.on_event``) is per-step cost."""
ONE_OFF = "census and FLOP count (steps 1-7 here, before the timed steps)"
BACKWARD = "compute: backward + DDP allreduce"


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for part in stack.split(";"):
        m = _FRAME.match(part.strip())
        if m:
            out.append((m["func"], m["file"]))
    return out


def categorize(frames: list[tuple[str, str]]) -> str:
    """The phase or gradyard component one sample belongs to (root-to-leaf frames)."""
    if any(func == "BackgroundWriter._run" for func, _ in frames):
        return "background: checkpoint writer thread"
    if not any(func == "Trainer.fit" for func, _ in frames):
        return "outside the training loop"
    if any(file.endswith(_ONE_OFF_FILES) for _, file in frames):
        return ONE_OFF
    if any(func == "allreduce_and_wait" for func, _ in frames):
        # The telemetry comm hook's wait for the last bucket (CPU): DDP's own wait without the hook.
        return BACKWARD
    for func, file in frames:
        if "gradyard/" in file and not file.endswith(_LOOP_FILES + _COMPUTE_FILES):
            module = file[file.index("gradyard/"):].removesuffix(".py").replace("/", ".")
            return f"gradyard: {module} ({func.split('.')[0]})"
    funcs = [f for f, _ in frames]
    if any("backward" in f for f in funcs):
        return BACKWARD
    if any(f.startswith(("Optimizer.", "SGD.", "_single_tensor_sgd", "_multi_tensor_sgd", "sgd"))
           or "optimizer" in f.lower() for f in funcs):
        return "compute: optimizer"
    if any(f in ("Trainer._compute_loss",) or "forward" in f or "_call_impl" in f for f in funcs):
        return "compute: forward + loss"
    if any("DataLoader" in f or "_next_data" in f or "fetch" in f or f.endswith("__next__")
           for f in funcs):
        return "data loading"
    return "training loop, other"


def parse_raw(text: str) -> dict:
    """py-spy ``--format raw`` of one process → samples per category."""
    counts: Counter = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[categorize(_frames(stack))] += int(count)
    loop = sum(v for k, v in counts.items() if k not in _NOT_LOOP)
    return {"samples": sum(counts.values()), "loop_samples": loop,
            "categories": {k: {"samples": v, "share_of_loop": v / loop if loop else None}
                           for k, v in counts.most_common()}}


_NOT_LOOP = ("outside the training loop", "background: checkpoint writer thread", ONE_OFF)


def _record(pid: int, out: Path, rate: int = 100, threads: bool = False) -> subprocess.Popen:
    """``py-spy record`` of one process into ``out`` (raw format) until it exits or gets SIGINT."""
    return subprocess.Popen(
        [str(VENV_BIN / "py-spy"), "record", "--pid", str(pid), "--nonblocking", "--format", "raw",
         "--rate", str(rate), "--output", str(out), *(["--threads"] if threads else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class _ProfiledRun:
    """A command run to completion in ``folder`` (its log: run.log) with py-spy on some of its processes.

    ``spy(pid, out)`` attaches py-spy; ``finish()`` waits for the command, then for
    each py-spy to write its output.  On the way out nothing is left running.
    """

    def __init__(self, cmd: list[str], folder: Path):
        self.folder = folder
        self.log = open(folder / "run.log", "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        self.spies: list[subprocess.Popen] = []

    def spy(self, pid: int, out: Path, **kw) -> None:
        self.spies.append(_record(pid, out, **kw))

    def finish(self) -> None:
        if self.proc.wait(timeout=900) != 0:
            raise RuntimeError(f"the profiled run failed (see {self.folder / 'run.log'})")
        for spy in self.spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
                spy.wait(timeout=30)

    def __enter__(self) -> "_ProfiledRun":
        return self

    def __exit__(self, *exc) -> None:
        self.log.close()
        for p in [self.proc, *self.spies]:
            if p.poll() is None:
                p.kill()


def _read_rank0(out: Path, pid: int) -> str:
    if not out.exists():
        raise RuntimeError(f"py-spy recorded nothing for rank 0 (pid {pid}); no permission?")
    return out.read_text()


def _failed(exc: Exception, bench: Bench, cmd: list[str]) -> dict:
    return {"error": f"{type(exc).__name__}: {str(exc)[-500:]}", "command": bench.shown(cmd)}


def leaf_functions(text: str, top: int = 8) -> dict:
    """py-spy ``--format raw`` of any process → its busiest innermost Python functions."""
    counts: Counter = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = _frames(stack) if count.isdigit() else []
        if frames:
            func, file = frames[-1]
            counts[f"{func} ({os.path.basename(file)})"] += int(count)
    total = sum(counts.values())
    return {"samples": total,
            "functions": [{"function": k, "samples": v, "share": v / total} for k, v in counts.most_common(top)]}


class Spy:
    """``py-spy record`` of one process while the ``with`` block runs; ``.result`` on exit."""

    def __init__(self, pid: int, out: Path, rate: int = 100):
        self.pid, self.out, self.rate = pid, out, rate
        self.result: Optional[dict] = None

    def __enter__(self) -> "Spy":
        self.proc = _record(self.pid, self.out, self.rate)
        time.sleep(1.0)  # attached before the work starts
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.out.exists():
            self.result = leaf_functions(self.out.read_text())


def _ray_workers(timeout: float = 180) -> list[int]:
    """PIDs of the bench's RayTrainWorker processes (the run's: runs never overlap), once there are two."""
    from testkit.processes import psutil as _psutil

    psutil = _psutil()
    tag = os.environ["GRADYARD_BENCH_TAG"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if ("RayTrainWorker" in " ".join(proc.info["cmdline"] or [])
                        and proc.environ().get("GRADYARD_BENCH_TAG") == tag):
                    found.append(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        if len(found) >= 2:
            return sorted(found)
        time.sleep(0.2)
    return []


def profile_gradyard(bench: Bench, wl: Workload, storage_kind: str, mode: str) -> dict:
    """One more gradyard run (``client`` on the bench's cluster, or ``embedded``) under py-spy."""
    storage, extra = gradyard_storage(bench, storage_kind)
    cmd = gradyard_command(bench, wl, storage, mode, extra)
    folder = bench.fresh("pyspy")
    try:
        with _ProfiledRun(cmd, folder) as run:
            for pid in _ray_workers():
                run.spy(pid, folder / f"{pid}.txt")
            run.finish()
        summary = read_summary(bench, storage, wl.spec().name)
        pid0 = next(r["pid"] for r in summary["ranks"] if r["rank"] == 0)
        rank0 = parse_raw(_read_rank0(folder / f"{pid0}.txt", pid0))
        rank0["steps_per_second_under_pyspy"] = summary["steady_steps_per_second"]
    except Exception as exc:  # noqa: BLE001 - a profile that fails must not sink the figures
        return _failed(exc, bench, cmd)
    rank0["command"] = ("py-spy record --pid <each RayTrainWorker> --nonblocking --format raw "
                        "--rate 100, during: " + bench.shown(cmd))
    rank0["storage"] = storage_kind
    return rank0


# ----------------------------------------------------------- telemetry on vs off

_AB_ONE_OFF = "census and FLOP count"
_TELEMETRY_FILES = ("gradyard/telemetry/", "gradyard/analysis/")
"""Telemetry and the live analysis built on it: on only when ``telemetry.enabled``."""


def categorize_ab(frames: list[tuple[str, str]]) -> Optional[str]:
    """One sample of a telemetry A/B arm's thread: where in the step it is (None: not in the loop)."""
    funcs = [func for func, _ in frames]
    if "Trainer.fit" not in funcs:
        return None
    frames = frames[funcs.index("Trainer.fit"):]  # the arm's thread runs fit() from the bench script
    if any(file.endswith(_ONE_OFF_FILES) for _, file in frames):
        return _AB_ONE_OFF  # at steps 1-7 (warm-up, not recorded) and the FLOP count of step 500
    if any(func == "allreduce_and_wait" for func, _ in frames):
        return BACKWARD
    if any(func.startswith("GradSyncMonitor.") for func, _ in frames):
        return "telemetry: DDP comm hook (its Python, not the allreduce)"
    if any(any(t in file for t in _TELEMETRY_FILES) for _, file in frames):
        return "telemetry: callbacks"
    if any(file.endswith("telemetry_ab.py") for _, file in frames):
        return "bench: handing turns over"
    return categorize(frames)


def parse_ab_raw(text: str) -> dict:
    """py-spy ``--threads --format raw`` of an A/B rank → samples per category, per arm thread."""
    arms: dict[str, Counter] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        head, _, rest = stack.partition(";")
        m = re.match(r"thread \(\w+\): arm-(\w+)$", head.strip())
        if not m or not count.isdigit():
            continue
        cat = categorize_ab(_frames(rest))
        if cat is not None:
            arms.setdefault(m[1], Counter())[cat] += int(count)
    out = {}
    for arm, counts in arms.items():
        loop = sum(v for k, v in counts.items() if k != _AB_ONE_OFF)
        out[arm] = {"loop_samples": loop, "one_off_samples": counts.get(_AB_ONE_OFF, 0),
                    "categories": {k: v for k, v in counts.most_common() if k != _AB_ONE_OFF}}
    return out


def _rank0_child(parent: subprocess.Popen, timeout: float = 120) -> Optional[int]:
    """PID of the torchrun worker with RANK=0 under ``parent``, once it exists."""
    from testkit.processes import psutil as _psutil

    psutil = _psutil()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and parent.poll() is None:
        try:
            for child in psutil.Process(parent.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "0" and "python" in child.name():
                        return child.pid
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
        except psutil.NoSuchProcess:
            return None
        time.sleep(0.1)
    return None


def profile_telemetry_ab(bench: Bench, cmd: list[str], folder: Path, rate: int = 1000) -> dict:
    """Run one telemetry A/B (``cmd``) with py-spy on rank 0, each arm's thread apart."""
    out = folder / "rank0.pyspy"
    try:
        with _ProfiledRun(cmd, folder) as run:
            pid = _rank0_child(run.proc)
            if pid is None:
                raise RuntimeError(f"no rank-0 worker appeared (see {folder / 'run.log'})")
            run.spy(pid, out, rate=rate, threads=True)
            run.finish()
        arms = parse_ab_raw(_read_rank0(out, pid))
        if set(arms) != {"on", "off"}:
            raise RuntimeError(f"py-spy saw the arms {sorted(arms)}, not on and off")
    except Exception as exc:  # noqa: BLE001 - a profile that fails must not sink the figures
        return _failed(exc, bench, cmd)
    return {"arms": arms, "rate": rate,
            "command": f"py-spy record --pid <rank 0> --nonblocking --threads --format raw "
                       f"--rate {rate}, during: {bench.shown(cmd)}"}
