"""5. Start-up: seconds from `gradyard run` to the first step on an embedded cluster, vs plain Ray Train.

No cluster is running: ``gradyard run JOB`` starts Ray in its own process
(``ray.init(address="local")``), and so does the plain Ray Train script
(``--address local``).  The clock starts just before the command's process
starts and stops when the first optimizer step ends (each run's own
``first_step_at``).  When the throughput benchmark runs too, its AlexNet rounds
are these runs; otherwise AlexNet (or fashion-cnn, at smoke size) runs here.
"""

from __future__ import annotations

from typing import Callable

from bench.contenders import Workload, rounds, run_gradyard, run_ray_train
from bench.env import Bench
from bench.settings import Size
from bench.submission import latency

NAME = "startup"
TITLE = "Start-up on an embedded cluster"
NEEDS_CLUSTER = False


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    got = shared.get("startup_rounds")
    if got is not None:
        return latency(got, "the throughput benchmark's AlexNet rounds")
    bench.stop_cluster()
    if size.alexnet_steps:
        wl = Workload("alexnet", size.alexnet_steps, size.alexnet_checkpoint_every,
                      batch_size=size.alexnet_batch_size)
    else:
        wl = Workload("fashion-cnn", size.short_steps, checkpoint_every=10)
    raw, commands = rounds(bench, wl, {
        "ray_train": lambda b, w: run_ray_train(b, w, "embedded"),
        "gradyard": lambda b, w: run_gradyard(b, w, "local", "embedded")}, size.repeats, say)
    raw.update(workload={"job": wl.job, "steps": wl.steps, "launch": "embedded"}, commands=commands)
    return latency(raw, "its own rounds")
