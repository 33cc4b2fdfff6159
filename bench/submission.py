"""4. Submission: seconds from `ray job submit` to the first training step, on a running cluster.

Both contenders are submitted the README's way (``ray job submit --address ...
--working-dir . -- ENTRYPOINT``, here with ``--no-wait``) to the bench's
already running Ray cluster: gradyard's cluster-side entrypoint
``python -m gradyard.launch JOB`` and the plain Ray Train script.  The clock
starts just before the ``ray job submit`` process starts and stops when the
job's first optimizer step ends (its own ``first_step_at``).  One untimed
submission first puts the working directory's package in the cluster's cache,
so neither contender pays the upload alone.  When the throughput benchmark
runs too, its fashion-cnn rounds are these submissions.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

from bench.contenders import Workload, rounds, run_gradyard, run_ray_train
from bench.env import Bench
from bench.settings import Size
from bench.stats import paired, summary

NAME = "submit"
TITLE = "Submission latency"
NEEDS_CLUSTER = True


def available() -> tuple[bool, str]:
    if importlib.util.find_spec("gradyard.launch") is None:
        return False, "`python -m gradyard.launch` (the cluster-side entrypoint) is not in this checkout"
    return True, ""


def latency(got: dict, source: str) -> dict:
    """Seconds from launch to the first step's end, per contender, and gradyard's paired ratio."""
    secs = {k: [x["first_step_at"] - x["launched_at"] for x in got[k]] for k in ("gradyard", "ray_train")}
    return {"source": source, "workload": got["workload"], "commands": got["commands"],
            "seconds_to_first_step": {k: summary(v) for k, v in secs.items()},
            "ratio_gradyard_over_ray_train": summary(paired(secs["gradyard"], secs["ray_train"]))}


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    ok, reason = available()
    if not ok:
        say(f"  not available: {reason}")
        return {"available": False, "reason": reason}
    got = shared.get("submit_rounds")
    if got is not None:
        return {"available": True, **latency(got, "the throughput benchmark's fashion-cnn rounds")}
    wl = Workload("fashion-cnn", steps=size.short_steps, checkpoint_every=10)
    raw, commands = rounds(bench, wl, {
        "ray_train": lambda b, w: run_ray_train(b, w, "job"),
        "gradyard": lambda b, w: run_gradyard(b, w, "local", "job")}, size.repeats, say)
    raw.update(workload={"job": wl.job, "steps": wl.steps, "launch": "job"}, commands=commands)
    return {"available": True, **latency(raw, "its own rounds")}
