"""A Ray cluster started with Ray's own CLI for tests and benchmarks, every address on loopback.

One node on 127.0.0.1 is the shared session cluster.  Multi-node clusters
put each node on its own loopback address (127.0.0.2, 127.0.0.3, ...): Ray
would swap 127.0.0.1 for the machine's routable address once it is allowed
more than one node, but leaves other 127.x addresses alone.  Every process a
cluster starts inherits a tag, so :meth:`RayCluster.stop` ends exactly those
(never ``ray stop``, which would take down every cluster on the machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Optional

from testkit.processes import kill_tagged
from testkit.servers import free_port

VENV_BIN = Path(sys.executable).parent


class RayCluster:
    def __init__(self, ip: str = "127.0.0.1", num_cpus: int = 4, tag_var: str = "GRADYARD_TEST_CLUSTER",
                 temp_dir: Optional[str] = None, log: Optional[Path] = None, worker_ports: str = "20000-20999",
                 fast_health_checks: bool = True, head_args: tuple[str, ...] = (),
                 extra_env: Optional[dict] = None):
        self.ip, self.num_cpus, self.tag_var = ip, num_cpus, tag_var
        # e.g. ``--autoscaling-config=...`` with ``RAY_FAKE_CLUSTER=1``: an autoscaler that adds nodes.
        self.head_args, self.extra_env = head_args, dict(extra_env or {})
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="gyray-", dir="/tmp")
        self.node_temp_dirs: list[str] = []
        self.log = log
        self.tag = uuid.uuid4().hex
        self.port = free_port()
        self.dashboard_port = free_port()
        self.worker_ports = worker_ports
        self.fast_health_checks = fast_health_checks

    @property
    def env(self) -> dict:
        env = {
            # One node on 127.0.0.1 only when Ray is told it is a one-machine cluster.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if self.ip == "127.0.0.1" else "1",
            # Every process of this cluster inherits the tag, so stop() finds them all
            # (Ray renames its processes: command lines do not tell).
            self.tag_var: self.tag,
            # Its own processes resolve "auto" to this cluster, as on a machine that runs one
            # (Ray Train's placement-group cleaner asks the state API with "auto"; with several test
            # clusters on the machine it would find them all and fail).
            "RAY_ADDRESS": self.address,
            **self.extra_env,
        }
        if self.fast_health_checks:  # notice a lost node in seconds, not the production default's ~30 s
            env.update({"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                        "RAY_health_check_failure_threshold": "3",
                        # Ray Train's view of the cluster keeps a lost node's resources for a while, so
                        # its first restart asks for the old size and waits this long before it shrinks.
                        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"})
        return env

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.ip}:{self.dashboard_port}"

    def ray(self, *args: str, check: bool = True, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.env, **(env or {})}
        if self.log is None:
            return subprocess.run([str(VENV_BIN / "ray"), *args], capture_output=True, text=True,
                                  check=check, env=env, timeout=180)
        with open(self.log, "ab") as out:
            r = subprocess.run([str(VENV_BIN / "ray"), *args], stdout=out, stderr=subprocess.STDOUT,
                               env=env, timeout=180)
        if check and r.returncode != 0:
            raise RuntimeError(f"ray {args[0]} failed; see {self.log}")
        return r

    def start(self) -> "RayCluster":
        lo, hi = self.worker_ports.split("-")
        try:
            self.ray("start", "--head", f"--port={self.port}", f"--node-ip-address={self.ip}",
                     f"--num-cpus={self.num_cpus}", "--include-dashboard=true", f"--dashboard-host={self.ip}",
                     f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
                     "--object-store-memory=300000000", "--disable-usage-stats",
                     f"--ray-client-server-port={free_port()}", f"--min-worker-port={lo}",
                     f"--max-worker-port={hi}", f"--dashboard-agent-listen-port={free_port()}",
                     f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                     *self.head_args)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, ip: str, num_cpus: int = 2, resources: Optional[str] = None,
                 temp_dir: Optional[str] = None, env: Optional[dict] = None) -> int:
        """Start another node on this machine at loopback ``ip``; returns its node-manager port.

        ``temp_dir`` gives it a Ray temp dir of its own (removed by :meth:`stop`), as a node on
        another machine has; ``env`` adds to the environment its processes inherit."""
        port = free_port()
        args = ["start", f"--address={self.address}", f"--node-ip-address={ip}",
                f"--num-cpus={num_cpus}", "--object-store-memory=200000000",
                f"--node-manager-port={port}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}"]
        if resources:
            args.append(f"--resources={resources}")
        if temp_dir:
            args.append(f"--temp-dir={temp_dir}")
            self.node_temp_dirs.append(temp_dir)
        self.ray(*args, env=env)
        return port

    def kill_node(self, port: int) -> None:
        """Lose a node: SIGKILL its raylet (its workers share its fate)."""
        from testkit.processes import psutil

        ps = psutil()
        for proc in ps.process_iter(["cmdline", "name"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "raylet" in (proc.info["name"] or "") and f"--node_manager_port={port}" in cmd:
                proc.kill()

    def stop(self) -> None:
        # SIGKILL at once: the cluster and its temp folder are thrown away, nothing needs a clean exit.
        kill_tagged(self.tag_var, self.tag, grace_s=0)
        for d in [self.temp_dir, *self.node_temp_dirs]:
            shutil.rmtree(d, ignore_errors=True)
