"""1. Training throughput: gradyard against plain torchrun DDP and plain Ray Train, side by side.

Two workers, the same synthetic data shape, batch, seed, optimizer, steps and
checkpoint interval for every contender; rounds interleave the contenders
(A B C ..., A B C ...), and each gradyard figure is its ratio to the contender
run beside it in the same round (``bench.stats``).  Every contender of a round
checkpoints to the same storage: local disk in the local rounds, the same S3
server in the S3 rounds (plain torchrun with ``torch.save`` into an fsspec file,
plain Ray Train through ``ray.train.report(checkpoint=...)`` with its async
upload, gradyard with its background writer).

* fashion-cnn: the Ray contenders are submitted with ``ray job submit`` to the
  bench's running cluster; the same runs give the submission latency (6).
* AlexNet, at a realistic checkpoint interval (none inside the timing), each
  command on its own embedded cluster; the same runs give the start-up (7).
* AlexNet, stress case: a 228 MB checkpoint to S3 every 7 steps, one of them
  inside the timed steps; shown, not judged.
"""

from __future__ import annotations

from typing import Callable, Optional

from bench.contenders import Workload, rounds, run_gradyard, run_ray_train, run_torchrun
from bench.env import Bench
from bench.settings import Size
from bench.stats import paired, ratio, summary

NAME = "throughput"
TITLE = "1. Training throughput"
NEEDS_CLUSTER = True

TARGETS = {"ray_train": 0.97, "torchrun": 0.95}
"""gradyard's steps/s must be at least this share of each plain contender's, storage alike."""
LABELS = {"torchrun": "plain torchrun DDP", "ray_train": "plain Ray Train", "gradyard": "gradyard",
          "gradyard_glibc": "gradyard with glibc malloc's defaults (GRADYARD_MALLOC_TUNING=0)"}


def label(name: str) -> str:
    who, _, where = name.rpartition("_")
    return f"{LABELS[who]} → {'S3' if where == 's3' else 'local disk'}" if who in LABELS else name


def _glibc_defaults(bench: Bench, wl: Workload, mode: str) -> tuple[dict, list[str]]:
    """gradyard → local disk with its host-allocator settings off in its workers (checked)."""
    res, cmd = run_gradyard(bench, wl, "local", mode, worker_env={"GRADYARD_MALLOC_TUNING": "0"})
    if (res["host_allocator"] or {}).get("tuned"):
        raise RuntimeError(f"GRADYARD_MALLOC_TUNING=0 did not reach the workers: {res['host_allocator']}")
    return res, cmd


def contenders(kinds: tuple[str, ...], mode: str, allocator_split: bool = False) -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    for kind in kinds:
        out[f"torchrun_{kind}"] = lambda b, w, k=kind: run_torchrun(b, w, k)
        out[f"ray_train_{kind}"] = lambda b, w, k=kind: run_ray_train(b, w, mode, k)
        out[f"gradyard_{kind}"] = lambda b, w, k=kind: run_gradyard(b, w, k, mode)
    if allocator_split and "local" in kinds:  # what gradyard.hostmem's settings give, allocators apart
        out["gradyard_glibc_local"] = lambda b, w: _glibc_defaults(b, w, mode)
    return out


def compare(job: str, raw: dict[str, list[dict]], judged: bool) -> tuple[list[dict], list[dict]]:
    """(the ratio rows of this workload, the targets among them)."""
    rate = {name: [x["steps_per_second"] for x in runs] for name, runs in raw.items()}
    rows, targets = [], []
    for kind in ("local", "s3"):
        ours = f"gradyard_{kind}"
        for theirs, target in TARGETS.items():
            if ours in rate and f"{theirs}_{kind}" in rate:
                r = ratio(paired(rate[ours], rate[f"{theirs}_{kind}"]), target if judged else None)
                name = f"{job}: {label(ours)} / {label(f'{theirs}_{kind}')}"
                rows.append([name, r, r.get("target", ""), r.get("verdict", "")])
                if judged:
                    targets.append({"name": name, **r})
        if f"ray_train_{kind}" in rate and f"torchrun_{kind}" in rate:  # what Ray itself costs here
            rows.append([f"{job}: {label(f'ray_train_{kind}')} / {label(f'torchrun_{kind}')}",
                         ratio(paired(rate[f"ray_train_{kind}"], rate[f"torchrun_{kind}"])), "", ""])
    if "gradyard_glibc_local" in rate:
        rows.append([f"{job}: gradyard → local disk / {label('gradyard_glibc_local')}",
                     ratio(paired(rate["gradyard_local"], rate["gradyard_glibc_local"])), "", ""])
    if "gradyard_s3" in rate and "gradyard_local" in rate:
        rows.append([f"{job}: gradyard → S3 / gradyard → local disk",
                     ratio(paired(rate["gradyard_s3"], rate["gradyard_local"])), "", ""])
    return rows, targets


