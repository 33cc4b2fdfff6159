"""A real 2-worker gradyard job on Ray, scraped by a real Prometheus; every dashboard query runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import JOBS, wait_until
from gradyard.analysis.verdict import REGIMES
from gradyard.job import load_job
from gradyard.runner import run_job
from testkit.faults import SlowSteps
from test_telemetry import ROOT, Prometheus, assert_prometheus_labels, gpu_only, panel_queries, prometheus_binary

pytestmark = [pytest.mark.ray, pytest.mark.prometheus]


def value(prom, expr: str) -> float:
    result = prom.query(expr)
    assert result, f"no series for {expr}"
    return float(result[0]["value"][1])


def test_ray_job_metrics_answer_every_dashboard_panel(ray_cluster, tmp_path):
    sd_dir = Path(os.environ["GRADYARD_PROMETHEUS_SD_DIR"])
    sd_dir.mkdir(parents=True, exist_ok=True)
    prom = Prometheus(prometheus_binary(), tmp_path, sd_dir)
    spec = load_job(JOBS / "fashion-cnn.yaml", [
        "data.source=synthetic", "data.num_samples=4096", "schedule.epochs=null", "schedule.steps=150",
        "telemetry.measure_flops_every=50", "checkpoint.every_steps=50", "scaling.num_workers=2"])
    result: dict = {}

    def train():
        try:
            result["summary"] = run_job(spec, storage_url=str(tmp_path / "runs"),
                                        callbacks=[SlowSteps(0.1)])
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            result["error"] = exc

    t = threading.Thread(target=train, daemon=True)
    try:
        prom.wait_ready(time.monotonic() + 30)
        t.start()
        # Both ranks scraped, past the live analysis (step 7) and a measured-FLOPs step.
        wait_until(lambda: "error" in result or len(prom.query("gradyard_steps_total > 60")) == 2,
                   timeout=240, interval=1, what="both workers scraped past step 60")
        assert "error" not in result, result.get("error")
        time.sleep(3)   # a few more scrapes for rate() windows
        for title, expr in panel_queries():
            series = prom.query(expr)
            if gpu_only(expr):
                assert series == [], f"{title}: GPU series must be absent on CPU ({expr})"
            else:
                assert series, f"{title}: no series for {expr}"

        # Labelled as Ray Train labels its own series: run name = the job name (RunConfig(name=...)),
        # the worker's world rank; and gradyard's run id beside it.
        targets = prom.get("/api/v1/targets")["activeTargets"]
        assert_prometheus_labels(prom, {t["labels"]["instance"] for t in targets})
        runs = {s["metric"]["gradyard_run"] for s in prom.query('gradyard_steps_total{ray_train_run_name="fashion-cnn"}')}
        assert len(runs) == 1, runs
        for rank in ("0", "1"):
            sel = f'{{ray_train_run_name="fashion-cnn",ray_train_worker_world_rank="{rank}"}}'
            step_s = value(prom, f"gradyard_step_seconds_total{sel}")
            phases = value(prom, f"sum(gradyard_step_phase_seconds_total{sel})")
            assert abs(phases - step_s) <= 0.1 * step_s, (rank, phases, step_s)
            from gradyard.data import build_datasets
            from gradyard.models import build_model
            from gradyard.telemetry.comm import gradient_bytes

            grad_bytes = gradient_bytes(build_model(spec, build_datasets(spec)[2]))
            assert value(prom, f"gradyard_allreduce_step_bytes{sel}") == grad_bytes
            assert 0 < value(prom, f"gradyard_mfu_ratio{sel}") < 1
        # The live analysis (rank 0): one state of the StateSet is 1, and its evidence comes in base units.
        states = prom.query('gradyard_regime{ray_train_run_name="fashion-cnn"}')
        assert sorted(s["metric"]["gradyard_regime"] for s in states) == sorted(REGIMES)
        assert sum(float(s["value"][1]) for s in states) == 1
        assert value(prom, 'gradyard_regime_evidence_seconds{ray_train_run_name="fashion-cnn",key="step_s"}') > 0
        assert 0 <= value(prom, 'gradyard_regime_evidence_ratio{ray_train_run_name="fashion-cnn",key="mfu"}') < 1
        # Ray's own dashboards are where deploy/grafana/provisioning/dashboards/ray.yaml has Grafana look,
        # under this cluster's temp dir instead of /tmp/ray.
        (provider,) = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/ray.yaml").read_text())[
            "providers"]
        written = Path(ray_cluster.temp_dir) / Path(provider["options"]["path"]).relative_to("/tmp/ray")
        assert {"default_grafana_dashboard.json", "train_grafana_dashboard.json"} <= {
            p.name for p in written.glob("*.json")}, written
        t.join(240)
        assert "summary" in result, result.get("error")
        assert result["summary"]["steps"] == 150
        assert runs == {result["summary"]["run_id"]}
    finally:
        prom.stop()


REGISTER = """
import os, signal, sys, ray
from gradyard.telemetry.discovery import HeadRegistration
ray.init(address=sys.argv[1])
reg = HeadRegistration(sys.argv[2], ttl_s=float(sys.argv[3]))
reg.publish([{"targets": ["127.0.0.1:9"], "labels": {"gradyard_run": "gone"}}])
print(reg.path, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_sigkilled_runs_targets_leave_the_head_a_ttl_after_its_last_heartbeat(ray_cluster):
    """A registration outlives its TTL while its process beats, and is gone within the TTL of a
    SIGKILL: Prometheus stops scraping a run that could not withdraw."""
    key, ttl = f"killed-{os.getpid()}", 3
    proc = subprocess.Popen([sys.executable, "-c", REGISTER, ray_cluster.address, key, str(ttl)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        path = Path(proc.stdout.readline().strip())
        assert path == Path(os.environ["GRADYARD_PROMETHEUS_SD_DIR"]) / f"{key}.json"
        import ray

        from gradyard.telemetry.discovery import ACTOR_NAME, ACTOR_NAMESPACE

        registry = ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE)
        # Several TTLs' worth of heartbeats (one every TTL/4), counted by the registry, not slept for.
        wait_until(lambda: ray.get(registry.beats.remote(key)) >= 12, timeout=120, what="twelve heartbeats")
        assert path.exists() and key in ray.get(registry.keys.remote()), "a live registration lapsed"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == -signal.SIGKILL
        wait_until(lambda: not path.exists(), timeout=60, what="the killed run's file_sd removed")
    finally:
        proc.kill()
