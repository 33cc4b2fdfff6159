"""2c. Recovery: seconds from a worker's SIGKILL to the first step of the resumed run.

A real gradyard run on the bench's Ray cluster (fashion-cnn, 2 workers,
checkpoints every 10 steps to local disk) whose rank 1 SIGKILLs itself after
step 25 (gradyard.testing.faults, through GRADYARD_FAULTS).  The fault hook
writes the time of the kill just before it; the summary of the resumed attempt
has ``first_step_at``; ``attempts.json`` has when the new worker group's
rank 0 started, which splits the figure into "Ray notices and restarts the
workers" and "gradyard resumes from the checkpoint and takes a step".
"""

from __future__ import annotations

import json
import shutil
from typing import Callable

from bench.contenders import Workload, gradyard_command
from bench.env import Bench, read_json
from bench.settings import Size
from bench.stats import summary

NAME = "recovery"
TITLE = "Recovery after a worker's SIGKILL"
NEEDS_CLUSTER = True

KILL_AT = 25
EVERY = 10


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    wl = Workload("fashion-cnn", steps=KILL_AT + max(size.short_steps, 15), checkpoint_every=EVERY)
    total, restart, resume, cmd = [], [], [], None
    for r in range(size.recovery_rounds):
        storage = bench.fresh("recovery")
        marker = storage / "killed"
        faults = {"kill_at_step": KILL_AT, "kill_rank": 1, "marker": str(marker)}
        cmd = gradyard_command(bench, wl, str(storage), "client")
        bench.run(cmd, name="recovery", env={"GRADYARD_FAULTS": json.dumps(faults)})
        run_dir = storage / wl.spec().name
        s = read_json(run_dir / "summary.json")
        attempts = read_json(run_dir / "attempts.json")
        if s["restarts"] != 1 or s["resumed_from_step"] != KILL_AT // EVERY * EVERY:
            raise RuntimeError(f"expected one restart from step {KILL_AT // EVERY * EVERY}, got "
                               f"{s['restarts']} from {s['resumed_from_step']}")
        killed_at = float(marker.read_text().split()[0])
        total.append(s["first_step_at"] - killed_at)
        restart.append(attempts["last_start"] - killed_at)
        resume.append(s["first_step_at"] - attempts["last_start"])
        say(f"  recovery round {r + 1}/{size.recovery_rounds}: {total[-1]:.2f}s "
            f"(restart {restart[-1]:.2f}s + resume {resume[-1]:.2f}s)")
        shutil.rmtree(storage, ignore_errors=True)
    return {"kill_at_step": KILL_AT, "checkpoint_every": EVERY, "resumed_from_step": KILL_AT // EVERY * EVERY,
            "seconds_to_first_resumed_step": summary(total),
            "kill_to_new_worker_group": summary(restart),
            "new_worker_group_to_first_step": summary(resume),
            "command": "GRADYARD_FAULTS='{\"kill_at_step\": 25, \"kill_rank\": 1, \"marker\": ...}' "
                       + bench.shown(cmd)}
