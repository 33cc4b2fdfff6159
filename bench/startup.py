"""5. Start-up: seconds from `gradyard run` to the first step on an embedded cluster, vs plain Ray Train.

No cluster is running: ``gradyard run JOB`` starts Ray in its own process
(``ray.init(address="local")``), and so does the plain Ray Train script
(``--address local``).  The clock starts just before the command's process
starts and stops when the first optimizer step ends (each run's own
``first_step_at``).  The bench's shared cluster is stopped before this one.
"""

from __future__ import annotations

from typing import Callable

from bench.contenders import Workload, gradyard_command, plain_ray_command, read_summary
from bench.env import Bench, read_json
from bench.settings import Size
from bench.stats import paired, summary

NAME = "startup"
TITLE = "Start-up on an embedded cluster"
NEEDS_CLUSTER = False


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    bench.stop_cluster()
    wl = Workload("fashion-cnn", steps=size.short_steps, checkpoint_every=10)
    latency: dict[str, list[float]] = {"gradyard": [], "ray_train": []}
    commands = {}
    for r in range(size.repeats):
        storage = bench.fresh("startup-gy")
        cmd = gradyard_command(bench, wl, str(storage), address=None)
        t0 = bench.run(cmd, name="startup-gradyard")
        bench.sweep()  # anything the embedded cluster left behind
        latency["gradyard"].append(read_summary(bench, str(storage), wl.spec().name)["first_step_at"] - t0)
        commands.setdefault("gradyard", bench.shown(cmd))

        d = bench.fresh("startup-ray")
        cmd = plain_ray_command(wl, d, address="local")
        t0 = bench.run(cmd, name="startup-raytrain")
        bench.sweep()
        latency["ray_train"].append(read_json(d / "result.json")["first_step_at"] - t0)
        commands.setdefault("ray_train", bench.shown(cmd))
        say(f"  start-up round {r + 1}/{size.repeats}: gradyard {latency['gradyard'][-1]:.2f}s, "
            f"plain Ray Train {latency['ray_train'][-1]:.2f}s")
    return {"workload": {"job": wl.job, "steps": wl.steps},
            "seconds_to_first_step": {k: summary(v) for k, v in latency.items()},
            "ratio_gradyard_over_ray_train": summary(paired(latency["gradyard"], latency["ray_train"])),
            "commands": commands}
