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


# ---------------------------------------------------------------- bounds and locations (untrusted input)


@pytest.mark.parametrize("override, key, shown", [
    ("data.loader_workers=1000000", "data.loader_workers", "64 (got 1000000)"),
    ("optimizer.lr=.inf", "optimizer.lr", "finite number (got inf)"),
    ("optimizer.lr=1e9", "optimizer.lr", "less than or equal to 100 (got '1e9')"),
    ("schedule.seed=2300000000000001", "schedule.seed", "less than or equal to 4294967295 (got 2300000000000001)"),
    ("scaling.resources_per_worker={CPU: -5}", "scaling.resources_per_worker", "CPU: -5.0 is not an amount"),
    ("scaling.resources_per_worker={CPU: .nan}", "scaling.resources_per_worker.CPU", "finite number (got nan)"),
    ("data.vocab_size=1000000000", "data.vocab_size", "less than or equal to 10000000 (got 1000000000)"),
    ("data.max_length=1000000000", "data.max_length", "less than or equal to 100000 (got 1000000000)"),
    ("data.image_size=1000000000", "data.image_size", "less than or equal to 4096 (got 1000000000)"),
    ("data.num_samples=1000000000", "data.num_samples", "less than or equal to 100000000 (got 1000000000)"),
    ("checkpoint.best_metric=test_acuracy", "checkpoint.best_metric", "'test_accuracy', 'test_loss'"),
    ("scaling.num_workers=100000", "scaling.num_workers", "100000 workers; allowed: 1 to 4096"),
    ("storage.url=http://example.com/runs", "storage.url", "unsupported scheme 'http://'; allowed: a local path"),
    ("data.source=ftp://example.com/d", "data.source", "unsupported scheme 'ftp://'"),
    ("model.pretrained=https://example.com/w.pt", "model.pretrained", "unsupported scheme 'https://'"),
    ("storage.endpoint_url=ftp://minio:9000", "storage.endpoint_url", "http:// or https://"),
])
def test_absurd_values_are_refused_naming_key_value_and_bound(override, key, shown):
    with pytest.raises(JobError) as err:
        load_job(JOBS / "circles.yaml", [override])
    line = next((ln.strip() for ln in str(err.value).splitlines() if ln.strip().startswith(key + ":")), "")
    assert shown in line, str(err.value)


def test_sizes_that_do_not_fit_host_memory_are_refused_with_the_estimate():
    from gradyard.catalogue import host_memory_bytes

    gb = host_memory_bytes() / 1e9
    with pytest.raises(JobError) as err:  # 10^8 synthetic 3x1024x1024 images
        load_job(JOBS / "tinyvgg.yaml", ["data.source=synthetic", "data.num_samples=100000000",
                                          "data.image_size=1024"])
    msg = str(err.value)
    assert "data.num_samples: this job needs about" in msg and f"this machine has {gb:,.1f} GB" in msg
    with pytest.raises(JobError, match="model.params.hidden: this job needs about"):
        load_job(JOBS / "mnist-deep.yaml", ["model.params.hidden=[1000000, 1000000]"])
    with pytest.raises(JobError, match="data.vocab_size: this job needs about"):
        load_job(JOBS / "imdb-lstm.yaml", ["data.vocab_size=10000000", "model.params.embed_dim=100000"])


def test_credentials_in_urls_are_refused_without_echoing_them():
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzEXAMPLEKEY"
    for key in ("storage.url", "data.source", "model.pretrained"):
        with pytest.raises(JobError) as err:
            load_job(JOBS / "circles.yaml", [f"{key}=s3://AKIAEXAMPLE:{secret}@bucket/x", "data.format=csv"])
        assert f"{key}: must not carry credentials" in str(err.value)
        assert secret not in str(err.value)
    with pytest.raises(JobError) as err:
        load_job(JOBS / "circles.yaml", [f"storage.url=s3://bucket/x?X-Amz-Signature={secret}"])
    assert "takes no query string" in str(err.value) and secret not in str(err.value)


def test_validate_imports_no_torch_and_fits_in_little_memory():
    """Validation of every shipped job: the schema and the catalogue, no torch, no Ray."""
    import subprocess
    import sys

    # VmHWM, not getrusage's ru_maxrss, which keeps the forking parent's peak across exec.
    code = ("import sys, glob\n"
            "from gradyard.cli import main\n"
            "rc = main(['validate', *sorted(glob.glob('jobs/*.yaml'))])\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'ray', 'fsspec', 's3fs') if m in sys.modules)\n"
            "hwm = next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM'))\n"
            "print('HEAVY', heavy, 'PEAK_KB', hwm)\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=JOBS.parent)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    assert r.stdout.count(": ok (") == len(list(JOBS.glob("*.yaml")))
    peak_kb = int(r.stdout.rsplit("PEAK_KB", 1)[1])
    assert peak_kb < 200 * 1024, f"{peak_kb / 1024:.0f} MB"


def test_synthetic_keeps_the_shapes_of_the_data_it_replaces():
    spec = load_job(JOBS / "mnist-shallow.yaml", ["data.source=synthetic"])
    assert spec.data.like == "digits"
    spec = load_job(JOBS / "fashion-cnn.yaml", ["data.source=synthetic"])
    assert spec.data.like == "idx"


def test_the_published_schema_checks_every_shipped_job_and_documents_every_field():
    """`gradyard schema` is a standard JSON Schema: every shipped job validates against it with
    jsonschema's own validator, a bad one does not, every property has a description, and the
    copies in docs/ (the one editors use, and the reference page) are what the models say now."""
    import json

    import jsonschema

    from conftest import ROOT
    from gradyard.schema import EDITOR_COMMENT, markdown

    r = run_cli("schema", timeout=60)
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    validator = jsonschema.Draft202012Validator(schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in sorted(JOBS.glob("*.yaml")):
        text = path.read_text()
        assert text.splitlines()[0] == EDITOR_COMMENT, path.name
        assert not list(validator.iter_errors(yaml.safe_load(text))), path.name
    bad = yaml.safe_load((JOBS / "circles.yaml").read_text())
    bad["optimizer"]["lr"] = -3
    bad["scaling"] = {"num_workers": 2, "typo": 1}
    found = {(tuple(e.absolute_path), e.validator) for e in validator.iter_errors(bad)}
    assert found == {(("optimizer", "lr"), "exclusiveMinimum"), (("scaling",), "additionalProperties")}, found

    undocumented = [f"{name}.{key}" for name, sch in [("JobSpec", schema), *schema["$defs"].items()]
                    for key, prop in sch.get("properties", {}).items() if not prop.get("description")]
    assert not undocumented
    assert (ROOT / "docs" / "job.schema.json").read_text() == r.stdout, "run: gradyard schema > docs/job.schema.json"
    assert (ROOT / "docs" / "jobs.md").read_text() == markdown(), "run: gradyard schema --markdown > docs/jobs.md"
