"""Shared fixtures: one real local Ray cluster per session, moto's S3 server, job paths.

The Ray cluster is started with Ray's own CLI (`ray start --head`, see
``testkit.cluster``), token authentication on, every port on 127.0.0.1.
Tests that train in-process attach to it with ``ray.init(address=...)``;
CLI tests pass ``--address``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from testkit import MotoServer, RayCluster  # noqa: F401 - RayCluster is re-exported for the tests

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
VENV_BIN = Path(sys.executable).parent

# Distinctive fake credentials: tests grep every log line and file for them.
TEST_ACCESS_KEY = "AKIAGRADYARDTEST7Q2X"
TEST_SECRET_KEY = "gy-secret-" + uuid.uuid4().hex
os.environ.update({
    "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    "PYTHONUNBUFFERED": "1",
    # Ray swaps 127.0.0.1 for the machine's routable address unless told this
    # is a one-machine cluster: the shared cluster and its clients say so.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
})
# `ray job submit` entrypoints run `python` from PATH: make it this venv's.
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
# Workers inherit these from the cluster: device profiles and Prometheus
# file_sd targets stay inside this test session.
_SESSION_DIR = tempfile.mkdtemp(prefix="gytest-")
os.environ["GRADYARD_PROFILE_DIR"] = os.path.join(_SESSION_DIR, "profiles")
os.environ["GRADYARD_PROMETHEUS_SD_DIR"] = os.path.join(_SESSION_DIR, "prometheus_sd")
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_ENDPOINT_URL_S3", None)
os.environ.pop("AWS_PROFILE", None)


def _token() -> str:
    try:
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )
    except ImportError:  # no Ray here (bench/gpu.sh's GPU machine): no cluster to authenticate to
        import secrets

        return secrets.token_hex(32)
    return generate_new_authentication_token()


os.environ.setdefault("RAY_AUTH_TOKEN", _token())


SLOW_FIXTURES = {"s3", "ray_cluster", "two_nodes", "reference"}
"""A test that needs one of these servers or clusters is not in the fast lane, whatever its marks."""


ONE_WORKER = {"test_analysis", "test_submission", "test_training"}
"""Modules whose tests share a module-scoped fixture worth a while (a calibration, the two-node
cluster, the shared worker group): under ``make test``'s two pytest-xdist workers (``--dist
loadgroup``) each runs on one worker, so the fixture is built once.  (test_chaos is spread: its
reference run is shared through a file, and its tests are the longest of the suite.)"""


def worker_index() -> int:
    """0 without pytest-xdist; N on its worker ``gwN``."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)


def pytest_collection_modifyitems(config, items):
    """Lanes: the fast lane (``-m "unit and not integration"``, seconds) runs first so a failure shows
    early; `make test-fast` runs it alone.  Then the rest, in file order."""
    for item in items:
        if item.get_closest_marker("unit") and SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if _module(item) in MEASURES_THE_MACHINE and not item.get_closest_marker("unit"):
            item.add_marker(pytest.mark.timing)
        if _module(item) in ONE_WORKER:
            item.add_marker(pytest.mark.xdist_group(_module(item)))
    fast = [i for i in items if i.get_closest_marker("unit") and not i.get_closest_marker("integration")]
    chosen = set(map(id, fast))
    rest = [i for i in items if id(i) not in chosen]
    # The longest modules next, so that two workers end together rather than one finishing them alone.
    rest.sort(key=lambda i: LONGEST.index(_module(i)) if _module(i) in LONGEST else len(LONGEST))
    items[:] = fast + rest


LONGEST = ("test_bench_smoke", "test_chaos")

MEASURES_THE_MACHINE = {"test_analysis"}
"""Its tests calibrate the device and judge measured steps against it: a second worker beside them
changes what they measure, so `make test` runs them alone (marker ``timing``)."""


def _module(item) -> str:
    return item.module.__name__.rpartition(".")[2] if item.module else ""


@pytest.fixture(scope="session")
def ray_cluster():
    # Each xdist worker has a cluster of its own: worker ports apart (20000-20999, 21000-21999).
    lo = 20000 + 1000 * worker_index()
    cluster = RayCluster(worker_ports=f"{lo}-{lo + 999}").start()
    import ray

    ray.init(address=cluster.address, log_to_driver=True)
    yield cluster
    ray.shutdown()
    cluster.stop()


@pytest.fixture(scope="session")
def s3():
    with MotoServer() as server:
        server.create_bucket("gradyard-test")
        yield server


@pytest.fixture
def tmp_runs(tmp_path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


def run_cli(*args: str, timeout: float = 600, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `gradyard` console script in a subprocess."""
    return subprocess.run([str(VENV_BIN / "gradyard"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd or ROOT)


def wait_until(pred, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


RAY_ERROR_LINE = re.compile(r"\d E \d+ \d+\]")
"""Ray core's log format: ``[2026-12-01 13:00:00,123 E 4242 4242] core_worker.cc:...``."""


def quiet_success(output: str) -> None:
    """A successful run prints no traceback and no error line (Ray's known noise: gradyard.raylogs)."""
    assert "Traceback" not in output, output[-5000:]
    errors = [ln for ln in output.splitlines()
              if RAY_ERROR_LINE.search(ln) or re.search(r"^(\(.*?\) )?error\b|\bERROR\b", ln, re.I)]
    assert not errors, errors
