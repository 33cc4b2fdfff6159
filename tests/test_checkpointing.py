"""Checkpoints in object storage and exact resume, through Ray: real Ray workers, a real S3 server, the CLI.

The checkpoint manager's guarantees one by one are in ``test_checkpoints`` (in process); real
processes killed, stopped and starved of storage in ``test_chaos``.
"""

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

from conftest import JOBS, ROOT, TEST_ACCESS_KEY, TEST_SECRET_KEY, VENV_BIN, run_cli, wait_until
from gradyard.checkpoint import list_checkpoints
from gradyard.job import load_job
from gradyard.runner import run_job
from gradyard.storage import open_storage
from testkit import FaultProxy, free_port
from testkit.faults import KillAtStep

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
                    callbacks=[KillAtStep(kill_at, rank=1, marker=str(marker))])
    assert marker.exists(), "the worker was never killed"
    assert resumed["restarts"] == 1
    assert resumed["resumed_from_step"] == (kill_at // 10) * 10
    assert resumed["steps"] == reference["steps"]
    assert resumed["model_sha256"] == reference["model_sha256"]
    assert resumed["optimizer_sha256"] == reference["optimizer_sha256"]
    assert resumed["metrics"]["test_accuracy"] == reference["metrics"]["test_accuracy"]


# ------------------------------------------------------------------ S3 (a run and its resume, through
# the CLI and Ray, is in test_security, which also greps all it leaves for secrets)


@pytest.mark.parametrize("case", ["unreachable", "no-bucket", "read-only"])
def test_storage_problems_fail_fast_with_a_clear_error(ray_cluster, s3, case):
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
    args = [str(JOBS / "circles.yaml"), "--address", ray_cluster.address, "--storage", str(tmp_path),
            "--set", "schedule.epochs=3", "--set", "checkpoint.every_steps=5", "--set", "telemetry.enabled=false"]
    # The driver, with slow steps passed in (as `gradyard run` would run it, plus the fault).
    proc = subprocess.Popen([str(VENV_BIN / "python"), str(ROOT / "testkit" / "launch_faults.py"), "--slow", "0.2",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ckpts = tmp_path / "circles" / "checkpoints"
    try:
        wait_until(lambda: ckpts.is_dir() and any((p / "manifest.json").exists() for p in ckpts.iterdir()),
                   timeout=180, what="a complete checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the driver and its process group, mid-run
        proc.wait()
    assert not (tmp_path / "circles" / "summary.json").exists()
    r = run_cli("run", *args, timeout=300)  # the SIGKILLed driver's lease is taken over at once
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint at step" in r.stdout + r.stderr
    summary = json.loads((tmp_path / "circles" / "summary.json").read_text())
    assert summary["steps"] == 39 and summary["restarts"] >= 1
