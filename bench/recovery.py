"""3. Recovery: seconds from a worker's SIGKILL to the first step of the resumed run.

A real gradyard run on the bench's Ray cluster (fashion-cnn, 2 workers,
checkpoints every 10 steps to local disk) whose rank 1 SIGKILLs itself after
steps 25, 45, 65, ... (testkit.faults, passed in by testkit/launch_faults.py): one
kill per repeat, each 5 steps after a checkpoint, all in one run, so the
repeats pay Ray's job start-up once.  Each kill is a separate recovery: Ray
Train notices the dead worker, starts a new worker group, and gradyard resumes
from the newest checkpoint.  The fault hook logs the time of each kill just
before it and rank 0's first step of every attempt; ``attempts.json`` has when
each worker group started, which splits every figure into "Ray notices and
restarts the workers" and "gradyard resumes from the checkpoint and takes a step".
"""

from __future__ import annotations

import shutil
from typing import Callable

from bench.contenders import Workload, gradyard_command
from bench.env import PY, ROOT, Bench, read_json
from bench.settings import Size
from bench.stats import summary

NAME = "recovery"
TITLE = "3. Recovery after a worker's SIGKILL"
NEEDS_CLUSTER = True

FIRST_KILL = 25
KILL_EVERY = 20
EVERY = 10


def kill_steps(n: int) -> list[int]:
    return [FIRST_KILL + KILL_EVERY * i for i in range(n)]


def timeline(events: list[dict], start_times: list[float], kills: list[int]) -> list[dict]:
    """One record per kill: when it happened, when the next worker group started, and the
    resumed attempt's first step (which must come right after the checkpoint before the kill)."""
    killed = [e for e in events if e["event"] == "kill"]
    firsts = [e for e in events if e["event"] == "first_step"]
    if [e["step"] for e in killed] != kills:
        raise RuntimeError(f"expected kills at steps {kills}, the fault log has "
                           f"{[e['step'] for e in killed]}")
    out = []
    for k in killed:
        start = min((t for t in start_times if t > k["time"]), default=None)
        first = next((e for e in firsts if e["time"] > k["time"]), None)
        resumed = k["step"] // EVERY * EVERY
        if start is None or first is None or first["step"] != resumed + 1:
            raise RuntimeError(f"after the kill at step {k['step']}: worker group start {start}, "
                               f"first step {first}; expected a resume from step {resumed}")
        out.append({"killed_at_step": k["step"], "resumed_from_step": resumed,
                    "seconds_to_first_resumed_step": first["time"] - k["time"],
                    "kill_to_new_worker_group": start - k["time"],
                    "new_worker_group_to_first_step": first["time"] - start})
    return out


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    kills = kill_steps(size.recovery_rounds)
    wl = Workload("fashion-cnn", steps=kills[-1] + 15, checkpoint_every=EVERY)
    storage = bench.fresh("recovery")
    marker = storage / "faults.log"
    faults = ["--kill-at", ",".join(map(str, kills)), "--kill-rank", "1", "--marker", str(marker)]
    cmd = gradyard_command(bench, wl, str(storage), "client",
                           (f"failure.max_failures={len(kills)}",))
    # `gradyard run`, with the kills passed in explicitly (testkit's launcher).
    cmd = [PY, str(ROOT / "testkit" / "launch_faults.py"), *faults, *cmd[2:]]
    bench.run(cmd, name="recovery")
    from testkit.faults import read_marker

    run_dir = storage / wl.spec().name
    s = read_json(run_dir / "summary.json")
    attempts = read_json(run_dir / "attempts.json")
    if s["restarts"] != len(kills):
        raise RuntimeError(f"expected {len(kills)} restarts, got {s['restarts']}")
    rounds = timeline(read_marker(str(marker)), attempts["start_times"], kills)
    for i, r in enumerate(rounds):
        say(f"  recovery {i + 1}/{len(rounds)} (kill at step {r['killed_at_step']}): "
            f"{r['seconds_to_first_resumed_step']:.2f}s (restart {r['kill_to_new_worker_group']:.2f}s"
            f" + resume {r['new_worker_group_to_first_step']:.2f}s)")
    shutil.rmtree(storage, ignore_errors=True)
    return {"tables": [{"title": f"fashion-cnn on the bench's Ray cluster, 2 workers, a checkpoint every {EVERY} "
                                 f"steps to local disk; rank 1 SIGKILLed after steps {', '.join(map(str, kills))} "
                                 "(one run); absolute times",
                        "columns": ["interval", "seconds"],
                        "rows": [[what, summary([r[k] for r in rounds])] for what, k in ROWS]}],
            "rounds": rounds, "commands": {"the run": bench.shown(cmd)}}


ROWS = [("SIGKILL → first resumed step ends", "seconds_to_first_resumed_step"),
        ("SIGKILL → new worker group's rank 0 starts (Ray: detect, tear down, restart)", "kill_to_new_worker_group"),
        ("→ first step ends (gradyard: find and load the checkpoint, rebuild, one step)",
         "new_worker_group_to_first_step")]
