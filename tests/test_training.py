"""Every documented model trains as a 2-worker DDP job on the shared local Ray cluster."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import JOBS
from gradyard.job import load_job
from gradyard.runner import run_job
from gradyard.testing.datafiles import make_aclimdb, make_imagefolder, make_mammographic, make_mnist

pytestmark = pytest.mark.ray


def train(job: str, storage, *overrides: str, **kw) -> dict:
    spec = load_job(JOBS / f"{job}.yaml", list(overrides))
    return run_job(spec, storage_url=str(storage), **kw)


@pytest.mark.parametrize("job, floor", [
    ("circles", 0.95), ("blobs", 0.95), ("mnist-lenet", 0.95), ("breast-cancer-mlp", 0.93)])
def test_accuracy_on_shipped_real_data(ray_cluster, tmp_runs, job, floor):
    summary = train(job, tmp_runs, "telemetry.enabled=false")
    assert summary["world_size"] == 2
    assert summary["data"]["synthetic"] is False
    assert summary["metrics"]["test_accuracy"] >= floor, summary["metrics"]
    on_disk = json.loads((tmp_runs / job / "summary.json").read_text())
    assert on_disk["model_sha256"] == summary["model_sha256"]
    assert len({r["rank"] for r in summary["ranks"]}) == 2


@pytest.fixture(scope="module")
def real_format_data(tmp_path_factory):
    """Datasets in their real on-disk formats, and pretrained weights, written here."""
    root = tmp_path_factory.mktemp("datasets")
    make_mnist(root / "FashionMNIST" / "raw", gz=True, n_train=16, n_test=8)
    make_imagefolder(root / "food", per_class=4, size=(70, 70))
    make_aclimdb(root)
    make_mammographic(root / "mammographic_masses.data")
    import torchvision

    weights = root / "efficientnet_b0.pth"
    torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), weights)
    return root


def _data_overrides(job: str, root) -> list[str]:
    return {
        "fashion-linear": [f"data.source={root}/FashionMNIST/raw"],
        "fashion-nonlinear": [f"data.source={root}/FashionMNIST/raw"],
        "fashion-cnn": [f"data.source={root}/FashionMNIST/raw"],
        "tinyvgg": [f"data.source={root}/food", "data.loader_workers=0"],
        "efficientnet-transfer": [f"data.source={root}/food", f"model.pretrained={root}/efficientnet_b0.pth",
                                  "data.loader_workers=0"],
        "imdb-lstm": [f"data.source={root}/aclImdb"],
        "mammogram-mlp": [f"data.source={root}/mammographic_masses.data"],
        # AlexNet at its real 224x224 input, on synthetic data of that shape.
        "alexnet": ["data.source=synthetic", "data.format=null", "data.num_samples=16",
                    "data.loader_workers=0", "data.pin_memory=false", "scaling.use_gpu=false",
                    "schedule.precision=fp32"],
    }.get(job, [])


@pytest.mark.parametrize("job", sorted(p.stem for p in JOBS.glob("*.yaml")))
def test_every_job_file_runs_two_ddp_steps(ray_cluster, tmp_runs, real_format_data, job):
    overrides = _data_overrides(job, real_format_data) + [
        "schedule.epochs=null", "schedule.steps=2", "data.batch_size=2", "scaling.num_workers=2",
        "scaling.resources_per_worker={}", "scaling.placement=PACK", "telemetry.enabled=false",
        "checkpoint.every_seconds=null"]
    summary = train(job, tmp_runs, *overrides)
    assert summary["steps"] == 2
    assert summary["world_size"] == 2
    assert summary["model"] == load_job(JOBS / f"{job}.yaml").model.arch
    assert (tmp_runs / job / "checkpoints").is_dir()
