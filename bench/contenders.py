"""One workload, trained the ways it is compared: plain torchrun DDP, plain Ray Train, gradyard.

The Ray contenders (plain Ray Train, gradyard) are launched one of three ways:

* ``job``:      ``ray job submit --no-wait`` to the bench's running cluster (gradyard's
                entrypoint is ``python -m gradyard.launch``), then waited for;
* ``embedded``: the command starts Ray in its own process (``gradyard run`` with
                no ``--address``; the plain script with ``--address local``);
* ``client``:   the command's process drives the bench's running cluster
                (``gradyard run --address``; the plain script with ``--address``).

Every contender reports its own in-loop timing: the time of the end of its
first step (``first_step_at``) and its steps per second after the first 7
steps of the run (``steady_steps_per_second``; checkpoint stalls included).
gradyard writes both into its summary.json; the plain scripts into ``--out``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from bench.env import BUCKET, JOBS, PY, ROOT, SCRIPTS, VENV_BIN, Bench, read_json


@dataclass(frozen=True)
class Workload:
    job: str
    """Job file under jobs/ (its model, optimizer and seed are kept; data becomes synthetic)."""
    steps: int
    checkpoint_every: int
    batch_size: Optional[int] = None
    """Per-worker batch; the job's own when None."""
    workers: int = 2
    telemetry: bool = True
    use_gpu: bool = False
    precision: str = "fp32"
    """Autocast precision (bench/gpu.sh runs bf16 on a GPU)."""

    def _base_spec(self):
        from gradyard.job import load_job

        return load_job(JOBS / f"{self.job}.yaml", ["data.source=synthetic", "model.pretrained=null"])

    @property
    def batch(self) -> int:
        return self.batch_size or self._base_spec().data.batch_size

    @property
    def train_samples(self) -> int:
        """Enough for every step to fall in the first epoch (no epoch-end work inside the timing)."""
        return (self.steps + 1) * self.batch * self.workers

    def overrides(self) -> list[str]:
        spec = self._base_spec()
        num_samples = math.ceil(self.train_samples / (1 - spec.data.test_fraction)) + 8
        return [
            "data.source=synthetic", "model.pretrained=null", f"data.num_samples={num_samples}",
            f"data.batch_size={self.batch}", "data.loader_workers=0", "data.pin_memory=false",
            "augmentation=[]", "schedule.epochs=null", f"schedule.steps={self.steps}",
            f"schedule.precision={self.precision}", "schedule.lr_scheduler.name=none",
            f"scaling.num_workers={self.workers}", f"scaling.use_gpu={str(self.use_gpu).lower()}",
            "scaling.placement=PACK",
            f"checkpoint.every_steps={self.checkpoint_every}", "checkpoint.every_seconds=null",
            f"telemetry.enabled={'true' if self.telemetry else 'false'}",
        ]

    def spec(self):
        from gradyard.job import load_job

        return load_job(JOBS / f"{self.job}.yaml", self.overrides())

    def shape(self) -> tuple[tuple[int, ...], int]:
        """(input shape, classes) of the synthetic data gradyard generates for this job."""
        from gradyard.data.base import image_geometry
        from gradyard.data.builtin import synthetic_profile
        from gradyard.catalogue import CATALOGUE

        spec = self.spec()
        entry = CATALOGUE[spec.model.arch]
        kind, shape, _, classes = synthetic_profile(spec, entry)
        assert kind == "image", "the plain scripts know image models only"
        geometry = image_geometry(spec, entry, native_channels=shape[0], native_size=shape[-1])
        return tuple(geometry.shape), classes

    def plain_args(self) -> list[str]:
        spec = self.spec()
        shape, classes = self.shape()
        o = spec.optimizer
        if o.name == "adam":  # the transfer job's (ddp_torchrun.py only)
            opt = ["--optimizer", "adam", "--lr", str(o.lr)]
        else:
            assert o.name == "sgd" and not o.nesterov, "the plain scripts use plain SGD or Adam"
            opt = ["--lr", str(o.lr), "--momentum", str(o.momentum), "--weight-decay", str(o.weight_decay)]
        return ["--model", spec.model.arch, "--shape", ",".join(map(str, shape)),
                "--classes", str(classes), "--samples", str(self.train_samples),
                "--steps", str(self.steps), "--batch-size", str(self.batch), *opt,
                "--seed", str(spec.schedule.seed), "--checkpoint-every", str(self.checkpoint_every)]

    def check_same_model(self) -> int:
        """The plain scripts' model has gradyard's parameter count; returns it."""
        from gradyard.data import build_datasets
        from gradyard.models import build_model, count_parameters

        from bench.scripts.plain_models import build_model as plain_model

        spec = self.spec()
        probe = spec.model_copy(update={"data": spec.data.model_copy(update={"num_samples": 16})})
        ours = count_parameters(build_model(probe, build_datasets(probe)[2]))[0]
        shape, classes = self.shape()
        theirs = sum(p.numel() for p in plain_model(spec.model.arch, shape, classes).parameters())
        if ours != theirs:
            raise AssertionError(f"{self.job}: plain model has {theirs} parameters, gradyard's {ours}")
        return ours


