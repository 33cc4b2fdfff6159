"""Job definitions: every shipped file validates; bad ones fail clearly, with no traceback."""

from __future__ import annotations

import pytest
import yaml

from conftest import JOBS, run_cli
from gradyard.job import JobError, JobSpec, load_job

DOCUMENTED = ["circles", "blobs", "mnist-shallow", "mnist-deep", "mnist-lenet", "fashion-linear",
              "fashion-nonlinear", "fashion-cnn", "tinyvgg", "imdb-lstm", "alexnet",
              "efficientnet-transfer", "mammogram-mlp", "ddp-linear"]


def test_every_documented_model_has_a_job_file_whose_name_matches():
    for name in DOCUMENTED:
        spec = load_job(JOBS / f"{name}.yaml")
        assert spec.name == name


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.stem)
def test_job_file_validates(path):
    spec = load_job(path)
    assert spec.name == path.stem


def _write(tmp_path, doc, name="job.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc) if isinstance(doc, dict) else doc)
    return p


def _base():
    return yaml.safe_load((JOBS / "circles.yaml").read_text())


@pytest.mark.parametrize("mutate, key, expect", [
    (lambda d: d["optimizer"].update(nme="sgd"), "optimizer.nme", "unknown key; allowed here: name, lr"),
    (lambda d: d["optimizer"].update(lr=-1), "optimizer.lr", "greater than 0"),
    (lambda d: d["optimizer"].update(name="rmsprop"), "optimizer.name", "'sgd', 'adam' or 'adamw'"),
    (lambda d: d["data"].update(batch_size="big"), "data.batch_size", "valid integer"),
    (lambda d: d["schedule"].update(steps=10), "schedule", "exactly one of schedule.epochs and schedule.steps"),
    (lambda d: d["scaling"].update(num_workers=[4, 2]), "scaling.num_workers", "1 <= min <= max"),
    (lambda d: d["scaling"].update(placement="EVERYWHERE"), "scaling.placement", "'PACK'"),
    (lambda d: d.update(augmentation=[{"name": "mixup"}]), "augmentation.0", "allowed: flip, rotation"),
    (lambda d: d["model"].update(arch="resnet9000"), "model.arch", "allowed:"),
    (lambda d: d["model"]["params"].update(hiden=[3]), "model.params.hiden", "allowed:"),
    (lambda d: d.update(colour="blue"), "colour", "unknown key; allowed here: name, description"),
    (lambda d: d["data"].update(source="s3://bucket/x"), "data", "data.format is required"),
])
def test_bad_values_are_named_with_what_is_allowed(tmp_path, mutate, key, expect):
    doc = _base()
    mutate(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(JobError) as err:
        load_job(path)
    msg = str(err.value)
    assert str(path) in msg
    line = next((ln for ln in msg.splitlines() if ln.strip().startswith(key + ":")), None)
    assert line is not None, msg
    assert expect in line, msg


def test_overrides_apply_and_are_validated():
    spec = load_job(JOBS / "circles.yaml", ["schedule.epochs=3", "data.batch_size=8",
                                            "scaling.num_workers=[1, 2]"])
    assert spec.schedule.epochs == 3 and spec.data.batch_size == 8
    assert spec.scaling.num_workers == (1, 2)
    with pytest.raises(JobError, match="schedule.epochs"):
        load_job(JOBS / "circles.yaml", ["schedule.epochs=0"])


def test_spec_hash_is_stable_and_sensitive():
    a = load_job(JOBS / "circles.yaml")
    b = load_job(JOBS / "circles.yaml")
    c = load_job(JOBS / "circles.yaml", ["optimizer.lr=0.02"])
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()
    assert isinstance(JobSpec.model_validate(a.model_dump(mode="json")), JobSpec)


def test_cli_validate_reports_errors_without_traceback(tmp_path):
    good = JOBS / "circles.yaml"
    doc = _base()
    doc["optimizer"]["momentum"] = 1.5
    bad = _write(tmp_path, doc, "bad.yaml")
    broken = _write(tmp_path, "name: x\n  model: [\n", "broken.yaml")
    r = run_cli("validate", str(good), str(bad), str(broken), "does-not-exist.yaml", timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    assert f"{good}: ok" in r.stdout
    assert f"{bad}: invalid job definition" in r.stderr
    assert "optimizer.momentum: input should be less than 1" in r.stderr
    assert f"{broken}: not valid YAML at line" in r.stderr
    assert "does-not-exist.yaml: no such job file" in r.stderr


def test_cli_jobs_lists_models_datasets_and_parameter_counts():
    r = run_cli("jobs", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    import json

    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(DOCUMENTED) <= set(rows)
    assert rows["mnist-lenet"]["model"] == "lenet5"
    assert rows["mnist-lenet"]["data"] == "digits"
    # torchvision AlexNet has 61.1M parameters with 1000 classes; fewer with fewer classes.
    assert int(rows["alexnet"]["parameters"].replace(",", "").split()[0]) > 50_000_000
    assert "trainable" in rows["efficientnet-transfer"]["parameters"]
