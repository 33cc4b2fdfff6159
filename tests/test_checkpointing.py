"""Storage problems and a lost driver, through Ray and the CLI: real Ray workers, a real S3 server.

The checkpoint manager's guarantees one by one are in ``test_checkpoints`` (in process); real
processes killed, stopped and starved of storage, and exact resume, in ``test_chaos``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import JOBS, ROOT, TEST_SECRET_KEY, VENV_BIN, run_cli, wait_until
from testkit import FaultProxy, free_port

pytestmark = pytest.mark.ray

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
