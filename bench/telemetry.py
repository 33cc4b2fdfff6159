"""3. Telemetry overhead: gradyard's step time with telemetry on over the same with it off.

fashion-cnn (the smallest step, where per-step overhead shows most), 2 workers,
checkpoints to local disk every 100 steps in both arms.

* The target is checked in one run: ``bench/scripts/telemetry_ab.py`` builds
  the job twice in the same two torchrun workers with gradyard's worker code,
  telemetry on and off, and lets them take turns every 25 steps; the ratio of
  each run is its total time on over off for the same steps.  Whole-job runs
  on these two shared cores differ by ±10% from run to run, which hides a 2%
  effect; turns a third of a second apart in the same processes do not.
  Every cost of telemetry is inside the turns (callbacks, the DDP comm hook,
  the census, the steps whose FLOPs are counted).
* py-spy samples rank 0 during the last run, each arm's thread apart, and
  says where the on arm's extra time goes: telemetry's callbacks, the
  Python of its DDP comm hook, or the model's own phases.
* When the throughput benchmark runs too, its fashion-cnn rounds carry a
  telemetry-off gradyard contender (whole jobs on the Ray cluster); that
  ratio is shown beside it, with its spread, for what it is.
"""

from __future__ import annotations

from typing import Callable

from bench.contenders import Workload
from bench.env import JOBS, ROOT, VENV_BIN, Bench, read_json
from bench.profile import profile_telemetry_ab
from bench.settings import Size
from bench.stats import paired, summary

NAME = "telemetry"
TITLE = "Telemetry overhead"
NEEDS_CLUSTER = False
TARGET = 1.02
"""Step time with telemetry on may be at most this multiple of the step time with it off."""
BLOCK = 25
"""Steps per turn in the in-run comparison."""
WARMUP = 50
"""Steps of each arm before the first recorded turn (start-up, the one-off FLOP count and census)."""
CHECKPOINT_EVERY = 100
PROFILE_HZ = 500
"""py-spy's rate on the last run: ~6,000 samples an arm at full size, a 1% share within ±0.2%."""


def ab_command(wl: Workload, out: str, storage: str) -> list[str]:
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc-per-node={wl.workers}",
           str((ROOT / "bench" / "scripts" / "telemetry_ab.py").relative_to(ROOT)),
           str((JOBS / f"{wl.job}.yaml").relative_to(ROOT)), "--storage", storage,
           "--block", str(BLOCK), "--warmup", str(WARMUP), "--out", out]
    for o in wl.overrides():
        if not o.startswith("telemetry.enabled="):  # each arm sets its own
            cmd += ["--set", o]
    return cmd


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    wl = Workload("fashion-cnn", size.telemetry_ab_steps, CHECKPOINT_EVERY)
    runs, command = [], None
    # An even number of runs, so each arm goes first in half of them: runs that began with the
    # telemetry-on arm read higher (1.01-1.05, against 1.01-1.02 beginning with the off arm).
    repeats = size.repeats + size.repeats % 2 if size.telemetry_even_runs else size.repeats
    profile = None
    for r in range(repeats):
        d = bench.fresh("telemetry-ab")
        cmd = ab_command(wl, str(d / "result.json"), str(d / "runs"))
        cmd += ["--first", "on" if r % 2 == 0 else "off"]  # neither arm always goes first
        if r == repeats - 1:
            # py-spy samples the last run (both arms alike: they take turns) for where the
            # on arm's extra time goes; a separate run would cost `make bench` ~45 s more.
            profile = profile_telemetry_ab(bench, cmd, d, rate=PROFILE_HZ)
            if "error" in profile and not (d / "result.json").exists():
                raise RuntimeError(f"the profiled run failed: {profile['error']}")
        else:
            bench.run(cmd, name="telemetry-ab")
        command = command or bench.shown(cmd)
        res = read_json(d / "result.json")
        runs.append(res)
        say(f"  telemetry in-run comparison {r + 1}/{repeats}: on/off {res['total_ratio']:.3f} "
            f"over {res['pairs']} pairs of {BLOCK}-step turns")
    ratio = summary([x["total_ratio"] for x in runs])
    ratio["target"] = TARGET
    ratio["met"] = bool(ratio.get("n")) and ratio["median"] <= TARGET
    profile.update(total_ratio=runs[-1]["total_ratio"], in_run=True)
    out = {"workload": {"job": wl.job, "steps": wl.steps, "checkpoint_every": wl.checkpoint_every,
                        "batch_per_worker": wl.batch, "workers": wl.workers, "block_steps": BLOCK,
                        "warmup_steps": WARMUP},
           "command": command,
           "step_time_ratio_on_over_off": ratio,
           "pair_ratio": summary([p for x in runs for p in x["pair_ratios"]]),
           "step_seconds": {arm: summary([x["step_seconds"][arm] for x in runs]) for arm in ("on", "off")},
           "runs": runs}
    out["profile"] = profile
    got = shared.get("telemetry_rounds")
    if got is not None:
        on = [x["steps_per_second"] for x in got["on"]]
        off = [x["steps_per_second"] for x in got["off"]]
        out["whole_jobs"] = {"workload": got["workload"], "commands": got["commands"],
                             "steps_per_second": {"on": summary(on), "off": summary(off)},
                             "step_time_ratio_on_over_off": summary(paired(off, on))}
    return out
