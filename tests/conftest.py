"""Shared fixtures: one real local Ray cluster per session, moto's S3 server, job paths.

The Ray cluster is started with Ray's own CLI (`ray start --head`), token
authentication on, every port on 127.0.0.1.  Tests that train in-process
attach to it with ``ray.init(address=...)``; CLI tests pass ``--address``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from gradyard.testing.processes import kill_tagged

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
    from ray._private.authentication.authentication_token_generator import (
        generate_new_authentication_token,
    )

    return generate_new_authentication_token()


os.environ.setdefault("RAY_AUTH_TOKEN", _token())


def free_port() -> int:
    from gradyard.testing import free_port as fp

    return fp()


class RayCluster:
    """A Ray cluster started with Ray's CLI, every address on loopback.

    The shared session cluster is one node on 127.0.0.1.  Multi-node clusters
    put each node on its own loopback address (127.0.0.2, 127.0.0.3, ...):
    Ray would swap 127.0.0.1 for the machine's routable address once it is
    allowed more than one node, but leaves other 127.x addresses alone.
    """

    def __init__(self, ip: str = "127.0.0.1", num_cpus: int = 4):
        self.ip = ip
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="gyray-", dir="/tmp")
        self.tag = uuid.uuid4().hex
        self.port = free_port()
        self.dashboard_port = free_port()

    @property
    def env(self) -> dict:
        # One node on 127.0.0.1 only when Ray is told it is a one-machine cluster.
        return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if self.ip == "127.0.0.1" else "1",
                # Every process of this cluster inherits the tag, so stop() finds
                # them all (Ray renames its processes: command lines do not tell).
                "GRADYARD_TEST_CLUSTER": self.tag,
                # Notice a lost node in seconds, not the production default's ~30 s.
                "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                "RAY_health_check_failure_threshold": "3"}

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.ip}:{self.dashboard_port}"

    def ray(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "ray"), *args], capture_output=True, text=True,
                              check=check, env={**os.environ, **self.env}, timeout=180)

    def start(self) -> "RayCluster":
        self.ray("start", "--head", f"--port={self.port}", f"--node-ip-address={self.ip}",
                 f"--num-cpus={self.num_cpus}", "--include-dashboard=true", f"--dashboard-host={self.ip}",
                 f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
                 "--object-store-memory=300000000", "--disable-usage-stats",
                 f"--ray-client-server-port={free_port()}", f"--min-worker-port={20000}",
                 f"--max-worker-port={20999}", f"--dashboard-agent-listen-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}")
        return self

    def add_node(self, ip: str, num_cpus: int = 2, resources: str | None = None) -> int:
        """Start another node on this machine at loopback ``ip``; returns its node-manager port."""
        port = free_port()
        args = ["start", f"--address={self.address}", f"--node-ip-address={ip}",
                f"--num-cpus={num_cpus}", "--object-store-memory=200000000",
                f"--node-manager-port={port}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}"]
        if resources:
            args.append(f"--resources={resources}")
        self.ray(*args)
        return port

    def kill_node(self, port: int) -> None:
        """Lose a node: SIGKILL its raylet (its workers share its fate)."""
        import psutil

        for proc in psutil.process_iter(["cmdline", "name"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "raylet" in (proc.info["name"] or "") and f"--node_manager_port={port}" in cmd:
                proc.kill()

    def stop(self) -> None:
        # Not `ray stop`: it would take down every Ray cluster on the machine.
        kill_tagged("GRADYARD_TEST_CLUSTER", self.tag)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    cluster = RayCluster().start()
    import ray

    ray.init(address=cluster.address, log_to_driver=True)
    yield cluster
    ray.shutdown()
    cluster.stop()


@pytest.fixture(scope="session")
def s3():
    from gradyard.testing import MotoServer

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