def _result(out: dict, t0: float) -> dict:
    """The figures every contender gives; ``checkpoint_seconds``: training blocked per checkpoint."""
    blocked = out.get("checkpoint_seconds", out.get("checkpoints", {}).get("blocked_seconds"))
    return {"steps_per_second": out.get("steady_steps_per_second"),
            "first_step_at": out.get("first_step_at"), "launched_at": t0,
            "checkpoint_seconds": [round(x, 4) for x in blocked or []]}


def launch(bench: Bench, cmd: list[str], mode: str, name: str,
           worker_env: Optional[dict] = None) -> tuple[float, list[str]]:
    """Run a Ray contender's command the ``mode`` way; returns (time it was launched, the command).

    ``cmd`` is the entrypoint as run on the cluster for ``job`` (relative paths,
    ``python``), and a complete command line otherwise.  ``worker_env`` reaches
    the Ray workers: the job's runtime environment for ``job``, the command's
    own environment for ``embedded`` (its cluster's workers inherit it).
    """
    if worker_env and mode == "client":
        raise ValueError("worker_env needs mode 'job' or 'embedded'")
    if mode != "job":
        t0 = bench.run(cmd, name=name, env=worker_env)
        if mode == "embedded":
            bench.sweep()  # whatever the embedded cluster left behind
        return t0, cmd
    bench.jobs()  # the working directory is cached on the cluster before the clock starts
    sid = bench.unique("gyb-job")
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", bench.cluster.dashboard,
              "--working-dir", ".", "--submission-id", sid, "--no-wait",
              *(["--runtime-env-json", json.dumps({"env_vars": worker_env})] if worker_env else []),
              "--", *cmd]
    t0 = bench.run(submit, name=name, cwd=ROOT)
    bench.wait_job(sid, name)
    return t0, submit


def plain_storage(bench: Bench, kind: str, d: Path, name: str) -> tuple[str, list[str]]:
    """Where a plain script checkpoints (a path under ``d``, or a fresh S3 prefix) and its endpoint option."""
    if kind == "local":
        return str(d / name), []
    return f"s3://{BUCKET}/{bench.unique(name)}", ["--s3-endpoint", bench.s3.endpoint]


def plain_ray_command(bench: Bench, wl: Workload, d: Path, mode: str, storage_kind: str) -> list[str]:
    """The plain Ray Train script's command line for a launch mode (its S3 checkpoints uploaded async)."""
    if mode == "job":  # run from the job's working directory (a copy of this checkout)
        cmd = ["python", str((SCRIPTS / "raytrain_plain.py").relative_to(ROOT))]
    else:
        cmd = [PY, str(SCRIPTS / "raytrain_plain.py"),
               "--address", "local" if mode == "embedded" else bench.cluster.address]
    where, endpoint = plain_storage(bench, storage_kind, d, "ray_results")
    return cmd + [*wl.plain_args(), "--workers", str(wl.workers), "--storage", where, *endpoint,
                  *(["--async-upload"] if storage_kind == "s3" else []), "--out", str(d / "result.json")]


def run_torchrun(bench: Bench, wl: Workload, storage_kind: str = "local") -> tuple[dict, list[str]]:
    d = bench.fresh("torchrun")
    where, endpoint = plain_storage(bench, storage_kind, d, "snapshot.pt")
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc-per-node={wl.workers}",
           str(SCRIPTS / "ddp_torchrun.py"), *wl.plain_args(),
           "--snapshot-path", where, *endpoint, "--out", str(d / "result.json")]
    t0 = bench.run(cmd, name="torchrun")
    out = read_json(d / "result.json")
    shutil.rmtree(d, ignore_errors=True)
    bench.remove(where)
    return _result(out, t0), cmd


