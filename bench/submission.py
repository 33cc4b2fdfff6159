"""4. Submission: seconds from `ray job submit` to the first training step, on a running cluster.

Both contenders are submitted the README's way (``ray job submit --address ...
--working-dir . -- ENTRYPOINT``) to the bench's already running Ray cluster:
gradyard's cluster-side entrypoint ``python -m gradyard.launch JOB`` and the
plain Ray Train script.  The clock starts just before the ``ray job submit``
process starts and stops when the job's first optimizer step ends (its own
``first_step_at``).  One untimed submission first puts the working directory's
package in the cluster's cache, so neither contender pays the upload alone.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

from bench.contenders import Workload, plain_ray_command, read_summary
from bench.env import JOBS, ROOT, SCRIPTS, VENV_BIN, Bench, read_json
from bench.settings import Size
from bench.stats import paired, summary

NAME = "submit"
TITLE = "Submission latency"
NEEDS_CLUSTER = True


def available() -> tuple[bool, str]:
    if importlib.util.find_spec("gradyard.launch") is None:
        return False, "`python -m gradyard.launch` (the cluster-side entrypoint) is not in this checkout"
    return True, ""


def _submit(bench: Bench, entrypoint: list[str]) -> list[str]:
    return [str(VENV_BIN / "ray"), "job", "submit", "--address", bench.cluster.dashboard,
            "--working-dir", ".", "--", *entrypoint]


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    ok, reason = available()
    if not ok:
        say(f"  not available: {reason}")
        return {"available": False, "reason": reason}
    wl = Workload("fashion-cnn", steps=size.short_steps, checkpoint_every=10)
    if size.submit_warmup:
        bench.run(_submit(bench, ["python", "-c", "pass"]), name="submit-warmup", cwd=ROOT)
    latency: dict[str, list[float]] = {"gradyard": [], "ray_train": []}
    commands = {}
    for r in range(size.repeats):
        storage = bench.fresh("submit-gy")
        entry = ["python", "-m", "gradyard.launch", str((JOBS / f"{wl.job}.yaml").relative_to(ROOT)),
                 "--storage", str(storage)]
        for o in wl.overrides():
            entry += ["--set", o]
        cmd = _submit(bench, entry)
        t0 = bench.run(cmd, name="submit-gradyard", cwd=ROOT)
        latency["gradyard"].append(read_summary(bench, str(storage), wl.spec().name)["first_step_at"] - t0)
        commands.setdefault("gradyard", bench.shown(cmd))

        d = bench.fresh("submit-ray")
        plain = plain_ray_command(wl, d, address=None)
        plain[0:2] = ["python", str((SCRIPTS / "raytrain_plain.py").relative_to(ROOT))]
        cmd = _submit(bench, plain)
        t0 = bench.run(cmd, name="submit-raytrain", cwd=ROOT)
        latency["ray_train"].append(read_json(d / "result.json")["first_step_at"] - t0)
        commands.setdefault("ray_train", bench.shown(cmd))
        say(f"  submit round {r + 1}/{size.repeats}: gradyard {latency['gradyard'][-1]:.2f}s, "
            f"plain Ray Train {latency['ray_train'][-1]:.2f}s")
    return {"available": True, "workload": {"job": wl.job, "steps": wl.steps},
            "seconds_to_first_step": {k: summary(v) for k, v in latency.items()},
            "ratio_gradyard_over_ray_train": summary(paired(latency["gradyard"], latency["ray_train"])),
            "commands": commands}
