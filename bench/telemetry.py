"""3. Telemetry overhead: gradyard's step time with telemetry on over the same with it off.

fashion-cnn (the smallest step, where per-step overhead shows most), 2 workers
on the bench's Ray cluster, checkpoints to local disk in both.  The two run in
alternating rounds; when the throughput benchmark runs too, the pair runs inside
its fashion-cnn rounds (telemetry on is its `gradyard_local`) instead of again.
"""

from __future__ import annotations

from typing import Callable

from bench.contenders import Workload, run_gradyard
from bench.env import Bench
from bench.settings import Size
from bench.stats import paired, summary
from bench.throughput import rounds

NAME = "telemetry"
TITLE = "Telemetry overhead"
NEEDS_CLUSTER = True
TARGET = 1.02
"""Step time with telemetry on may be at most this multiple of the step time with it off."""


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    got = shared.get("telemetry_rounds")
    if got is None:
        wl = Workload("fashion-cnn", size.fashion_steps, size.fashion_checkpoint_every)
        off = Workload(wl.job, wl.steps, wl.checkpoint_every, telemetry=False)
        raw, commands = rounds(bench, wl, {
            "on": lambda b, w: run_gradyard(b, w, "local"),
            "off": lambda b, w: run_gradyard(b, off, "local")}, size.repeats, say)
        got = {"on": raw["on"], "off": raw["off"], "commands": commands,
               "workload": {"job": wl.job, "steps": wl.steps, "checkpoint_every": wl.checkpoint_every,
                            "batch_per_worker": wl.batch, "workers": wl.workers}}
        source = "its own rounds"
    else:
        source = "the throughput benchmark's fashion-cnn rounds"
    on = [x["steps_per_second"] for x in got["on"]]
    off = [x["steps_per_second"] for x in got["off"]]
    ratio = summary(paired(off, on))  # step time on / step time off = rate off / rate on
    ratio["target"] = TARGET
    ratio["met"] = bool(ratio.get("n")) and ratio["median"] <= TARGET
    return {"source": source, "workload": got["workload"], "commands": got["commands"],
            "steps_per_second": {"on": summary(on), "off": summary(off)},
            "step_time_ratio_on_over_off": ratio}