def run_ray_train(bench: Bench, wl: Workload, mode: str = "client",
                  storage_kind: str = "local") -> tuple[dict, list[str]]:
    d = bench.fresh("raytrain")
    cmd = plain_ray_command(bench, wl, d, mode, storage_kind)
    t0, cmd = launch(bench, cmd, mode, f"raytrain-{mode}")
    out = read_json(d / "result.json")
    shutil.rmtree(d, ignore_errors=True)
    bench.remove(cmd[cmd.index("--storage") + 1])
    return _result(out, t0), cmd


def gradyard_storage(bench: Bench, kind: str) -> tuple[str, tuple[str, ...]]:
    """A fresh storage URL of the kind (`local` or `s3`) and the job overrides it needs."""
    if kind == "local":
        return str(bench.fresh("gy")), ()
    return f"s3://{BUCKET}/{bench.unique('run')}", (f"storage.endpoint_url={bench.s3.endpoint}",)


def read_summary(bench: Bench, storage: str, job_name: str, cleanup: bool = True) -> dict:
    from gradyard.storage import open_storage

    endpoint = bench.s3.endpoint if storage.startswith("s3://") else None
    run = open_storage(storage, endpoint_url=endpoint)
    with run.fs.open(run.join(job_name, "summary.json"), "rb") as f:
        summary = json.loads(f.read())
    if cleanup:  # the S3 server holds everything in memory; AlexNet checkpoints are large
        bench.remove(storage)
    return summary


def gradyard_command(bench: Bench, wl: Workload, storage: str, mode: str,
                     extra: tuple[str, ...] = ()) -> list[str]:
    """gradyard's command line for a launch mode."""
    job = JOBS / f"{wl.job}.yaml"
    if mode == "job":
        cmd = ["python", "-m", "gradyard.launch", str(job.relative_to(ROOT))]
    else:
        cmd = [str(VENV_BIN / "gradyard"), "run", str(job)]
        if mode == "client":
            cmd += ["--address", bench.cluster.address]
    cmd += ["--storage", storage]
    for o in [*wl.overrides(), *extra]:
        cmd += ["--set", o]
    return cmd


def _gradyard_result(bench: Bench, wl: Workload, storage: str, t0: float, cpu0) -> dict:
    summary = read_summary(bench, storage, wl.spec().name)
    res = _result(summary, t0)
    res["restarts"] = summary["restarts"]
    res["host_allocator"] = summary.get("host_allocator")
    if cpu0 is not None:
        res["s3_server_cpu_seconds"] = round(bench.s3_cpu_seconds() - cpu0, 2)
    return res


def run_gradyard(bench: Bench, wl: Workload, storage_kind: str, mode: str = "client", *,
                 env: Optional[dict] = None, extra: tuple[str, ...] = (),
                 worker_env: Optional[dict] = None) -> tuple[dict, list[str]]:
    storage, sextra = gradyard_storage(bench, storage_kind)
    cmd = gradyard_command(bench, wl, storage, mode, (*sextra, *extra))
    cpu0 = bench.s3_cpu_seconds() if storage_kind == "s3" else None
    if env:
        t0 = bench.run(cmd, name=f"gradyard-{storage_kind}-{mode}", env=env)
    else:
        t0, cmd = launch(bench, cmd, mode, f"gradyard-{storage_kind}-{mode}", worker_env)
    return _gradyard_result(bench, wl, storage, t0, cpu0), cmd


def rounds(bench: Bench, wl: Workload, contenders: dict[str, Callable], repeats: int,
           say: Callable[[str], None]) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Run every contender once per round; each round starts one contender later (A B C, B C A, ...), so
    no contender always runs first or last in a round."""
    raw: dict[str, list[dict]] = {name: [] for name in contenders}
    commands: dict[str, str] = {}
    names = list(contenders)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            res, cmd = contenders[name](bench, wl)
            res["load_average"] = round(os.getloadavg()[0], 2)
            raw[name].append(res)
            commands.setdefault(name, bench.shown(cmd))
            say(f"  {wl.job} round {r + 1}/{repeats} {name}: {res['steps_per_second']:.3f} steps/s")
    return raw, commands