def workloads(size: Size) -> list[tuple[str, Workload, str, tuple[str, ...], bool]]:
    """(name, workload, launch mode, storage kinds, stress case) of each set of rounds."""
    kinds = tuple(k for k, on in (("local", size.local_rounds), ("s3", size.s3_rounds)) if on)
    out = [("fashion-cnn", Workload("fashion-cnn", size.fashion_steps, size.fashion_checkpoint_every), "job", kinds,
            False)]
    if size.alexnet_steps:
        # No checkpoint falls inside the realistic case's timing, so where it goes makes no difference.
        for name, every, where, stress in (("alexnet", size.alexnet_checkpoint_every, ("local",), False),
                                           ("alexnet, stress case", size.alexnet_stress_every, ("s3",), True)):
            out.append((name, Workload("alexnet", size.alexnet_steps, every, batch_size=size.alexnet_batch_size),
                        "embedded", where, stress))
    return out


def run(bench: Bench, size: Size, shared: dict, say: Callable[[str], None] = print) -> dict:
    from gradyard.steptime import STEADY_AFTER_STEPS  # imports torch: not at the bench's start-up

    tables, targets, commands, raws = [], [], {}, {}
    for name, wl, mode, kinds, stress in workloads(size):
        params = wl.check_same_model()
        if mode == "embedded":
            bench.stop_cluster()  # nothing else runs beside an embedded cluster
        split = shared.get("allocator_split") and wl.job == "fashion-cnn"
        raw, cmds = rounds(bench, wl, contenders(kinds, mode, split), size.repeats, say)
        rows, judged = compare(name, raw, judged=not stress)
        targets += judged
        shape, classes = wl.shape()
        tables.append({
            "title": f"{name}: {wl.spec().model.arch}, {params:,} parameters, input {'×'.join(map(str, shape))}, "
                     f"{classes} classes; {wl.workers} workers × batch {wl.batch}, {wl.steps} steps "
                     f"({wl.steps - STEADY_AFTER_STEPS} timed), a checkpoint every {wl.checkpoint_every}",
            "columns": ["contender", "steps/s", "training blocked per checkpoint, s"],
            "rows": [[label(n), summary([x["steps_per_second"] for x in runs]),
                      summary([s for x in runs for s in x["checkpoint_seconds"]])] for n, runs in raw.items()]})
        tables.append({"title": "", "columns": ["ratio, per round", "estimate [95% interval]", "target", "verdict"],
                       "rows": rows})
        if "gradyard_s3" in raw:
            tables[-1]["rows"].append([f"{name}: S3 server CPU-s per gradyard → S3 run",
                                       summary([x.get("s3_server_cpu_seconds") for x in raw["gradyard_s3"]]), "", ""])
        commands.update({f"{name}, {label(n)}": c for n, c in cmds.items()})
        raws[name] = raw
        first = next(iter(k for k in raw if k.startswith("gradyard_")))
        pair = {"gradyard": raw[first], "ray_train": raw[first.replace("gradyard", "ray_train")],
                "workload": {"job": wl.job, "steps": wl.steps, "launch": mode}}
        if mode == "job":
            shared["submit_rounds"] = pair
        elif not stress:
            shared["startup_rounds"] = pair
    return {"targets": targets, "tables": tables, "commands": commands, "raw": raws}


def first_step_latency(got: dict, source: str) -> dict:
    """Seconds from launch to the end of the first step, per contender, and gradyard's paired ratio
    (the submission and start-up benchmarks, from their own rounds or the throughput rounds)."""
    secs = {k: [x["first_step_at"] - x["launched_at"] for x in got[k]] for k in ("gradyard", "ray_train")}
    return {"tables": [{"title": f"{got['workload']['job']}, {got['workload']['steps']} steps; from {source}",
                        "columns": ["contender", "seconds to the first step's end", "/ plain Ray Train"],
                        "rows": [["plain Ray Train", summary(secs["ray_train"]), ""],
                                 ["gradyard", summary(secs["gradyard"]),
                                  ratio(paired(secs["gradyard"], secs["ray_train"]))]]}],
            "seconds_to_first_step": secs}


def own_rounds(bench: Bench, size: Size, mode: str, say, job: Optional[str] = None) -> dict:
    """Rounds of plain Ray Train and gradyard (local checkpoints) launched the ``mode`` way."""
    wl = Workload(job or "fashion-cnn", size.short_steps, checkpoint_every=10)
    raw, commands = rounds(bench, wl, {"ray_train": lambda b, w: run_ray_train(b, w, mode),
                                       "gradyard": lambda b, w: run_gradyard(b, w, "local", mode)},
                           size.repeats, say)
    return {**raw, "workload": {"job": wl.job, "steps": wl.steps, "launch": mode}, "commands": commands}
