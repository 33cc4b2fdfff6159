"""1. Training throughput: gradyard against plain torchrun DDP and plain Ray Train, side by side.

Two workers, the same synthetic data shape, batch, seed, optimizer, steps and
checkpoint interval for every contender; rounds interleave the contenders
(A B C D, A B C D, ...) and each gradyard figure is quoted as its ratio to the
contender run beside it in the same round.  On fashion-cnn, gradyard's worker
also runs under torchrun, which splits a gap to plain torchrun into gradyard's
code and Ray's.  When gradyard misses a target, one more gradyard run with
py-spy on its Ray workers says where rank 0's time goes.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from bench import profile
from bench.contenders import (Workload, run_gradyard, run_gradyard_torchrun, run_ray_train,
                               run_torchrun)
from bench.env import Bench
from bench.settings import Size
from bench.stats import paired, summary

NAME = "throughput"
TITLE = "Training throughput"
NEEDS_CLUSTER = True

TARGETS = {"ray_train": 0.97, "torchrun": 0.95}
"""gradyard's steps/s must be at least this share of each plain contender's."""

CONTENDERS: dict[str, Callable] = {
    "torchrun": run_torchrun,
    "ray_train": run_ray_train,
    "gradyard_local": lambda b, wl: run_gradyard(b, wl, "local"),
    "gradyard_s3": lambda b, wl: run_gradyard(b, wl, "s3"),
}
GRADYARD_TORCHRUN = "gradyard_torchrun"
"""fashion-cnn only: gradyard's worker under torchrun (no Ray), checkpoints to local disk."""
TELEMETRY_OFF = "gradyard_local_telemetry_off"
"""fashion-cnn only, when the telemetry benchmark is selected too: it shares these rounds."""

RATIOS: list[tuple[str, str, Optional[float]]] = [
    (ours, theirs, target) for ours in ("gradyard_local", "gradyard_s3")
    for theirs, target in TARGETS.items()
] + [(GRADYARD_TORCHRUN, "torchrun", None), ("gradyard_local", GRADYARD_TORCHRUN, None)]
"""(ours, theirs, target), quoted as ours / theirs; a target of None explains, it does not judge."""


def workloads(size: Size) -> list[Workload]:
    out = [Workload("fashion-cnn", size.fashion_steps, size.fashion_checkpoint_every)]
    if size.alexnet_steps:
        out.append(Workload("alexnet", size.alexnet_steps, size.alexnet_checkpoint_every,
                            batch_size=size.alexnet_batch_size))
    return out


def rounds(bench: Bench, wl: Workload, contenders: dict[str, Callable], repeats: int,
           say: Callable[[str], None]) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Run every contender once per round, in the same order each round."""
    raw: dict[str, list[dict]] = {name: [] for name in contenders}
    commands: dict[str, str] = {}
    for r in range(repeats):
        for name, fn in contenders.items():
            res, cmd = fn(bench, wl)
            res["load_average"] = round(os.getloadavg()[0], 2)
            raw[name].append(res)
            commands.setdefault(name, bench.shown(cmd))
            say(f"  {wl.job} round {r + 1}/{repeats} {name}: {res['steps_per_second']:.3f} steps/s")
    return raw, commands


def compare(raw: dict[str, list[dict]]) -> dict:
    rates = {name: [x["steps_per_second"] for x in runs] for name, runs in raw.items()}
    ratios = {}
    for a, b, target in RATIOS:
        if a in rates and b in rates:
            s = summary(paired(rates[a], rates[b]))
            if target is not None:
                s["target"] = target
                s["met"] = bool(s.get("n")) and s["median"] >= target
            ratios[f"{a}/{b}"] = s
    # Per checkpoint, how long training was blocked (gradyard: the hand-off to its writer,
    # including any wait for the previous upload; gradyard also checkpoints at the end).
    blocked = {name: summary([s for x in runs for s in x["checkpoint_seconds"]])
               for name, runs in raw.items()}
    return {"steps_per_second": {n: summary(v) for n, v in rates.items()}, "ratios": ratios,
            "checkpoint_blocked_seconds": blocked}


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    out = {"workloads": {}, "targets": TARGETS}
    for wl in workloads(size):
        params = wl.check_same_model()
        contenders = dict(CONTENDERS)
        if wl.job == "fashion-cnn":
            contenders[GRADYARD_TORCHRUN] = run_gradyard_torchrun
            if shared.get("telemetry_selected"):
                off = Workload(wl.job, wl.steps, wl.checkpoint_every, wl.batch_size, wl.workers,
                               telemetry=False)
                contenders[TELEMETRY_OFF] = lambda b, w: run_gradyard(b, off, "local")
        raw, commands = rounds(bench, wl, contenders, size.repeats, say)
        result = compare(raw)
        shape, classes = wl.shape()
        result.update(workload={"job": wl.job, "model": wl.spec().model.arch, "parameters": params,
                                "input_shape": list(shape), "classes": classes,
                                "batch_per_worker": wl.batch, "workers": wl.workers,
                                "steps": wl.steps, "checkpoint_every": wl.checkpoint_every,
                                "timed_steps": wl.steps - 10},
                      raw=raw, commands=commands)
        if "gradyard_s3" in raw:
            result["s3_server_cpu_seconds"] = summary(
                [x.get("s3_server_cpu_seconds") for x in raw["gradyard_s3"]])
        missed = [k for k, v in result["ratios"].items() if v.get("met") is False]
        if missed and size.name != "smoke":
            worst = min(missed, key=lambda k: result["ratios"][k]["median"])
            kind = "s3" if worst.startswith("gradyard_s3") else "local"
            say(f"  {wl.job}: {', '.join(missed)} below target; profiling gradyard's workers ({kind})")
            result["profile"] = profile.profile_gradyard(bench, wl, kind)
        if TELEMETRY_OFF in raw:
            shared["telemetry_rounds"] = {"on": raw["gradyard_local"], "off": raw[TELEMETRY_OFF],
                                          "workload": result["workload"],
                                          "commands": {"on": commands["gradyard_local"],
                                                       "off": commands[TELEMETRY_OFF]}}
        out["workloads"][wl.job] = result
    return out
