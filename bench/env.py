"""The benchmark's own world: a temp folder, its own Ray cluster and S3 server, one environment.

Everything binds to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` tells
Ray this is a one-machine cluster, so it keeps 127.0.0.1 instead of swapping in
the machine's routable address).  Every process the bench starts inherits
``GRADYARD_BENCH_TAG``, and the shared cluster's processes also
``GRADYARD_BENCH_CLUSTER``: stopping means ending exactly the processes that
carry the tag (Ray renames its processes, so command lines do not tell), never
``ray stop``, which would take down every cluster on the machine.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

from testkit.cluster import RayCluster
from testkit.processes import kill_tagged

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
SCRIPTS = Path(__file__).resolve().parent / "scripts"
VENV_BIN = Path(sys.executable).parent
PY = sys.executable  # a venv's python, or a system one where there is no venv (bench/gpu.sh)
BUCKET = "gradyard-bench"


class BenchError(Exception):
    """A contender failed; the message carries the tail of its log."""


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def set_environment(tmp: Path) -> dict:
    """The environment every contender inherits; returns what was set (for the page).

    Set before this process imports ray: Ray reads its authentication mode once.
    """
    settings = {
        # One intra-op thread per worker for every contender: 2 workers on 2 cores.
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        # A one-machine cluster: Ray keeps 127.0.0.1 rather than the routable address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "GRADYARD_BENCH_TAG": uuid.uuid4().hex,
        "PYTHONUNBUFFERED": "1",
        # Fake credentials for the S3 test server only.
        "AWS_ACCESS_KEY_ID": "AKIAGRADYARDBENCH000",
        "AWS_SECRET_ACCESS_KEY": "gy-bench-not-a-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Calibration cache of the live analysis: the bench's own, filled once before timing.
        "GRADYARD_PROFILE_DIR": str(tmp / "profiles"),
        "GRADYARD_PROMETHEUS_SD_DIR": str(tmp / "prometheus_sd"),
        # Embedded clusters (start-up benchmark) keep their session files in here.
        "RAY_TMPDIR": str(tmp / "e"),
    }
    os.environ.update(settings)
    if "ray" in sys.modules:
        raise RuntimeError("bench.env.set_environment must run before ray is imported")
    from ray._private.authentication.authentication_token_generator import (
        generate_new_authentication_token,
    )

    os.environ.setdefault("RAY_AUTH_TOKEN", generate_new_authentication_token())
    os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "RAY_ADDRESS"):
        os.environ.pop(var, None)
    (tmp / "e").mkdir(exist_ok=True)
    shown = {k: v for k, v in settings.items()
             if not k.startswith("AWS_SECRET") and k != "GRADYARD_BENCH_TAG"}
    shown["RAY_AUTH_TOKEN"] = "<generated>"
    shown["AWS_ACCESS_KEY_ID"] = "<a fake key of the S3 test server>"  # keys never reach the page
    return shown


class Bench:
    """Shared by all benchmarks of one ``python -m bench``: temp folder, cluster, S3, logs."""

    def __init__(self, tmp: Optional[Path] = None, keep: bool = False, cluster: Optional[tuple[str, str]] = None):
        # Short path: Ray's unix sockets live under it (108-character limit).
        self.tmp = Path(tmp or tempfile.mkdtemp(prefix="gyb-", dir="/tmp"))
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.environment = set_environment(self.tmp)
        self._cluster: Optional[RayCluster] = None
        self._external = cluster
        """(GCS address, dashboard URL) of a running cluster to use and leave running (the smoke test's)."""
        self._jobs = None
        self._s3 = None
        self._n = 0

    # ------------------------------------------------------------ shared servers
    @property
    def cluster(self) -> RayCluster:
        if self._cluster is None and self._external is not None:
            from types import SimpleNamespace

            self._cluster = SimpleNamespace(address=self._external[0], dashboard=self._external[1], stop=lambda: None)
        if self._cluster is None:
            self._cluster = RayCluster(temp_dir=str(self.tmp / "r"), log=self.tmp / "ray-start.log",
                                       tag_var="GRADYARD_BENCH_CLUSTER", worker_ports="23000-23999",
                                       fast_health_checks=False).start()
        return self._cluster

    def stop_cluster(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None
            self._jobs = None

    def jobs(self):
        """A JobSubmissionClient of the bench's cluster; the first call caches the working
        directory's package there with one untimed submission, so no contender pays for it."""
        if self._jobs is None:
            from ray.job_submission import JobSubmissionClient

            self._jobs = JobSubmissionClient(self.cluster.dashboard)
            sid = self.unique("gyb-warmup")
            self.run([str(VENV_BIN / "ray"), "job", "submit", "--address", self.cluster.dashboard,
                      "--working-dir", ".", "--submission-id", sid, "--", "python", "-c", "pass"],
                     name="submit-warmup", cwd=ROOT)
        return self._jobs

    def wait_job(self, sid: str, name: str, timeout: float = 900) -> None:
        """Poll a submitted job until it ends; its logs go to the bench's log of ``name``."""
        from ray.job_submission import JobStatus

        client = self.jobs()
        deadline = time.monotonic() + timeout
        while (status := client.get_job_status(sid)) not in (
                JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            if time.monotonic() > deadline:
                client.stop_job(sid)
                break
            time.sleep(0.5)
        log = self.tmp / f"{name}.log"
        with open(log, "a") as f:
            f.write(client.get_job_logs(sid))
        if status != JobStatus.SUCCEEDED:
            raise BenchError(f"{name}: job {sid} ended {status}\n{_tail(log)}")

    def remove(self, where: str) -> None:
        """Delete a contender's run or checkpoints, local or on the S3 server (which holds everything in
        memory), through gradyard's storage seam."""
        from gradyard.storage import open_storage

        run = open_storage(where, endpoint_url=self.s3.endpoint if where.startswith("s3://") else None)
        if run.fs.exists(run.root_path):
            run.fs.rm(run.root_path, recursive=True)

    def s3_cpu_seconds(self) -> float:
        """CPU seconds the S3 server has used so far (it shares this machine's cores)."""
        from testkit.processes import psutil

        t = psutil().Process(self.s3.proc.pid).cpu_times()
        return t.user + t.system

    @property
    def s3(self):
        if self._s3 is None:
            from testkit import MotoServer

            self._s3 = MotoServer().start()
            self._s3.create_bucket(BUCKET)
        return self._s3

    def close(self) -> None:
        self.stop_cluster()
        if self._s3 is not None:
            self._s3.stop()
            self._s3 = None
        kill_tagged("GRADYARD_BENCH_TAG", os.environ["GRADYARD_BENCH_TAG"])
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def sweep(self) -> None:
        """End whatever contenders left running (an embedded cluster's processes), not the servers."""
        s3 = self._s3.proc.pid if self._s3 is not None else None
        kill_tagged("GRADYARD_BENCH_TAG", os.environ["GRADYARD_BENCH_TAG"], grace_s=2,
                    spare=lambda proc, env: proc.pid == s3 or "GRADYARD_BENCH_CLUSTER" in env)

    def __enter__(self) -> "Bench":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ helpers
    def unique(self, name: str) -> str:
        """``name-N``, never the same twice in one bench."""
        self._n += 1
        return f"{name}-{self._n}"

    def fresh(self, name: str) -> Path:
        """A new, empty folder under the temp dir."""
        d = self.tmp / self.unique(name)
        d.mkdir(parents=True)
        return d

    def shown(self, cmd: list[str]) -> str:
        """A command line as the page prints it: temp paths and ports as variables."""
        text = shlex.join(cmd)
        if self._cluster is not None:
            text = text.replace(self._cluster.dashboard, "$RAY_DASHBOARD")
            text = text.replace(self._cluster.address, "$RAY_ADDRESS")
        if self._s3 is not None:
            text = text.replace(self._s3.endpoint, "$S3_ENDPOINT")
        text = text.replace(str(self.tmp), "$BENCH_TMP").replace(PY, "python")
        text = text.replace(str(VENV_BIN) + "/", "").replace(str(ROOT) + "/", "")
        return text

    def run(self, cmd: list[str], *, name: str, timeout: float = 600,
            env: Optional[dict] = None, cwd: Optional[Path] = None) -> float:
        """Run a contender to completion; returns time.time() just before it started."""
        log = self.tmp / f"{name}.log"
        with open(log, "ab") as out:
            out.write(f"\n$ {shlex.join(cmd)}\n".encode())
            out.flush()
            t0 = time.time()
            try:
                r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                   env={**os.environ, **(env or {})}, cwd=cwd or ROOT,
                                   start_new_session=True)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{name}: timed out after {timeout:.0f}s\n{_tail(log)}") from None
        if r.returncode != 0:
            raise BenchError(f"{name}: exit status {r.returncode}\n{_tail(log)}")
        return t0


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def machine() -> dict:
    """CPU model, cores, memory, GPU, load: what the numbers were measured on."""
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": mem_gib,
            "gpu": ", ".join(gpus) if gpus else "none", "os": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def versions() -> dict:
    import ray
    import s3fs
    import torch
    import torchvision

    import gradyard

    try:
        import moto
        moto_version = moto.__version__
    except ImportError:
        moto_version = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "ray": ray.__version__,
            "gradyard": gradyard.__version__, "s3fs": s3fs.__version__, "moto": moto_version,
            "git": commit + ("+uncommitted changes" if dirty else "")}


def calibrate_once(cache: Optional[str] = None) -> None:
    """Fill the bench's calibration cache for one-thread workers, outside every timed run.

    A worker's live analysis calibrates its device on first use and caches the
    result; the first time, that calibration runs on rank 0 alone and includes an
    allreduce the other ranks never join (reported to the lead), so the cache is
    filled here, once, as every later run on a machine finds it.
    """
    code = ("import torch; torch.set_num_threads(1)\n"
            "from gradyard.analysis.calibrate import DeviceProfile, calibrate, device_name\n"
            "if DeviceProfile.load(device_name()) is None: calibrate(quick=True).save()\n")
    if cache:  # a cache filled before (the test session's): calibrated once, by whichever came first
        os.environ["GRADYARD_PROFILE_DIR"] = cache
    subprocess.run([PY, "-c", code], check=True, timeout=300, capture_output=True)
