"""5. Telemetry overhead: step time with telemetry on over the same with it off, in one run.

``bench/scripts/telemetry_ab.py`` builds fashion-cnn (the smallest step, where a
per-step cost shows most) twice in the same two torchrun workers with gradyard's
worker code, telemetry on and off, and lets them take turns every ``BLOCK``
steps; each run's ratio is its total time on over off for the same steps.
Whole-job runs on two shared cores differ by ±10% from run to run, which hides a
1% effect; turns a third of a second apart in the same processes do not.  Every
cost of telemetry falls inside the turns.  py-spy samples rank 0 during the last
run, each arm's thread apart (``bench.profile``).
"""

from __future__ import annotations

from typing import Callable

from bench.contenders import Workload
from bench.env import JOBS, ROOT, VENV_BIN, Bench, read_json
from bench.profile import profile_arms
from bench.settings import Size
from bench.stats import ratio, summary

NAME = "telemetry"
TITLE = "5. Telemetry overhead"
NEEDS_CLUSTER = False
TARGET = 1.01
"""Step time with telemetry on may be at most this multiple of the step time with it off."""
BLOCK = 25
"""Steps per turn."""
WARMUP = 50
"""Steps of each arm before the first recorded turn (start-up, the one-off FLOP count and census)."""
CHECKPOINT_EVERY = 100


def ab_command(wl: Workload, out: str, storage: str, first: str) -> list[str]:
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc-per-node={wl.workers}",
           str((ROOT / "bench" / "scripts" / "telemetry_ab.py").relative_to(ROOT)),
           str((JOBS / f"{wl.job}.yaml").relative_to(ROOT)), "--storage", storage,
           "--block", str(BLOCK), "--warmup", str(WARMUP), "--out", out, "--first", first]
    for o in wl.overrides():
        if not o.startswith("telemetry.enabled="):  # each arm sets its own
            cmd += ["--set", o]
    return cmd


def _profile_table(p: dict) -> dict:
    on, off = p["arms"]["on"], p["arms"]["off"]
    base = sum(off.values()) or 1
    rows = [[k, on.get(k, 0), off.get(k, 0), f"{100 * (on.get(k, 0) - off.get(k, 0)) / base:+.1f}%"]
            for k in dict.fromkeys([*on, *off])]
    rows.append(["**training loop**", sum(on.values()), sum(off.values()),
                 f"{100 * (sum(on.values()) - base) / base:+.1f}%"])
    return {"title": f"Where rank 0's busy time goes in the last run (py-spy at {p['rate']} Hz, by the "
                     "module of the innermost frame)",
            "columns": ["module", "on: samples", "off: samples", "on − off, share of off's loop"], "rows": rows}


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    wl = Workload("fashion-cnn", size.telemetry_ab_steps, CHECKPOINT_EVERY)
    runs, profile, command = [], None, None
    for r in range(size.telemetry_runs):
        d = bench.fresh("telemetry-ab")
        # Each arm goes first in half the runs: going first in a turn pair is itself an advantage.
        cmd = ab_command(wl, str(d / "result.json"), str(d / "runs"), "on" if r % 2 == 0 else "off")
        command = command or bench.shown(cmd)
        if r == size.telemetry_runs - 1:
            profile = profile_arms(bench, cmd, d, rate=size.profile_hz)
        else:
            bench.run(cmd, name="telemetry-ab")
        runs.append(read_json(d / "result.json"))
        say(f"  telemetry run {r + 1}/{size.telemetry_runs}: on/off {runs[-1]['total_ratio']:.3f} "
            f"over {runs[-1]['pairs']} pairs of {BLOCK}-step turns")
    r = ratio([x["total_ratio"] for x in runs], TARGET, better="lower")
    st = {arm: summary([x["step_seconds"][arm] for x in runs]) for arm in ("on", "off")}
    return {"targets": [{"name": "fashion-cnn: step time, telemetry on / off", **r}],
            "tables": [{"title": f"fashion-cnn, {wl.workers} torchrun workers × batch {wl.batch}, "
                                 f"{wl.steps} steps an arm in turns of {BLOCK}",
                        "columns": ["", "seconds per step", "on / off per run"],
                        "rows": [["telemetry on", st["on"], r], ["telemetry off", st["off"], ""]]},
                       _profile_table(profile)],
            "workload": {"job": wl.job, "steps": wl.steps, "block_steps": BLOCK, "warmup_steps": WARMUP},
            "commands": {"each run": command}, "runs": runs, "profile": profile}
