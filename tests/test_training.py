"""Every documented model trains as a 2-worker DDP job on the shared local Ray cluster.

Starting a Ray Train worker group costs ~15 s on 2 cores, so the jobs share
one: one TorchTrainer whose two workers call gradyard's real worker entry
(``run_worker``) for each job in turn.  Each job still builds its own data,
model, DDP wrapper, optimizer, checkpoints and summary, exactly as
``gradyard run`` does; ``test_checkpointing`` and ``test_submission`` cover
the driver side (``run_job``, the CLI, ``ray job submit``).
"""

from __future__ import annotations

import json

import pytest

from conftest import JOBS
from gradyard import hostmem
from gradyard.job import load_job
from testkit.bundle import run_each
from testkit.datafiles import real_data_overrides, write_job_datasets

pytestmark = pytest.mark.ray

ACCURACY = {"circles": 0.95, "blobs": 0.95, "mnist-lenet": 0.95, "breast-cancer-mlp": 0.93}
ALL_JOBS = sorted(p.stem for p in JOBS.glob("*.yaml"))


@pytest.fixture(scope="module")
def summaries(ray_cluster, tmp_path_factory) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gradyard.runner import preflight_data
    from gradyard.worker import run_directory

    data = tmp_path_factory.mktemp("datasets")
    write_job_datasets(data)
    runs_dir = tmp_path_factory.mktemp("runs")
    runs, where = [], {}
    for job in ACCURACY:
        runs.append((f"acc-{job}", job, ["telemetry.enabled=false"]))
    for job in ALL_JOBS:
        runs.append((f"two-{job}", job, real_data_overrides(job, data) + [
            "schedule.epochs=null", "schedule.steps=2", "data.batch_size=2", "telemetry.enabled=false",
            "checkpoint.every_seconds=null", "checkpoint.every_steps=1"]))
    configs = []
    for key, job, overrides in runs:
        spec = load_job(JOBS / f"{job}.yaml", overrides)
        preflight_data(spec)
        run = run_directory(spec, str(runs_dir / key))
        where[key] = run
        configs.append({"spec": spec.model_dump(mode="json"), "storage": run.spec(), "launcher": "ray"})
    TorchTrainer(run_each, train_loop_config={"runs": configs},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name="every-job", storage_path=str(runs_dir))).fit()
    return {key: json.loads(run.fs.open(run.join("summary.json")).read()) | {"run_path": run.root_path}
            for key, run in where.items()}


@pytest.mark.parametrize("job", list(ACCURACY))
def test_accuracy_on_shipped_real_data(summaries, job):
    summary = summaries[f"acc-{job}"]
    assert summary["world_size"] == 2
    assert summary["data"]["synthetic"] is False
    assert summary["metrics"]["test_accuracy"] >= ACCURACY[job], summary["metrics"]
    assert len({r["rank"] for r in summary["ranks"]}) == 2
    # The Ray workers tuned glibc malloc (gradyard.hostmem) unless this environment opts out.
    assert summary["host_allocator"]["tuned"] is hostmem.allocator_choice()[0], summary["host_allocator"]


@pytest.mark.parametrize("job", ALL_JOBS)
def test_every_job_file_runs_two_ddp_steps(summaries, job):
    from pathlib import Path

    summary = summaries[f"two-{job}"]
    assert summary["steps"] == 2
    assert summary["world_size"] == 2
    assert summary["model"] == load_job(JOBS / f"{job}.yaml").model.arch
    ckpts = sorted((Path(summary["run_path"]) / "checkpoints").iterdir())
    assert [p.name for p in ckpts][-1] == "step_000000002"
    assert (ckpts[-1] / "manifest.json").exists()
