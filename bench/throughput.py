"""1. Training throughput: gradyard against plain torchrun DDP and plain Ray Train, side by side.

Two workers, the same synthetic data shape, batch, seed, optimizer, steps and
checkpoint interval for every contender; rounds interleave the contenders
(A B C D, A B C D, ...) and each gradyard figure is quoted as its ratio to the
contender run beside it in the same round.  When gradyard with local checkpoints
misses a target, one more such run with py-spy on its Ray workers says where
rank 0's time goes; a miss of the S3 contender is explained by the S3 server's
CPU per run and its profile (benchmark 2).

How the Ray contenders are launched differs by workload, and each choice also
yields another benchmark from the same runs (Ray's start-up is ~15 s a run on
two cores, so separate runs would not fit `make bench` in 30 minutes):

* fashion-cnn: ``ray job submit`` to the bench's running cluster, the production
  path; from the same runs come submission latency (4) and, with the
  telemetry-off contender in the same rounds, the telemetry overhead (3).
  With ``--allocator-split`` (not in ``make bench``: its 30 minutes), one more
  contender runs gradyard with glibc malloc's defaults
  (``GRADYARD_MALLOC_TUNING=0``, as the plain scripts run): gradyard's workers
  fix malloc's thresholds (``gradyard.hostmem``), and this splits what that
  gains from what the rest of gradyard costs.
* AlexNet: each command starts its own cluster (``gradyard run`` with no
  cluster; the plain script with ``--address local``): start-up (5).
"""

from __future__ import annotations

from typing import Callable, Optional

from bench import profile, submission
from bench.contenders import Workload, rounds, run_gradyard, run_ray_train, run_torchrun
from bench.env import Bench
from bench.settings import Size
from bench.stats import paired, summary

NAME = "throughput"
TITLE = "Training throughput"
NEEDS_CLUSTER = True

TARGETS = {"ray_train": 0.97, "torchrun": 0.95}
"""gradyard's steps/s must be at least this share of each plain contender's."""

TELEMETRY_OFF = "gradyard_local_telemetry_off"
"""fashion-cnn only, when the telemetry benchmark is selected too: it shares these rounds."""

GLIBC_DEFAULTS = "gradyard_local_glibc_defaults"
"""fashion-cnn only: gradyard → local disk with ``GRADYARD_MALLOC_TUNING=0``, glibc malloc's
defaults as in the plain scripts: gradyard's own cost, apart from its allocator settings."""

RATIOS: list[tuple[str, str, Optional[float]]] = [
    (ours, theirs, target) for ours in ("gradyard_local", "gradyard_s3")
    for theirs, target in TARGETS.items()
] + [("ray_train", "torchrun", None), (GLIBC_DEFAULTS, "ray_train", None),
     (GLIBC_DEFAULTS, "torchrun", None), ("gradyard_local", GLIBC_DEFAULTS, None)]
"""(ours, theirs, target), quoted as ours / theirs; a target of None explains, it does not judge
(plain Ray Train / plain torchrun: what Ray itself costs on this machine)."""


def _glibc_defaults(bench: Bench, wl: Workload, mode: str) -> tuple[dict, list[str]]:
    """gradyard → local disk with ``GRADYARD_MALLOC_TUNING=0`` in its Ray workers (checked)."""
    res, cmd = run_gradyard(bench, wl, "local", mode, worker_env={"GRADYARD_MALLOC_TUNING": "0"})
    if (res["host_allocator"] or {}).get("tuned"):
        raise RuntimeError(f"GRADYARD_MALLOC_TUNING=0 did not reach the workers: {res['host_allocator']}")
    return res, cmd


def workloads(size: Size) -> list[Workload]:
    out = [Workload("fashion-cnn", size.fashion_steps, size.fashion_checkpoint_every)]
    if size.alexnet_steps:
        out.append(Workload("alexnet", size.alexnet_steps, size.alexnet_checkpoint_every,
                            batch_size=size.alexnet_batch_size))
    return out


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
    from gradyard.trainer import STEADY_AFTER_STEPS  # imports torch: not at the bench's start-up

    out = {"workloads": {}, "targets": TARGETS}
    for wl in workloads(size):
        params = wl.check_same_model()
        if wl.job == "fashion-cnn":
            mode = "job" if submission.available()[0] else "client"
        else:
            mode = "embedded"
            bench.stop_cluster()  # nothing else runs beside an embedded cluster
        contenders: dict[str, Callable] = {
            "torchrun": run_torchrun,
            "ray_train": lambda b, w, m=mode: run_ray_train(b, w, m),
            "gradyard_local": lambda b, w, m=mode: run_gradyard(b, w, "local", m),
            "gradyard_s3": lambda b, w, m=mode: run_gradyard(b, w, "s3", m),
        }
        if wl.job == "fashion-cnn" and mode == "job" and shared.get("allocator_split"):
            contenders[GLIBC_DEFAULTS] = lambda b, w, m=mode: _glibc_defaults(b, w, m)
        if wl.job == "fashion-cnn" and shared.get("telemetry_selected"):
            off = Workload(wl.job, wl.steps, wl.checkpoint_every, wl.batch_size, wl.workers,
                           telemetry=False)
            contenders[TELEMETRY_OFF] = lambda b, w, m=mode: run_gradyard(b, off, "local", m)
        raw, commands = rounds(bench, wl, contenders, size.repeats, say)
        result = compare(raw)
        shape, classes = wl.shape()
        workload = {"job": wl.job, "model": wl.spec().model.arch, "parameters": params,
                    "input_shape": list(shape), "classes": classes, "batch_per_worker": wl.batch,
                    "workers": wl.workers, "steps": wl.steps, "checkpoint_every": wl.checkpoint_every,
                    "timed_steps": wl.steps - STEADY_AFTER_STEPS, "launch": mode}
        result.update(workload=workload, raw=raw, commands=commands)
        result["s3_server_cpu_seconds"] = summary(
            [x.get("s3_server_cpu_seconds") for x in raw["gradyard_s3"]])
        missed = [k for k, v in result["ratios"].items() if v.get("met") is False]
        # A miss of the S3 contender is explained from the S3 server's CPU and profile (benchmark
        # 2) beside these runs' own counts; a miss with local checkpoints gets a profile of it.
        local = [k for k in missed if k.startswith("gradyard_local/")]
        if local and size.name != "smoke":
            say(f"  {wl.job}: {', '.join(local)} below target; profiling gradyard's workers")
            result["profile"] = profile.profile_gradyard(
                bench, wl, "local", "embedded" if mode == "embedded" else "client")
        pair = {"gradyard": raw["gradyard_local"], "ray_train": raw["ray_train"],
                "workload": workload, "commands": {"gradyard": commands["gradyard_local"],
                                                   "ray_train": commands["ray_train"]}}
        if mode == "job":
            shared["submit_rounds"] = pair
        elif mode == "embedded":
            shared["startup_rounds"] = pair
        if TELEMETRY_OFF in raw:
            shared["telemetry_rounds"] = {"on": raw["gradyard_local"], "off": raw[TELEMETRY_OFF],
                                          "workload": workload,
                                          "commands": {"on": commands["gradyard_local"],
                                                       "off": commands[TELEMETRY_OFF]}}
        out["workloads"][wl.job] = result
    return out
