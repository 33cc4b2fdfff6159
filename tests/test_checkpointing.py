"""Checkpoints in object storage and exact resume, against real Ray workers and a real S3 server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
import torch

from conftest import JOBS, TEST_ACCESS_KEY, TEST_SECRET_KEY, VENV_BIN, run_cli, wait_until
from gradyard.checkpoint import list_checkpoints
from gradyard.job import load_job
from gradyard.runner import run_job
from gradyard.storage import open_storage
from gradyard.testing import FaultProxy

pytestmark = pytest.mark.ray

# Dropout (RNG), momentum (optimizer state) and a cosine schedule: all must resume exactly.
EXACT = ["schedule.epochs=2", "regularization.dropout=0.2", "optimizer.name=sgd",
         "optimizer.momentum=0.9", "optimizer.lr=0.05", "schedule.lr_scheduler.name=cosine",
         "checkpoint.every_steps=10", "failure.max_failures=2", "telemetry.enabled=false",
         "scaling.num_workers=2"]


def train(job, storage, *overrides, **kw):
    spec = load_job(JOBS / f"{job}.yaml", list(overrides))
    return run_job(spec, storage_url=str(storage), **kw)


def test_sigkill_mid_epoch_resumes_bitwise_identical(ray_cluster, tmp_path):
    reference = train("mnist-deep", tmp_path / "ref", *EXACT)
    steps_per_epoch = reference["steps"] // 2
    kill_at = steps_per_epoch + 10 + 3          # mid-epoch 2, not a checkpoint step
    assert kill_at % 10 and kill_at < reference["steps"]
    marker = tmp_path / "killed"
    resumed = train("mnist-deep", tmp_path / "killed-run", *EXACT,
                    faults={"kill_at_step": kill_at, "kill_rank": 1, "marker": str(marker)})
    assert marker.exists(), "the worker was never killed"
    assert resumed["restarts"] == 1
    assert resumed["resumed_from_step"] == (kill_at // 10) * 10
    assert resumed["steps"] == reference["steps"]
    assert resumed["model_sha256"] == reference["model_sha256"]
    assert resumed["optimizer_sha256"] == reference["optimizer_sha256"]
    assert resumed["metrics"]["test_accuracy"] == reference["metrics"]["test_accuracy"]


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_and_incomplete_checkpoints_are_skipped(ray_cluster, tmp_path):
    base = ["checkpoint.every_steps=5", "checkpoint.keep=10", "checkpoint.at_epoch_end=false",
            "telemetry.enabled=false"]
    first = train("circles", tmp_path, "schedule.epochs=2", *base)
    run = tmp_path / "circles"
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir())
    assert steps[-1] == first["steps"]
    newest, second, third = (run / "checkpoints" / f"step_{s:09d}" for s in steps[-1:-4:-1])
    _corrupt(newest / "model.pt")
    (second / "manifest.json").unlink()        # as if the upload died before the manifest

    r = run_cli("checkpoints", str(run), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    status = {c["step"]: c["status"] for c in json.loads(r.stdout)}
    assert status[steps[-1]] == "corrupt"
    assert status[steps[-2]] == "incomplete"
    assert status[steps[-3]] == "complete"

    again = train("circles", tmp_path, "schedule.epochs=3", *base)
    assert again["resumed_from_step"] == steps[-3]
    assert again["steps"] == first["steps"] // 2 * 3
    assert again["restarts"] == 1

    # Export: a plain state_dict, loadable with torch.load and the model class alone.
    out = tmp_path / "model.pt"
    r = run_cli("export", str(run), "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"step {again['steps']}" in r.stdout
    state = torch.load(out, weights_only=True)
    from gradyard.data import build_datasets
    from gradyard.models import build_model

    spec = load_job(JOBS / "circles.yaml")
    model = build_model(spec, build_datasets(spec)[2])
    model.load_state_dict(state)
    assert not any(k.startswith("module.") for k in state)
    from gradyard.checkpoint import tensor_digest

    assert tensor_digest(state) == again["model_sha256"]


# ------------------------------------------------------------------ S3


@pytest.fixture
def bucket_url(s3, request):
    return f"s3://gradyard-test/{request.node.name[:40]}-{int(time.time() * 1000)}"


def _objects(s3, prefix: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    bucket, _, key = prefix[len("s3://"):].partition("/")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def test_s3_run_resume_and_no_credentials_anywhere(ray_cluster, s3, bucket_url, tmp_path):
    env = {"AWS_ENDPOINT_URL_S3": s3.endpoint}
    args = ["run", str(JOBS / "circles.yaml"), "--address", ray_cluster.address,
            "--storage", bucket_url, "--set", "schedule.epochs=2", "--set", "checkpoint.every_steps=7"]
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli(*args[:-4], "--set", "schedule.epochs=3", "--set", "checkpoint.every_steps=7",
                    env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint at step 26" in again.stdout + again.stderr

    objects = _objects(s3, bucket_url)
    summary = json.loads(objects[f"{bucket_url.split('/', 3)[3]}/circles/summary.json"])
    assert summary["steps"] == 39 and summary["restarts"] == 1
    storage = open_storage(bucket_url + "/circles", endpoint_url=s3.endpoint)
    assert [c.status for c in list_checkpoints(storage)][-1] == "complete"
    # Ray Train's own run state lives in the same storage.
    assert any("/circles/" in k and not k.split("/circles/")[1].startswith(
        ("checkpoints", "summary.json", "attempts.json", "telemetry", "analysis")) for k in objects)

    listing = run_cli("checkpoints", bucket_url + "/circles", env=env, timeout=120)
    assert listing.returncode == 0 and "complete" in listing.stdout

    texts = [first.stdout, first.stderr, again.stdout, again.stderr, listing.stdout]
    texts += [blob.decode("latin-1") for blob in objects.values()]
    for log in Path(ray_cluster.temp_dir).rglob("*"):
        if log.is_file() and log.stat().st_size < 50_000_000:
            texts.append(log.read_bytes().decode("latin-1"))
    for text in texts:
        assert TEST_SECRET_KEY not in text
        assert TEST_ACCESS_KEY not in text


def _spec_with_endpoint(endpoint: str, *overrides: str):
    return load_job(JOBS / "circles.yaml", [f"storage.endpoint_url={endpoint}", *overrides])


def test_flaky_storage_retries_and_every_checkpoint_lands(ray_cluster, s3, bucket_url):
    with FaultProxy(s3.endpoint, fail_rate=0.25, seed=1) as proxy:
        spec = _spec_with_endpoint(proxy.endpoint, "schedule.epochs=2", "checkpoint.every_steps=5",
                                   "checkpoint.keep=20", "telemetry.enabled=false")
        summary = run_job(spec, storage_url=bucket_url)
    assert proxy.failed > 0 and proxy.forwarded > 0
    assert summary["checkpoints"]["failures_total"] == 0
    infos = list_checkpoints(open_storage(bucket_url + "/circles", endpoint_url=s3.endpoint))
    assert infos and all(i.status == "complete" for i in infos)
    assert infos[-1].step == summary["steps"]


def test_storage_outage_does_not_stop_training(ray_cluster, s3, bucket_url):
    run_url = bucket_url + "/circles"
    direct = open_storage(run_url, endpoint_url=s3.endpoint)
    with FaultProxy(s3.endpoint) as proxy:
        spec = _spec_with_endpoint(proxy.endpoint, "schedule.epochs=4", "checkpoint.every_steps=4",
                                   "checkpoint.keep=50", "telemetry.enabled=false")

        def outage():
            wait_until(lambda: any(i.status == "complete" for i in list_checkpoints(direct, deep=False)),
                       timeout=120, what="first checkpoint")
            proxy.outage = True
            time.sleep(15)             # longer than one checkpoint's retry budget (~8-10 s)
            proxy.outage = False

        t = threading.Thread(target=outage, daemon=True)
        t.start()
        summary = run_job(spec, storage_url=bucket_url, faults={"sleep_per_step": 0.4})
        t.join(timeout=60)
    assert summary["steps"] == 52
    assert summary["checkpoints"]["failures_total"] >= 1
    infos = list_checkpoints(direct)
    complete = [i for i in infos if i.status == "complete"]
    assert complete[-1].step == 52
    newest = open_storage(run_url, endpoint_url=s3.endpoint)
    from gradyard.checkpoint import newest_complete

    assert newest_complete(newest).step == 52


@pytest.mark.parametrize("case", ["unreachable", "no-bucket", "read-only"])
def test_storage_problems_fail_fast_with_a_clear_error(ray_cluster, s3, case):
    from gradyard.testing import free_port

    proxy = None
    if case == "unreachable":
        endpoint, url = f"http://127.0.0.1:{free_port()}", "s3://gradyard-test/x"
    elif case == "no-bucket":
        endpoint, url = s3.endpoint, "s3://no-such-bucket-here/x"
    else:
        proxy = FaultProxy(s3.endpoint).start()
        proxy.deny_writes = True
        endpoint, url = proxy.endpoint, "s3://gradyard-test/ro"
    try:
        t0 = time.monotonic()
        r = run_cli("run", str(JOBS / "circles.yaml"), "--address", ray_cluster.address,
                    "--storage", url, "--set", f"storage.endpoint_url={endpoint}", timeout=180)
        elapsed = time.monotonic() - t0
    finally:
        if proxy:
            proxy.stop()
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert url in r.stderr
    expect = {"unreachable": "not reachable", "no-bucket": "does not exist",
              "read-only": "no permission to write"}[case]
    assert expect in r.stderr
    assert "training on Ray" not in r.stdout, "no worker may start"
    assert elapsed < 120
    assert TEST_SECRET_KEY not in r.stderr + r.stdout


def test_driver_killed_then_restarted_resumes(ray_cluster, tmp_path):
    args = [str(VENV_BIN / "gradyard"), "run", str(JOBS / "circles.yaml"), "--address",
            ray_cluster.address, "--storage", str(tmp_path), "--set", "schedule.epochs=3",
            "--set", "checkpoint.every_steps=5", "--set", "telemetry.enabled=false"]
    env = {**os.environ, "GRADYARD_FAULTS": json.dumps({"sleep_per_step": 0.2})}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ckpts = tmp_path / "circles" / "checkpoints"
    try:
        wait_until(lambda: ckpts.is_dir() and any((p / "manifest.json").exists() for p in ckpts.iterdir()),
                   timeout=180, what="a complete checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the driver and its process group, mid-run
        proc.wait()
    assert not (tmp_path / "circles" / "summary.json").exists()
    r = run_cli(*args[1:], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint at step" in r.stdout + r.stderr
    summary = json.loads((tmp_path / "circles" / "summary.json").read_text())
    assert summary["steps"] == 39 and summary["restarts"] >= 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_writer_keeps_the_newest_and_the_best_and_clears_leftovers(where, s3, bucket_url, tmp_path):
    """Retention: `keep` newest complete checkpoints plus the best one; incomplete ones older
    than the newest go (a crashed attempt's, and one this writer failed to finish).  On S3
    it lists once: later checkpoints cost their PUTs and one bulk delete, no listing or reads."""
    from gradyard.checkpoint import CheckpointWriter, Snapshot, checkpoint_dirname

    proxy = FaultProxy(s3.endpoint).start() if where == "s3" else None
    try:
        url = bucket_url if where == "s3" else str(tmp_path / "run")
        storage = open_storage(url, endpoint_url=proxy.endpoint if proxy else None)
        leftover = storage.join("checkpoints", checkpoint_dirname(5), "model.pt")
        storage.fs.pipe_file(leftover, b"half a checkpoint")   # a crashed attempt's, no manifest
        writer = CheckpointWriter(storage, keep=2, best_metric="acc", best_mode="max")

        def snapshot(step, acc, model=None):
            return Snapshot(step=step, epoch=0, files={"model.pt": model or {"w": torch.full((4,), step)},
                                                       "state.pt": {"step": step}},
                            metrics={"acc": acc}, spec_hash="h")

        accs = {10: 0.5, 20: 0.9, 30: 0.6, 40: 0.7, 50: 0.8, 60: 0.4}
        per_checkpoint = {}
        for step, acc in accs.items():
            before = proxy.methods.copy() if proxy else None
            if step == 30:  # model.pt lands, then serialising state.pt fails: left incomplete
                bad = snapshot(step, acc)
                bad.files["state.pt"] = {"not a tensor": threading.Lock()}
                writer.submit(bad)
            else:
                writer.submit(snapshot(step, acc))
            writer.wait()
            if proxy:
                per_checkpoint[step] = proxy.methods - before
        writer.close(timeout=60)
    finally:
        if proxy:
            proxy.stop()

    assert writer.saved_total == 5 and writer.failures_total == 1
    infos = list_checkpoints(open_storage(url, endpoint_url=s3.endpoint if where == "s3" else None))
    # 20 is the best; 50 and 60 the newest two; 5 (crashed) and 30 (failed) are gone.
    assert [(i.step, i.status) for i in infos] == [(20, "complete"), (50, "complete"), (60, "complete")]
    if proxy:  # after the first listing (and the failed one's clean-up at 40), only writes
        for step in (50, 60):
            counts = per_checkpoint[step]
            assert counts["GET"] == 0 and counts["HEAD"] == 0, (step, counts)
            assert counts["PUT"] == 3 and counts["POST"] == (step == 60), (step, counts)


def test_local_checkpoint_files_are_synced_before_their_manifest(tmp_path, monkeypatch):
    """On local disk a manifest only ever names files already on disk: a machine crash right
    after it cannot leave a 'complete' checkpoint with torn files.  The directory is synced last."""
    import gradyard.checkpoint as ckpt

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", recording_fsync)
    created: dict[str, int] = {}
    real_write = ckpt.write_local_durably

    def recording_write(path, data):
        created[os.path.basename(path)] = len(synced)  # files synced before this one was created
        real_write(path, data)

    monkeypatch.setattr(ckpt, "write_local_durably", recording_write)
    storage = open_storage(str(tmp_path / "run"))
    writer = ckpt.CheckpointWriter(storage, keep=2)
    writer.submit(ckpt.Snapshot(step=7, epoch=0, files={"model.pt": {"w": torch.ones(3)},
                                                        "state.pt": {"step": 7}},
                                metrics={}, spec_hash="h"))
    writer.close(timeout=60)
    assert writer.saved_total == 1
    d = storage.join("checkpoints", ckpt.checkpoint_dirname(7))
    names = [os.path.relpath(p, d) for p in synced]
    assert names == ["model.pt", "state.pt", ckpt.MANIFEST, "."]
    assert created[ckpt.MANIFEST] == 2  # both data files were synced before the manifest existed
    assert [i.status for i in list_checkpoints(storage)] == ["complete"]


def test_fault_hook_kills_once_at_each_listed_step(tmp_path):
    """The recovery benchmark's one run of many kills: each listed step kills once, in order,
    and every attempt's first step is logged (no Ray: the 'attempts' are plain processes)."""
    marker = tmp_path / "faults.log"
    script = ("import sys, types\n"
              "from gradyard.events import Event\n"
              "from gradyard.testing.faults import build_fault_callbacks\n"
              "start = int(sys.argv[1])\n"
              f"cbs = build_fault_callbacks({{'kill_at_step': [3, 5], 'kill_rank': 0, "
              f"'marker': {str(marker)!r}}})\n"
              "for step in range(start + 1, 8):\n"
              "    for cb in cbs: cb.on_event(Event.BATCH_END, types.SimpleNamespace(step=step, rank=0))\n")
    from gradyard.testing.faults import read_marker

    codes, start = [], 0
    for _ in range(3):  # each "restart" resumes from the step before its kill
        r = subprocess.run([sys.executable, "-c", script, str(start)], timeout=60)
        codes.append(r.returncode)
        kills = [e["step"] for e in read_marker(str(marker)) if e["event"] == "kill"]
        start = kills[-1] - 1 if kills else start
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0]
    events = [(e["event"], e["step"]) for e in read_marker(str(marker))]
    assert events == [("first_step", 1), ("kill", 3), ("first_step", 3), ("kill", 5), ("first_step", 5)]
