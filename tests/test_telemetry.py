"""Telemetry: the pieces, the real Trainer with its telemetry on, a real 2-worker gloo run scraped by a
real Prometheus, and the CUDA path; and what deploy/ ships beside them: the Prometheus config, recording
rules and alerts (promtool), the dashboard and Grafana's provisioning.

Every run here is gradyard's own Trainer (with its checkpoint manager) on a tiny MLP job; tests add
callbacks of their own (slow data, a gate at the end) the way any callback attaches.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from gradyard.analysis.verdict import REGIMES
from gradyard.checkpoint import CheckpointManager, RunRecord
from gradyard.events import Callback, Event
from gradyard.job import JobSpec, parse_job
from gradyard.storage import open_storage
from gradyard.telemetry import (
    FlopsMonitor,
    GradSyncMonitor,
    PrometheusExporter,
    TelemetryMetrics,
    build_telemetry_callbacks,
    find_metrics,
    peak_flops,
)
from gradyard.intervals import union_seconds
from gradyard.telemetry.comm import (
    bus_bandwidth,
    comm_stats,
    gradient_bytes,
)
from gradyard.telemetry.flops import PEAK_FLOPS, matmul_precision
from gradyard.telemetry.metrics import EVIDENCE_UNITS, IDENTITY_LABELS, host_name, identity_labels
from gradyard.telemetry.nvml import NvmlReader, gpu_identity
from gradyard.trainer import DistInfo, Trainer
from testkit import free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/gpu-efficiency.json"
PROM_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
RULES = ROOT / "deploy/prometheus/rules/gradyard.rules.yml"
ALERTS = ROOT / "deploy/prometheus/rules/gradyard.alerts.yml"
RULE_FILES = sorted((ROOT / "deploy/prometheus/rules").glob("*.yml"))
RULE_TESTS = sorted((ROOT / "deploy/prometheus/tests").glob("*.yml"))
CI = os.environ.get("CI", "").lower() == "true"

# ------------------------------------------------------------------ helpers

CPU_IDENTITY = {"ray_train_run_name": "exp", "gradyard_run": "r9", "ray_train_worker_world_rank": "0",
                "Hostname": "n", "gpu": "", "UUID": ""}
GPU_IDENTITY = {**CPU_IDENTITY, "gpu": "3", "UUID": "GPU-5b8c7e1a-0000-4000-8000-000000000003"}


def make_spec(name: str = "telemetry-test", every: int = 5, steps: int = 10, precision: str = "fp32",
              world: int = 1, checkpoint_every: int = 3) -> JobSpec:
    return parse_job({
        "name": name,
        "model": {"arch": "mlp", "params": {"hidden": [64, 64]}},
        "data": {"source": "synthetic", "batch_size": 16, "num_samples": 8192},
        "schedule": {"steps": steps, "precision": precision},
        "scaling": {"num_workers": world},
        "checkpoint": {"every_steps": checkpoint_every, "at_epoch_end": False},
        "telemetry": {"measure_flops_every": every},
    })


class SlowData(Callback):
    """The data loader's wait: sleeps inside the data phase (after the step timer's BEFORE_DATA mark)."""

    name = "slow_data"
    events = frozenset((Event.BEFORE_DATA,))

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_event(self, event, state):
        time.sleep(self.seconds)


class Watch(Callback):
    """Calls ``fn(state)`` after every step."""

    name = "watch"
    events = frozenset((Event.BATCH_END,))

    def __init__(self, fn):
        self.fn = fn

    def on_event(self, event, state):
        self.fn(state)


class AtTheEnd(Callback):
    """At FIT_END (the exporter still serves): report, then wait to be released before closing."""

    name = "at_the_end"
    events = frozenset((Event.FIT_END,))

    def __init__(self, report, release):
        self.report, self.release = report, release

    def on_event(self, event, state):
        self.report(state)
        self.release.wait(120)


def fit(spec: JobSpec, callbacks: list, root: Path, *, rank: int = 0, world: int = 1,
        device: Optional[torch.device] = None, node: str = "localhost", wrap_ddp: bool = False) -> Trainer:
    """The real Trainer with the real checkpoint manager on local storage under ``root``."""
    storage = open_storage(str(root / "run"))
    manager = CheckpointManager(spec, storage, rank=rank, world_size=world,
                                record=RunRecord(run_id="run1", starts=1, new=False))
    trainer = Trainer(spec, storage, DistInfo(rank=rank, world_size=world, local_rank=rank, node=node),
                      "run1", callbacks, device=device, checkpointer=manager)
    if wrap_ddp:  # DDP on a one-rank group, so the comm hook runs (the trainer wraps only for 2+ ranks)
        s = trainer.state
        s.ddp_model = torch.nn.parallel.DistributedDataParallel(
            s.model, device_ids=[s.device.index] if s.device.type == "cuda" else None, bucket_cap_mb=0.01)
    trainer.fit()
    return trainer


def sample(metrics: TelemetryMetrics, name: str, **labels) -> Optional[float]:
    return metrics.registry.get_sample_value(name, {**metrics.identity, **labels})


def phase_sum(metrics: TelemetryMetrics) -> float:
    return sum(sample(metrics, "gradyard_step_phase_seconds_total", phase=p) or 0.0
               for p in ("data", "forward", "backward", "optimizer", "comm_exposed"))


# ------------------------------------------------------------------ units


@pytest.mark.unit
def test_union_and_overlap():
    assert union_seconds([(0, 1), (0.5, 2), (3, 4)]) == pytest.approx(3.0)
    assert union_seconds([(0, 1), (0.5, 2)], lo=1.5) == pytest.approx(0.5)
    # Two buckets: one during backward, one that ends 1 s after compute ended (t=3).
    stats = comm_stats({0: (1.0, 2.0, 100), 1: (3.0, 4.0, 300)}, world_size=4)
    assert stats.seconds == pytest.approx(2.0)
    assert stats.bytes == 400
    assert stats.exposed_seconds == pytest.approx(1.0)
    assert stats.overlap_ratio == pytest.approx(0.5)
    assert stats.algbw == pytest.approx(200.0)
    assert stats.busbw == pytest.approx(200.0 * 2 * 3 / 4)
    # Serialised buckets: the second waits for the first, its own time is after.
    stats = comm_stats({0: (0.0, 2.0, 1), 1: (1.0, 3.0, 1)}, world_size=2)
    assert stats.bucket_seconds == {0: pytest.approx(2.0), 1: pytest.approx(1.0)}
    # One bucket (a small model's): the last one is ready when compute ends, so all of it is exposed.
    stats = comm_stats({0: (1.0, 1.5, 200)}, world_size=2)
    assert (stats.seconds, stats.exposed_seconds, stats.overlap_ratio) == (0.5, 0.5, 0.0)
    assert stats.bucket_seconds == {0: 0.5} and stats.algbw == stats.busbw == 400.0
    assert bus_bandwidth(10.0, 1) == 0.0
    assert bus_bandwidth(10.0, 8) == pytest.approx(17.5)


@pytest.mark.unit
def test_per_step_writes_reach_prometheus_when_published():
    """add() sums and put() keeps the latest until publish() hands them to prometheus_client at once."""
    m = TelemetryMetrics()
    m.bind(CPU_IDENTITY)
    for secs in (0.25, 0.5):
        m.add(m.step_seconds, secs)
        m.add(m.phase_seconds, secs, "data")
        m.put(m.algbw, secs * 4)
    assert sample(m, "gradyard_step_seconds_total") is None  # not yet published
    m.publish()
    assert sample(m, "gradyard_step_seconds_total") == 0.75
    assert sample(m, "gradyard_step_phase_seconds_total", phase="data") == 0.75
    assert sample(m, "gradyard_allreduce_algbw_bytes_per_second") == 2.0
    m.add(m.step_seconds, 1.0)
    m.publish_due()  # the first call is due; the interval starts from it
    assert sample(m, "gradyard_step_seconds_total") == 1.75
    m.add(m.step_seconds, 1.0)
    m.publish()
    assert sample(m, "gradyard_step_seconds_total") == 2.75


@pytest.mark.unit
def test_peak_flops_table_and_profile(monkeypatch):
    assert peak_flops("cpu", "fp32") is None
    assert peak_flops("cpu", "fp32", profile={"fp32": 1e11}) == 1e11
    assert peak_flops("cpu", "tf32", profile={"fp32": 1e11}) is None  # not measured: no peak
    assert peak_flops("cpu", torch.bfloat16, profile={"fp32": 1e11}) is None
    calibrated = SimpleNamespace(peak_flops={"float32": 2e11, "bfloat16": 4e11})  # analysis DeviceProfile
    assert peak_flops("cpu", "bf16", profile=calibrated) == 4e11
    assert peak_flops("cpu", "fp32", profile=calibrated) == 2e11
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    names = iter(["NVIDIA H100 80GB HBM3", "Tesla V100-SXM2-16GB", "Tesla V100-SXM2-16GB", "Some Future GPU"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    assert peak_flops("cuda:0", "bf16") == 989e12
    assert peak_flops("cuda:0", "tf32") == 15.7e12  # Volta has no TF32: fp32 rate
    assert peak_flops("cuda:0", "bf16") is None  # nor BF16 tensor cores
    assert peak_flops("cuda:0", "bf16") is None  # unknown GPU: no guess
    assert matmul_precision("fp32", "cpu") == "fp32" and matmul_precision("bf16", "cuda:0") == "bf16"
    for name, row in PEAK_FLOPS.items():
        assert row["fp32"] > 0 and all(v >= row["fp32"] for v in row.values()), name


def test_flop_count_matches_formula(tmp_path):
    spec = make_spec(every=3, steps=7)
    metrics = TelemetryMetrics()
    flops = FlopsMonitor(metrics, every=3)
    measured = []
    trainer = fit(spec, [flops, Watch(lambda s: measured.append(flops.measured_this_step))], tmp_path)
    assert measured == [True, False, False, True, False, False, True]
    # Linear layers: forward 2*B*in*out; backward 2x that, less the first layer's input grad.
    dims = [(m.in_features, m.out_features) for m in trainer.state.model.modules()
            if isinstance(m, torch.nn.Linear)]
    b = 16
    fwd = sum(2 * b * i * o for i, o in dims)
    bwd = 2 * fwd - 2 * b * dims[0][0] * dims[0][1]
    assert flops.step_flops == fwd + bwd
    assert sample(metrics, "gradyard_step_flops") == fwd + bwd


def test_single_worker_cpu(tmp_path):
    spec = make_spec(every=4)
    callbacks = build_telemetry_callbacks(spec, sd_directory=tmp_path / "sd", host="127.0.0.1")
    m = find_metrics(callbacks)
    scraped = {}  # what a scrape sees at the end of training (scrape-time readings leave at close)
    released = SimpleNamespace(wait=lambda timeout: None)
    end = AtTheEnd(lambda s: scraped.update(
        rss=sample(m, "gradyard_process_resident_memory_bytes"),
        names=[mf.name for mf in m.registry.collect()],
        labels=[s.labels for mf in m.registry.collect() for s in mf.samples]), released)
    trainer = fit(spec, [*callbacks, SlowData(0.005), end], tmp_path)
    assert sample(m, "gradyard_steps_total") == 10
    assert sample(m, "gradyard_samples_total") == 160
    assert sample(m, "gradyard_timed_steps_total") == 7  # steps 0, 4, 8 counted FLOPs
    step_s = sample(m, "gradyard_step_seconds_total")
    assert step_s > 0 and abs(phase_sum(m) - step_s) <= 0.1 * step_s
    assert sample(m, "gradyard_step_phase_seconds_total", phase="data") >= 7 * 0.005
    assert sample(m, "gradyard_step_phase_seconds_total", phase="comm_exposed") == 0.0
    assert sample(m, "gradyard_allreduce_bytes_total") is None  # one worker: no sync
    assert sample(m, "gradyard_step_flops") > 0
    assert sample(m, "gradyard_achieved_flops_per_second") > 0
    assert sample(m, "gradyard_mfu_ratio") is None  # CPU, no calibration: absent
    assert sample(m, "gradyard_peak_flops_per_second") is None
    assert math.isfinite(sample(m, "gradyard_loss"))
    saved = trainer.checkpointer.stats.saved_total
    assert saved == 4  # steps 3, 6, 9 and the final 10
    assert sample(m, "gradyard_checkpoints_total") == saved
    assert sample(m, "gradyard_checkpoint_blocked_seconds_count") == saved
    assert sample(m, "gradyard_checkpoint_last_blocked_seconds") > 0
    assert scraped["rss"] > 10e6
    assert not any(n.startswith("gradyard_gpu_") for n in scraped["names"])  # absent, not zero
    # Every series of the run, scrape-time readings included, carries exactly the identity (plus its own labels).
    assert m.identity == {"ray_train_run_name": "telemetry-test", "gradyard_run": "run1",
                          "ray_train_worker_world_rank": "0", "Hostname": host_name(), "gpu": "", "UUID": ""}
    own = {"phase", "bucket", "component", "regime", "key", "torch_device", "le"}
    assert scraped["labels"]
    for labels in scraped["labels"]:
        assert {k: labels.get(k) for k in IDENTITY_LABELS} == m.identity and set(labels) - m.identity.keys() <= own
    assert sample(m, "gradyard_worker_info", torch_device="cpu") == 1


def test_mfu_with_calibrated_profile(tmp_path):
    spec = make_spec(every=100, steps=4)
    callbacks = build_telemetry_callbacks(spec, peak_profile={"fp32": 1e12}, sd_directory=tmp_path / "sd",
                                          host="127.0.0.1")
    fit(spec, callbacks, tmp_path)
    m = find_metrics(callbacks)
    achieved = sample(m, "gradyard_achieved_flops_per_second")
    assert sample(m, "gradyard_mfu_ratio") == pytest.approx(achieved / 1e12)
    assert sample(m, "gradyard_peak_flops_per_second") == 1e12


@pytest.mark.unit
def test_regime_is_a_stateset_and_its_evidence_one_metric_per_unit():
    """Finding: gradyard_regime_info kept a state as a gauge whose label changed (each verdict removed a series
    and made another), and gradyard_regime_evidence{key} mixed seconds, bytes/s, FLOP/s and ratios in one name."""
    m = TelemetryMetrics()
    m.bind(CPU_IDENTITY)
    m.set_regime("input", {"ratio": {"data_wait_share": 0.4}, "seconds": {"step_s": 0.2}})
    m.set_regime("compute", {"ratio": {"mfu": 0.5}, "seconds": {"step_s": 0.1},
                             "flops_per_second": {"achieved_flops_per_s": 2e12}})
    states = {s: sample(m, "gradyard_regime", gradyard_regime=s) for s in REGIMES}
    assert states == {s: float(s == "compute") for s in REGIMES}  # a StateSet: every state, one of them 1
    assert m.current_regime == "compute"
    assert sample(m, "gradyard_regime_evidence_ratio", key="mfu") == 0.5
    assert sample(m, "gradyard_regime_evidence_ratio", key="data_wait_share") is None  # the old verdict's
    assert sample(m, "gradyard_regime_evidence_seconds", key="step_s") == 0.1
    assert sample(m, "gradyard_regime_evidence_flops_per_second", key="achieved_flops_per_s") == 2e12
    with pytest.raises(ValueError, match="regime 'data_bound'"):
        m.set_regime("data_bound")
    with pytest.raises(ValueError, match="units"):
        m.set_regime("compute", {"furlongs": {"step_s": 1.0}})


@pytest.mark.unit
def test_a_verdict_exports_every_number_under_its_unit():
    """The live analysis' path: a real verdict's numbers, each in the metric of its unit, text left out."""
    from gradyard.analysis.verdict import NUMBER_UNITS, Evidence, classify

    verdict = classify(Evidence(step_s=1.0, data_s=0.6, flops=1e9, model_flops=1e9, bytes=1e8, n_ops=100,
                                roofline_s=0.3, compute_side_s=0.3, memory_side_s=0.1, peak_flops_per_s=1e12,
                                bandwidth_bytes_per_s=1e11, dispatch_overhead_s=1e-6))
    m = TelemetryMetrics()
    m.bind(CPU_IDENTITY)
    m.set_regime(verdict.regime, verdict.evidence_by_unit())
    assert sample(m, "gradyard_regime", gradyard_regime="input") == 1
    exported = {}
    for family in m.registry.collect():
        if family.name.startswith("gradyard_regime_evidence_"):
            for s in family.samples:
                exported[s.labels["key"]] = (family.name.removeprefix("gradyard_regime_evidence_"), s.value)
    numbers = {k: v for k, v in verdict.numbers.items() if NUMBER_UNITS[k] and v is not None}
    assert exported == {k: (NUMBER_UNITS[k], float(v)) for k, v in numbers.items()}
    assert {"step_s", "mfu", "data_wait_share", "achieved_flops_per_s", "bandwidth_bytes_per_s"} <= set(exported)


@pytest.mark.unit
def test_metric_names_say_their_type_and_unit():
    """Counters end in _total and nothing else does; every name ends in its base unit (or is a
    unitless count, info or state)."""
    from prometheus_client.metrics import MetricWrapperBase

    units = ("_seconds", "_bytes", "_bytes_per_second", "_flops", "_flops_per_second", "_flops_per_byte",
             "_ratio", "_ops", "_watts", "_hertz")
    unitless = {"gradyard_steps", "gradyard_samples", "gradyard_timed_steps", "gradyard_checkpoints",
                "gradyard_checkpoint_failures", "gradyard_restarts", "gradyard_world_size", "gradyard_loss",
                "gradyard_observer_errors", "gradyard_worker_info", "gradyard_regime"}
    m = TelemetryMetrics()
    metrics = [v for v in vars(m).values() if isinstance(v, MetricWrapperBase)]
    metrics += [g for v in vars(m).values() if isinstance(v, dict) for g in v.values()
                if isinstance(g, MetricWrapperBase)]
    names = set()
    for metric in metrics:
        (family,) = metric.describe()
        name = family.name
        names.add(name)
        exposed = name + "_total" if family.type == "counter" else name
        assert (family.type == "counter") == exposed.endswith("_total"), (name, family.type)
        assert name.endswith(units) or name in unitless, name
    assert {f"gradyard_regime_evidence_{u}" for u in EVIDENCE_UNITS} <= names
    assert "gradyard_restarts" in names  # a gauge: the count so far, set at start, not counted up


@pytest.mark.unit
def test_exporter_refuses_a_discovery_directory_others_can_write(tmp_path):
    """Another local user must not be able to add, replace or remove Prometheus targets."""
    from gradyard.telemetry.discovery import DiscoveryDirError, private_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(DiscoveryDirError, match="writable by other users"):
        private_dir(shared / "sd")
    assert oct(private_dir(tmp_path / "mine" / "sd").stat().st_mode & 0o777) == "0o755"
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(DiscoveryDirError, match="symbolic link"):
        private_dir(tmp_path / "link" / "sd")


@pytest.mark.unit
def test_the_head_registry_keeps_a_run_while_it_beats_and_drops_it_a_ttl_after_the_last_beat(tmp_path):
    """The head's record of live runs: each put writes (or keeps) the run's file_sd file and moves its
    deadline; a run that stops beating (SIGKILLed, its node lost) loses its file, the others keep theirs."""
    from gradyard.telemetry.discovery import MARK, HeadRegistry

    def written(name):  # the file's groups, less the registry's own mark
        return [{**g, "labels": {k: v for k, v in g["labels"].items() if k != MARK}}
                for g in json.loads((tmp_path / name).read_text())]

    now = [100.0]
    reg = HeadRegistry(tmp_path, clock=lambda: now[0])
    a = [{"targets": ["127.0.0.3:9000"], "labels": {"gradyard_run": "a"}}]
    b = [{"targets": ["127.0.0.2:9001"], "labels": {"gradyard_run": "b"}}]
    assert reg.put("job-a", a, ttl_s=60) == str(tmp_path / "job-a.json")
    reg.put("job-b", b, ttl_s=60)
    now[0] = 150.0
    reg.put("job-a", a, ttl_s=60)  # a's heartbeat; b is silent
    assert reg.expire() == [] and written("job-b.json") == b
    now[0] = 160.0
    assert reg.expire() == ["job-b"] and reg.keys() == ["job-a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job-a.json"]
    assert written("job-a.json") == a
    reg.remove("job-a")  # the run's own withdrawal at its end
    assert list(tmp_path.iterdir()) == [] and reg.keys() == []
    with pytest.raises(ValueError, match="letters, digits"):
        reg.put("../../etc/x", a)


@pytest.mark.unit
def test_the_head_registry_refuses_forged_groups_and_a_restarted_one_lets_dead_runs_lapse(tmp_path):
    """Anyone with the cluster's token can call the registry: it takes host:port targets and identity
    labels only.  A restarted registry adopts its own files (not a torchrun run's), so a run that died
    while it was down still loses its file a TTL later, and a live one keeps it by beating."""
    from gradyard.telemetry.discovery import HeadRegistry, write_file_sd

    now = [0.0]
    reg = HeadRegistry(tmp_path, clock=lambda: now[0])
    good = [{"targets": ["127.0.0.3:9000"], "labels": {"gradyard_run": "a"}}]
    for bad, says in [([{"targets": ["127.0.0.3:9000"], "labels": {"__metrics_path__": "/x"}}], "labels may be only"),
                      ([{"targets": ["127.0.0.3:9000"], "labels": {"__param_target": "evil"}}], "labels may be only"),
                      ([{"targets": ["http://evil/metrics"], "labels": {}}], "host:port"),
                      ([{"targets": ["127.0.0.3:9000"], "labels": {}, "extra": 1}], "exactly"), ([], "non-empty")]:
        with pytest.raises(ValueError, match=says):
            reg.put("job-x", bad)
    assert list(tmp_path.iterdir()) == []
    reg.put("dead", good)
    reg.put("alive", good)
    write_file_sd(tmp_path / "torchrun-run.json", good)  # a torchrun run's file beside them: not the registry's
    now[0] = 1000.0
    again = HeadRegistry(tmp_path, clock=lambda: now[0])  # the actor restarted: it forgot its runs
    assert sorted(again.adopt(ttl_s=60)) == ["alive", "dead"]
    now[0] = 1030.0
    again.put("alive", good)  # the live run's next beat
    now[0] = 1061.0
    assert again.expire() == ["dead"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alive.json", "torchrun-run.json"]


@pytest.mark.unit
@pytest.mark.parametrize("identity", [CPU_IDENTITY, GPU_IDENTITY], ids=["cpu", "gpu"])
def test_exporter_serves_and_cleans_up(tmp_path, identity):
    """The target's labels are the series' identity labels (less the empty ones), never job or instance."""
    from prometheus_client.parser import text_string_to_metric_families

    m = TelemetryMetrics()
    m.bind(identity)
    m.child(m.steps).inc(3)
    exporter = PrometheusExporter(m, host="127.0.0.1", sd_directory=tmp_path)
    _, port = exporter.start()
    groups = exporter.register(rank=0)
    try:
        labels = {k: v for k, v in identity.items() if v}
        assert port > 0 and groups == [{"targets": [f"127.0.0.1:{port}"], "labels": labels}]
        assert ("gpu" in labels) == (identity is GPU_IDENTITY)
        assert json.loads((tmp_path / "exp-r9.json").read_text()) == groups
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        samples = [s for f in text_string_to_metric_families(body) for s in f.samples]
        assert [(s.labels, s.value) for s in samples if s.name == "gradyard_steps_total"] == [(identity, 3.0)]
        assert not {"job", "instance"} & {k for s in samples for k in s.labels}
    finally:
        thread = exporter._thread
        exporter.close()
    assert not (tmp_path / "exp-r9.json").exists()
    assert not thread.is_alive()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.unit
def test_exporter_serves_on_the_port_its_pod_declares(monkeypatch):
    """On KubeRay the pod declares its metrics ports (GRADYARD_METRICS_PORTS) and a PodMonitor scrapes only
    those: local rank r serves on FIRST + r, telemetry.port notwithstanding; a taken port is an error
    naming the port, never a free port nobody scrapes."""
    from gradyard.telemetry.exporter import MetricsPortError, metrics_port

    base = free_port()
    monkeypatch.setenv("GRADYARD_METRICS_PORTS", f"{base}-{base + 1}")
    assert metrics_port(1, configured=7000) == (base + 1, range(base, base + 2))
    m = TelemetryMetrics()
    m.bind(CPU_IDENTITY)
    exporter = PrometheusExporter(m, port=7000, host="127.0.0.1")
    second = PrometheusExporter(TelemetryMetrics(), host="127.0.0.1")
    try:
        assert exporter.start(local_rank=0) == ("127.0.0.1", base)
        body = urllib.request.urlopen(f"http://127.0.0.1:{base}/metrics", timeout=5).read().decode()
        assert "gradyard_worker_info" in body
        # A second worker of local rank 0 in the same pod (another job's): the declared port is taken.
        with pytest.raises(MetricsPortError, match=rf"metrics port {base} of local rank 0 .* will not be scraped"):
            second.start(local_rank=0)
        assert second.port is None and second._server is None  # no fallback server on an undeclared port
    finally:
        exporter.close()
        second.close()
    for bad in ("9500-9400", "metrics", "0", "9500-70000"):
        monkeypatch.setenv("GRADYARD_METRICS_PORTS", bad)
        with pytest.raises(MetricsPortError, match=r"GRADYARD_METRICS_PORTS=.* allowed: FIRST-LAST or FIRST"):
            metrics_port(0)
    monkeypatch.delenv("GRADYARD_METRICS_PORTS")
    # VMs and torchrun: telemetry.port + local rank, or a free port (0); nothing declared.
    assert metrics_port(2, configured=9000) == (9002, None) and metrics_port(2) == (0, None)


@pytest.mark.unit
def test_nvml_absent_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert NvmlReader.open(torch.device("cpu")) is None


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        if CI:
            pytest.fail("promtool not found (install Debian's prometheus package)")
        pytest.skip("promtool not found")
    return tool


@pytest.mark.unit
def test_promtool_checks_config_and_rules():
    """Syntax, and the rules' unit tests: MFU per worker and per run, the DCGM joins on (Hostname, gpu), and
    every alert firing and quiet.  The shipped config loads every rules file there is."""
    config = yaml.safe_load(PROM_CONFIG.read_text())
    assert sorted(PROM_CONFIG.parent / f for f in config["rule_files"]) == RULE_FILES
    assert {RULES, ALERTS} <= set(RULE_FILES) and len(RULE_TESTS) >= 2
    tool = _promtool()
    for args in (["check", "config", str(PROM_CONFIG)], ["check", "rules", *map(str, RULE_FILES)],
                 ["test", "rules", *map(str, RULE_TESTS)]):
        out = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr


def alert_rules() -> list[dict]:
    return [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
            if "alert" in r]


@pytest.mark.unit
def test_every_alert_has_a_promtool_test_that_fires_and_one_that_stays_quiet():
    alerts = {r["alert"] for r in alert_rules()}
    assert alerts == {"GradyardTrainingStalled", "GradyardCheckpointFailing", "GradyardTargetDown",
                      "GradyardMFUCollapsed", "GradyardDataWaitHigh"}
    fires, quiet = set(), set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        loaded = {(path.parent / f).resolve() for f in doc["rule_files"]}
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                assert case["alertname"] in alerts, (path.name, case["alertname"])
                assert ALERTS.resolve() in loaded, path.name
                (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert not alerts - fires, f"alerts never tested firing: {sorted(alerts - fires)}"
    assert not alerts - quiet, f"alerts never tested quiet: {sorted(alerts - quiet)}"


@pytest.mark.unit
def test_alerts_say_how_long_how_bad_and_which_worker():
    for r in alert_rules():
        name = r["alert"]
        assert re.fullmatch(r"\d+m", r["for"]), name
        assert r["labels"] == {"severity": r["labels"]["severity"]} and r["labels"]["severity"] in (
            "critical", "warning"), name
        assert set(r["annotations"]) == {"summary", "description"}, name
        text = r["annotations"]["summary"] + r["annotations"]["description"]
        for label in ("ray_train_run_name", "gradyard_run", "ray_train_worker_world_rank", "Hostname"):
            assert f"$labels.{label}" in text, (name, label)
        used = set(re.findall(r"\$labels\.(\w+)", text))
        assert used <= set(IDENTITY_LABELS) | {"instance"}, (name, used)
        # Joins and groupings on a worker's identity or its target (job, instance), nothing else.
        grouped = {n.strip() for g in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", r["expr"])
                   for n in g.split(",") if n.strip()}
        assert grouped <= set(IDENTITY_LABELS) | {"job", "instance"}, (name, grouped)


def dashboard_panels(dash: dict) -> list[dict]:
    panels = []
    for p in dash["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))
    return [p for p in panels if p.get("targets")]


@pytest.mark.unit
def test_dashboard_shape():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] == "GPU efficiency"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    over = {name: re.fullmatch(r"label_values\((.+), (\w+)\)", v["definition"]).group(2)
            for name, v in variables.items() if name != "datasource"}
    assert over == {"run_name": "ray_train_run_name", "host": "Hostname", "rank": "ray_train_worker_world_rank"}
    titles = {p["title"] for p in dashboard_panels(dash)}
    for needed in ("GPU utilization (NVML)", "MFU (model FLOPs utilization)",
                   "Step-time breakdown (seconds per step)", "Communication share of step time",
                   "Allreduce bus bandwidth", "Checkpoint stalls", "Process resident memory",
                   "Throughput (samples/s)", "MFU beside SM activity (DCGM)"):
        assert needed in titles
    for p in dashboard_panels(dash):
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert 'ray_train_run_name=~"$run_name"' in t["expr"], (p["title"], t["expr"])
            assert_labels_are_current(t["expr"], allowed={"phase", "bucket"})
            assert not re.search(r"\{\{(job|instance|run|rank|node|device)\}\}", t.get("legendFormat", "")), t


@pytest.mark.unit
def test_dcgm_row_is_collapsed_and_joins_on_host_and_gpu():
    """DCGM's panels sit in a collapsed row: without DCGM exporter they would be empty boxes (their queries
    return nothing; gpu_only() below checks that on a CPU run).  They read the join rules, never raw DCGM."""
    dash = json.loads(DASHBOARD.read_text())
    (row,) = [p for p in dash["panels"] if p["type"] == "row" and "DCGM" in p["title"]]
    assert row["collapsed"] is True and row is dash["panels"][-1]
    inside = {p["title"]: [t["expr"] for t in p["targets"]] for p in row["panels"]}
    assert set(inside) == {"SM active (DCGM)", "Tensor pipe active (DCGM)", "MFU beside tensor pipe activity (DCGM)"}
    records = {r["record"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    used = set()
    for p in dashboard_panels(dash):
        for t in p["targets"]:
            assert not re.search(r"(?<!:)\bDCGM_", t["expr"]), (p["title"], "raw DCGM series, not the join")
            used |= set(re.findall(r"worker:DCGM_\w+:max", t["expr"]))
    assert used == {"worker:DCGM_FI_PROF_SM_ACTIVE:max", "worker:DCGM_FI_PROF_PIPE_TENSOR_ACTIVE:max"}
    for name in used:
        dcgm = name.split(":")[1]
        assert f"max by (Hostname, gpu) ({dcgm})" in records[name] and "on (Hostname, gpu)" in records[name]
    assert any("worker:DCGM_FI_PROF_PIPE_TENSOR_ACTIVE:max" in e for e in inside["Tensor pipe active (DCGM)"])


PROVISIONING = ROOT / "deploy/grafana/provisioning"
RAY_DASHBOARDS = "/tmp/ray/session_latest/metrics/grafana/dashboards"
"""Where Ray's dashboard writes its Grafana dashboards: <temp dir>/session_latest/metrics/grafana/dashboards
(ray.dashboard.modules.metrics.metrics_head; tests/test_telemetry_ray.py checks a real head writes them)."""


@pytest.mark.unit
def test_grafana_provisioning_parses_and_points_where_the_dashboards_are():
    files = sorted(PROVISIONING.rglob("*"))
    files = [f for f in files if f.is_file()]
    assert {f.relative_to(PROVISIONING).as_posix() for f in files} == {
        "dashboards/gradyard.yaml", "dashboards/ray.yaml", "datasources/prometheus.yaml"}
    docs = (ROOT / "docs/telemetry.md").read_text()
    for f in files:
        assert yaml.safe_load(f.read_text())["apiVersion"] == 1, f
        assert f"deploy/grafana/provisioning/{f.relative_to(PROVISIONING).as_posix()}" in docs, f

    providers = {p["name"]: (f, p) for f in sorted(PROVISIONING.glob("dashboards/*.yaml"))
                 for p in yaml.safe_load(f.read_text())["providers"]}
    assert set(providers) == {"gradyard", "ray"}
    assert len({p["folder"] for _, p in providers.values()}) == 2  # each in a folder of its own
    for name, (f, p) in providers.items():
        assert p["type"] == "file" and p["options"]["path"].startswith("/"), name
        assert p["options"]["path"] in docs, name
    # gradyard's: the mount its header shows puts deploy/grafana/dashboards at the path it reads.
    f, p = providers["gradyard"]
    assert f"$PWD/deploy/grafana/dashboards:{p['options']['path']}" in f.read_text()
    assert [json.loads(d.read_text())["uid"] for d in sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))]
    # Ray's: the head's latest session, where Ray writes them.
    assert providers["ray"][1]["options"]["path"] == RAY_DASHBOARDS
    assert providers["ray"][1]["folder"] == "Ray"

    # The datasource every gradyard dashboard defaults to, and the default Ray's pick.
    (source,) = yaml.safe_load((PROVISIONING / "datasources/prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]


OLD_LABELS = ("job", "instance", "run", "rank", "node", "device")


def assert_labels_are_current(expr: str, allowed=frozenset()) -> None:
    """PromQL that selects or groups by identity labels uses IDENTITY_LABELS, never the old names or
    Prometheus' job/instance."""
    matchers = re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", expr)
    grouped = [n.strip() for g in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
               for n in g.split(",") if n.strip()]
    for name in matchers + grouped:
        assert name not in OLD_LABELS, (name, expr)
        assert name in IDENTITY_LABELS or name in allowed, (name, expr)
    assert not re.search(r"\bjob(_rank)?:gradyard", expr), expr


@pytest.mark.unit
def test_identity_labels_join_ray_train_and_dcgm_and_leave_job_and_instance_to_prometheus():
    """Finding: every series' own `job` overrode Prometheus' (honor_labels), so a worker or a discovery file
    could forge any label; and no label matched Ray Train's or DCGM's, so nothing joined."""
    from prometheus_client.metrics import MetricWrapperBase
    from ray.train.v2._internal.metrics.base import RUN_ID_TAG_KEY, RUN_NAME_TAG_KEY
    from ray.train.v2._internal.metrics.worker import WORKER_WORLD_RANK_TAG_KEY

    ids = set(IDENTITY_LABELS)
    assert {RUN_NAME_TAG_KEY, WORKER_WORLD_RANK_TAG_KEY} <= ids  # Ray Train v2's own label names
    assert RUN_ID_TAG_KEY not in ids and "gradyard_run" in ids  # Ray's run id is another id
    assert {"Hostname", "gpu", "UUID"} <= ids  # DCGM exporter's
    assert not ids & {"job", "instance", *OLD_LABELS}

    m = TelemetryMetrics()
    metrics = [v for v in vars(m).values() if isinstance(v, MetricWrapperBase)]
    metrics += [g for v in vars(m).values() if isinstance(v, dict) for g in v.values()
                if isinstance(g, MetricWrapperBase)]  # the evidence, one gauge per unit
    assert len(metrics) > 20
    for metric in metrics:
        names = metric._labelnames
        assert names[:len(IDENTITY_LABELS)] == IDENTITY_LABELS, metric
        assert not {"job", "instance"} & set(names), metric

    # The shipped Prometheus config: its own job and instance, and only identity labels from discovery.
    config = yaml.safe_load(PROM_CONFIG.read_text())
    assert not any(j.get("honor_labels") for j in config["scrape_configs"])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "gradyard"]
    relabel = job["relabel_configs"]
    (keep,) = [r for r in relabel if r.get("action") == "labelkeep"]
    assert set(keep["regex"].split("|")) == {"__.+", *IDENTITY_LABELS}
    assert relabel.index(keep) < relabel.index({"target_label": "job", "replacement": job["job_name"]})
    (drop,) = job["metric_relabel_configs"]
    assert drop["action"] == "labeldrop"
    assert set(re.fullmatch(r"exported_\((.+)\)", drop["regex"]).group(1).split("|")) == ids

    # Rules: levels worker: and run:, grouped by identity labels only.
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert {r["record"].split(":")[0] for r in rules} == {"worker", "run"}
    for r in rules:
        assert_labels_are_current(r["expr"], allowed={"phase"})
        if r["record"].startswith("run:"):
            assert "by (ray_train_run_name, gradyard_run)" in r["expr"], r
    assert any("on (Hostname, gpu)" in r["expr"] and "DCGM_FI_PROF_SM_ACTIVE" in r["expr"] for r in rules)


@pytest.mark.unit
def test_identity_labels_of_a_worker(monkeypatch):
    state = SimpleNamespace(spec=SimpleNamespace(name="exp"), run_id="r9", rank=2, device=torch.device("cpu"))
    monkeypatch.setenv("NODE_NAME", "node-a")  # what Kubernetes (and DCGM exporter's pod) name the node
    assert identity_labels(state) == {"ray_train_run_name": "exp", "gradyard_run": "r9",
                                      "ray_train_worker_world_rank": "2", "Hostname": "node-a",
                                      "gpu": "", "UUID": ""}
    monkeypatch.delenv("NODE_NAME")
    assert host_name() == socket.gethostname()
    m = TelemetryMetrics()
    with pytest.raises(ValueError, match="identity labels"):
        m.bind({**CPU_IDENTITY, "job": "exp"})
    with pytest.raises(ValueError, match="identity labels"):
        m.bind({k: v for k, v in CPU_IDENTITY.items() if k != "UUID"})


@pytest.fixture
def fake_nvml(monkeypatch):
    """pynvml with two GPUs: NVML index 3 is torch's cuda:0 (CUDA_VISIBLE_DEVICES order), and cuda:1 is a
    MIG slice of NVML's GPU 1."""
    gpus = {"h3": (3, "GPU-3333"), "h1": (1, "GPU-1111")}
    fake = SimpleNamespace(
        calls=[],
        nvmlInit=lambda: fake.calls.append("init"),
        nvmlShutdown=lambda: fake.calls.append("shutdown"),
        nvmlDeviceGetHandleByUUID=lambda uuid: {"GPU-3333": "h3", "MIG-aaaa": "mig-of-h1"}[uuid],
        nvmlDeviceIsMigDeviceHandle=lambda h: ctypes.c_uint(h.startswith("mig")),
        nvmlDeviceGetDeviceHandleFromMigDeviceHandle=lambda h: {"mig-of-h1": "h1"}[h],
        nvmlDeviceGetIndex=lambda h: gpus[h][0],
        nvmlDeviceGetUUID=lambda h: gpus[h][1],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch_uuids = {0: "3333", 1: "MIG-aaaa"}  # torch leaves out the GPU- prefix
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=torch_uuids[i]))
    from gradyard.telemetry import nvml

    nvml._nvml_identity.cache_clear()
    yield fake
    nvml._nvml_identity.cache_clear()  # never leave fake answers to a real GPU test


@pytest.mark.unit
def test_gpu_labels_are_dcgms_nvml_index_and_uuid(fake_nvml):
    assert gpu_identity(torch.device("cuda", 0)) == ("3", "GPU-3333")
    assert gpu_identity(torch.device("cuda", 1)) == ("1", "GPU-1111")  # a MIG slice: its GPU, as DCGM has it
    assert gpu_identity(torch.device("cuda", 0)) == ("3", "GPU-3333")
    assert fake_nvml.calls == ["init", "shutdown"] * 2  # once per device; NVML released each time
    assert gpu_identity(torch.device("cpu")) == ("", "")


@pytest.mark.unit
def test_gpu_labels_are_empty_where_nvml_cannot_tell(fake_nvml):
    def no_driver():
        raise OSError("NVML Shared Library Not Found")

    fake_nvml.nvmlInit = no_driver
    assert gpu_identity(torch.device("cuda", 0)) == ("", "")


# ------------------------------------------------------- integration (2 gloo workers + Prometheus)

PEAK_PROFILE = {"fp32": 5e10}  # a "calibration" so MFU exists on CPU


STEPS = 400


def _worker(rank: int, world_size: int, rdzv: str, sd_dir: str, run_dir: str, trained, release, results) -> None:
    """One DDP worker of the real Trainer: STEPS steps with slow data, then held at FIT_END until released."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=world_size)
    spec = make_spec(name="telemetry-it", every=5, steps=STEPS, world=world_size, checkpoint_every=100)
    callbacks = build_telemetry_callbacks(spec, peak_profile=PEAK_PROFILE, sd_directory=Path(sd_dir),
                                          host="127.0.0.1")
    metrics = find_metrics(callbacks)

    def regime(s):
        if s.step == 3:
            metrics.set_regime("input", {"ratio": {"data_wait_share": 0.5}})

    def report(s):
        results.put({"rank": rank, "steps": s.step, "grad_bytes": gradient_bytes(s.model),
                     "targets": callbacks[0].targets})
        trained[rank].set()

    try:
        fit(spec, [*callbacks, SlowData(0.01), Watch(regime), AtTheEnd(report, release)], Path(run_dir),
            rank=rank, world=world_size, node=f"node-{rank}")
    finally:
        dist.destroy_process_group()


def _sync_worker(rank: int, world: int, precisions: tuple, rdzv: str, root: str, results) -> None:
    """Every rank trains the same tiny job with the telemetry's comm hook and with DDP's default hook."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=world)
    try:
        out = {}
        for precision in precisions:
            for arm in ("on", "off"):
                spec = make_spec(name=f"sync-{precision}-{arm}", steps=6, precision=precision, world=world,
                                 checkpoint_every=100)
                callbacks = [GradSyncMonitor(TelemetryMetrics())] if arm == "on" else []
                trainer = fit(spec, callbacks, Path(root) / f"{precision}-{arm}-{rank}", rank=rank, world=world)
                s = trainer.state
                out[precision, arm] = {k: v.numpy().copy() for k, v in s.model.state_dict().items()}
                if arm == "on":
                    out["loss_divisor", precision] = getattr(s, "loss_divisor", None)
                if world == 2 and precision == "fp32" and arm == "on":
                    # The hook itself sums: a backward that is not seeded with 1/world_size gets the sum.
                    x = torch.full((4, *s.info.input_shape), float(rank + 1))
                    s.ddp_model(x).sum().backward()
                    out["hook_grad"] = [p.grad.numpy().copy() for p in s.model.parameters()]
                    s.model.zero_grad(set_to_none=True)
                    s.model(x).sum().backward()
                    out["local_grad"] = [p.grad.numpy().copy() for p in s.model.parameters()]
        results.put((rank, out))  # numpy: torch tensors would travel as shared memory this process frees
    finally:
        dist.destroy_process_group()


def _sync_run(tmp_path: Path, world: int, precisions: tuple) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_sync_worker, args=(r, world, precisions, f"file://{tmp_path / f'rdzv{world}'}",
                                                     str(tmp_path / f"w{world}"), results)) for r in range(world)]
    for p in procs:
        p.start()
    got: dict = {}
    try:
        deadline = time.monotonic() + 240
        while len(got) < world and time.monotonic() < deadline:
            assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]
            try:
                rank, out = results.get(timeout=2)
                got[rank] = out
            except queue.Empty:
                pass
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * world and len(got) == world
    return got


def test_comm_hook_sums_and_training_is_bitwise_ddps_default(tmp_path):
    """With the telemetry's comm hook gloo ranks train to the same bits as with DDP's default averaging:
    2 ranks in fp32 (the hook only sums; the backward is seeded with 1/2) and in fp16 with the
    GradScaler, 3 ranks in fp32 (the hook scales the bucket by 1/3, as DDP does)."""
    two, three = _sync_run(tmp_path, 2, ("fp32", "fp16")), _sync_run(tmp_path, 3, ("fp32",))
    for got, precisions in ((two, ("fp32", "fp16")), (three, ("fp32",))):
        for rank, out in got.items():
            for precision in precisions:
                on, off = out[precision, "on"], out[precision, "off"]
                for k in off:
                    assert on[k].tobytes() == off[k].tobytes(), (len(got), rank, precision, k)
    assert [two[r]["loss_divisor", "fp32"] for r in (0, 1)] == [2, 2]  # seeded: no pass over the bucket
    assert two[0]["loss_divisor", "fp16"] == three[0]["loss_divisor", "fp32"] == 1
    # Inputs of all 1s on rank 0 and all 2s on rank 1: the synced gradient is the sum of both ranks'.
    for rank in (0, 1):
        for synced, mine, theirs in zip(two[rank]["hook_grad"], two[rank]["local_grad"], two[1 - rank]["local_grad"]):
            assert np.allclose(synced, mine + theirs, rtol=1e-5, atol=1e-6)


def prometheus_binary() -> str:
    binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if binary is None:
        if CI:
            pytest.fail("prometheus not found (install Debian's prometheus package)")
        pytest.skip("prometheus not found")
    return binary


def shipped_prometheus_config(paths: dict[str, str]) -> str:
    """deploy/prometheus/prometheus.yml as shipped, its paths substituted (``{"/tmp/ray": ...}``) and
    nothing else: rule files by absolute path, and a 1 s scrape and evaluation interval."""
    text = PROM_CONFIG.read_text()
    for shipped, here in {**paths, "- rules/": f"- {PROM_CONFIG.parent}/rules/"}.items():
        assert shipped in text, f"{shipped} is not in the shipped config"
        text = text.replace(shipped, here)
    return re.sub(r"(scrape|evaluation)_interval: 5s", r"\1_interval: 1s", text)


class Prometheus:
    """The real server on loopback, with the deploy config pointed at a temp file_sd dir (or ``config``,
    a whole configuration, e.g. :func:`shipped_prometheus_config`)."""

    def __init__(self, binary: str, workdir: Path, sd_dir: Optional[Path] = None, config: Optional[str] = None):
        if config is None:
            cfg = yaml.safe_load(PROM_CONFIG.read_text())
            cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
            cfg["rule_files"] = [str(PROM_CONFIG.parent / f) for f in cfg["rule_files"]]  # alerts too
            (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "gradyard"]
            job["file_sd_configs"] = [{"files": [str(sd_dir / "*.json")], "refresh_interval": "1s"}]
            cfg["scrape_configs"] = [job]
            config = yaml.safe_dump(cfg)
        (workdir / "prometheus.yml").write_text(config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str, **params) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited; see its log"
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("prometheus not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def panel_queries() -> list[tuple[str, str]]:
    subst = {"$__rate_interval": "30s", "$run_name": ".*", "$host": ".*", "$rank": ".*"}
    out = []
    for panel in dashboard_panels(json.loads(DASHBOARD.read_text())):
        for target in panel["targets"]:
            expr = target["expr"]
            for k, v in subst.items():
                expr = expr.replace(k, v)
            assert "$" not in expr, expr
            out.append((panel["title"], expr))
    return out


def gpu_only(expr: str) -> bool:
    """Series that exist only on a GPU: gradyard's NVML readings, and DCGM's (joined to gradyard's)."""
    return "gradyard_gpu_" in expr or "DCGM_" in expr


def assert_prometheus_labels(prom: "Prometheus", targets: set[str]) -> None:
    """Every gradyard series has Prometheus' own job and instance, and no exported_* copy of the identity."""
    series = prom.get("/api/v1/series", **{"match[]": '{__name__=~"gradyard_.*"}'})
    assert series
    for s in series:
        assert s["job"] == "gradyard" and s["instance"] in targets, s
        assert set(IDENTITY_LABELS) - {"gpu", "UUID"} <= set(s), s  # gpu and UUID are absent on CPU
        assert not [k for k in s if k.startswith("exported_")], s


def wait_until(cond, deadline: float, what: str, poll: float = 0.5, procs=()):
    last = None
    while time.monotonic() < deadline:
        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        assert not dead, f"a worker failed (exit codes {dead}) while waiting for: {what}"
        try:
            last = cond()
            if last:
                return last
        except (OSError, AssertionError) as exc:  # not up yet
            last = exc
        time.sleep(poll)
    raise TimeoutError(f"{what} (last: {last!r})")


@pytest.mark.prometheus
def test_two_gloo_workers_scraped_by_prometheus():
    binary = prometheus_binary()
    deadline = time.monotonic() + 60
    workdir = Path(tempfile.mkdtemp(prefix="gradyard-prom-"))
    sd_dir = workdir / "sd"
    prom = Prometheus(binary, workdir, sd_dir)
    ctx = mp.get_context("spawn")
    release = ctx.Event()
    trained = [ctx.Event(), ctx.Event()]
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, f"file://{workdir / 'rdzv'}", str(sd_dir), str(workdir),
                                                trained, release, results)) for r in range(2)]
    try:
        for p in procs:
            p.start()
        prom.wait_ready(deadline)
        sd_files = wait_until(lambda: list(sd_dir.glob("*.json")), deadline, "file_sd written by rank 0", procs=procs)
        assert [f.name for f in sd_files] == ["telemetry-it-run1.json"]
        groups = json.loads(sd_files[0].read_text())
        assert [g["labels"] for g in sorted(groups, key=lambda g: g["labels"]["ray_train_worker_world_rank"])] == [
            {"ray_train_run_name": "telemetry-it", "gradyard_run": "run1", "ray_train_worker_world_rank": str(r),
             "Hostname": host_name()} for r in (0, 1)]  # CPU: no gpu, no UUID
        assert all(g["targets"][0].startswith("127.0.0.1:") for g in groups)

        def targets_up():
            active = prom.get("/api/v1/targets")["activeTargets"]
            return len(active) == 2 and all(t["health"] == "up" for t in active)

        wait_until(targets_up, deadline, "both workers scraped", procs=procs)

        queries = panel_queries()
        cpu_queries = [(t, e) for t, e in queries if not gpu_only(e)]

        def all_panels_have_data():
            return all(prom.query(e) for _, e in cpu_queries)

        # Training goes on while Prometheus scrapes, so rates see real progress.
        wait_until(all_panels_have_data, deadline, "every panel has data", poll=1.0, procs=procs)
        for ev in trained:
            assert ev.wait(max(1.0, deadline - time.monotonic())), "worker did not finish"
        final = {r["rank"]: r for r in (results.get(timeout=10) for _ in range(2))}
        assert final[0]["targets"] == groups

        # Let Prometheus scrape the final values of both workers.
        def final_scraped():
            got = {s["metric"]["ray_train_worker_world_rank"]: float(s["value"][1])
                   for s in prom.query("gradyard_steps_total")}
            return got == {str(r): float(final[r]["steps"]) for r in final}

        wait_until(final_scraped, deadline, "final step counts scraped", procs=procs)

        for title, expr in queries:
            result = prom.query(expr)
            if gpu_only(expr):
                assert result == [], f"{title}: GPU series on a CPU run: {expr}"
            else:
                assert result, f"{title}: no series for {expr}"
        assert prom.query('{__name__=~"gradyard_gpu_.*"}') == []
        assert_prometheus_labels(prom, {t for g in groups for t in g["targets"]})
        up = prom.query('up{job="gradyard"}')
        assert sorted(u["metric"]["ray_train_worker_world_rank"] for u in up) == ["0", "1"]  # `up` has the identity

        # Values hold together (counters from the same scrape).
        for rank in ("0", "1"):
            sel = f'{{ray_train_run_name="telemetry-it",ray_train_worker_world_rank="{rank}"}}'
            step_s = float(prom.query(f"gradyard_step_seconds_total{sel}")[0]["value"][1])
            phases = float(prom.query(f"sum(gradyard_step_phase_seconds_total{sel})")[0]["value"][1])
            assert step_s > 0 and abs(phases - step_s) <= 0.1 * step_s, (rank, phases, step_s)
            grad_bytes = final[int(rank)]["grad_bytes"]
            step_bytes = float(prom.query(f"gradyard_allreduce_step_bytes{sel}")[0]["value"][1])
            assert step_bytes == grad_bytes
            per_step = float(prom.query(
                f"gradyard_allreduce_bytes_total{sel} / gradyard_steps_total{sel}")[0]["value"][1])
            assert per_step == grad_bytes
            timed = float(prom.query(f"gradyard_timed_steps_total{sel}")[0]["value"][1])
            assert timed < final[int(rank)]["steps"]  # FLOP-counted steps left out
            mfu = float(prom.query(f"gradyard_mfu_ratio{sel}")[0]["value"][1])
            assert 0 < mfu < 1
            busbw = float(prom.query(f"gradyard_allreduce_busbw_bytes_per_second{sel}")[0]["value"][1])
            algbw = float(prom.query(f"gradyard_allreduce_algbw_bytes_per_second{sel}")[0]["value"][1])
            assert busbw == pytest.approx(algbw)  # 2(n-1)/n = 1 for n = 2
        for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", var.get("definition", ""))
            if m:
                selector = m.group(1).replace("$run_name", ".*").replace("$host", ".*")
                assert prom.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": selector}), var["name"]

        release.set()
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
            assert p.exitcode == 0
        assert not list(sd_dir.glob("*.json")), "file_sd not removed at close"
    except BaseException:
        log = workdir / "prometheus.log"
        print("prometheus log (tail):\n" + (log.read_text()[-4000:] if log.exists() else "(none)"))
        raise
    finally:
        release.set()
        for p in procs:
            if p.is_alive():
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        prom.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.prometheus
def test_prometheus_keeps_its_job_and_instance_and_the_discovery_files_identity(tmp_path):
    """A target whose series and discovery file both claim job and instance, a made-up label and another
    rank: the shipped config keeps job="gradyard", the target's address, and the file's identity only."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    binary = prometheus_binary()
    identity = dict(GPU_IDENTITY)
    registry = CollectorRegistry()
    forged = Gauge("gradyard_forged", "A series that claims Prometheus' labels.",
                   ["job", "instance", *IDENTITY_LABELS], registry=registry)
    forged.labels(job="evil", instance="elsewhere:1",
                  **{**identity, "ray_train_worker_world_rank": "7"}).set(1)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    target = f"127.0.0.1:{server.server_port}"
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    (sd_dir / "forged.json").write_text(json.dumps([{
        "targets": [target], "labels": {"job": "evil", "instance": "elsewhere:1", "team": "x", **identity}}]))
    prom = Prometheus(binary, tmp_path, sd_dir)
    try:
        deadline = time.monotonic() + 30
        prom.wait_ready(deadline)
        (got,) = wait_until(lambda: prom.query("gradyard_forged"), deadline, "the target scraped")
        assert got["metric"] == {"__name__": "gradyard_forged", "job": "gradyard", "instance": target, **identity,
                                 "exported_job": "evil", "exported_instance": "elsewhere:1"}
        (up,) = prom.query("up")
        assert up["metric"] == {"__name__": "up", "job": "gradyard", "instance": target, **identity}
    finally:
        prom.stop()
        server.shutdown()
        server.server_close()
        thread.join(5)


# ------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_nccl_hook_and_nvml(tmp_path):
    """CUDA-event phases, the NCCL comm hook on a 1-rank process group, NVML and allocator readings."""
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        spec = make_spec(every=4, steps=20)
        callbacks = build_telemetry_callbacks(spec, sd_directory=tmp_path / "sd", host="127.0.0.1")
        comm = next(cb for cb in callbacks if isinstance(cb, GradSyncMonitor))
        lags = []
        trainer = fit(spec, [*callbacks, SlowData(0.002), Watch(lambda s: lags.append(len(s.timer._pending)))],
                      tmp_path, device=device, wrap_ddp=True)
        m = find_metrics(callbacks)
        assert comm.active and max(lags) <= trainer.timer.max_lag  # resolved lazily, never piling up
        assert sample(m, "gradyard_timed_steps_total") == 15
        step_s = sample(m, "gradyard_step_seconds_total")
        assert step_s > 0 and abs(phase_sum(m) - step_s) <= 0.1 * step_s
        assert sample(m, "gradyard_allreduce_step_bytes") == gradient_bytes(trainer.state.model)
        assert sample(m, "gradyard_allreduce_seconds_total") > 0
        assert sample(m, "gradyard_gpu_memory_allocated_bytes") > 0
        assert sample(m, "gradyard_gpu_memory_peak_allocated_bytes") >= sample(
            m, "gradyard_gpu_memory_allocated_bytes")
        assert sample(m, "gradyard_gpu_memory_used_bytes") > 0  # NVML
        assert sample(m, "gradyard_gpu_sm_clock_hertz") > 1e8
        if not torch.cuda.get_device_properties(device).is_integrated and "MIG" not in torch.cuda.get_device_name():
            assert 0.0 <= sample(m, "gradyard_gpu_utilization_ratio") <= 1.0  # absent only on MIG slices
        if torch.cuda.get_device_name(device) in PEAK_FLOPS:
            assert 0 < sample(m, "gradyard_mfu_ratio") < 1
        assert math.isfinite(sample(m, "gradyard_loss"))
        # DCGM's names for this GPU: NVML's index and UUID.
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(m.identity["gpu"]))
            assert m.identity["UUID"] == pynvml.nvmlDeviceGetUUID(handle)
            assert m.identity["UUID"].startswith("GPU-")
        finally:
            pynvml.nvmlShutdown()
    finally:
        dist.destroy_process_group()


def test_trainer_calls_a_callback_only_for_the_events_it_declares(tmp_path):
    """Callback.events: the trainer's dispatch skips the rest; None still hears every event, in order."""
    from prometheus_client import CollectorRegistry

    from gradyard.events import Callback, Event
    from gradyard.job import load_job
    from gradyard.storage import open_storage
    from gradyard.telemetry import build_telemetry_callbacks
    from gradyard.trainer import DistInfo, Trainer

    class Recorder(Callback):
        def __init__(self, events=None):
            self.events, self.seen = events, []

        def on_event(self, event, state):
            self.seen.append(event)

    every, some = Recorder(), Recorder(frozenset((Event.BATCH_END, Event.FIT_END)))
    spec = load_job(Path(__file__).parent.parent / "jobs" / "circles.yaml",
                    ["schedule.epochs=null", "schedule.steps=3", "checkpoint.every_steps=1000"])
    telemetry = build_telemetry_callbacks(spec, registry=CollectorRegistry(), sd_directory=tmp_path / "sd")
    trainer = Trainer(spec, open_storage(f"file://{tmp_path / 'run'}"), DistInfo(), "r",
                      [every, *telemetry, some])
    trainer.fit()
    assert some.seen == [Event.BATCH_END] * 3 + [Event.FIT_END]
    step = [Event.BEFORE_DATA, Event.AFTER_DATA, Event.BEFORE_FORWARD, Event.AFTER_FORWARD,
            Event.BEFORE_BACKWARD, Event.AFTER_BACKWARD, Event.BEFORE_OPTIMIZER, Event.AFTER_OPTIMIZER,
            Event.BATCH_END]
    assert every.seen[:2] == [Event.FIT_START, Event.EPOCH_START] and every.seen[2:11] == step
    assert every.seen.count(Event.BATCH_END) == 3 and every.seen[-1] is Event.FIT_END
    # The telemetry callbacks' declared events still drive them: every step counted, and every
    # step timed but the first (its FLOPs were counted: the counter's overhead is not step time).
    metrics = next(cb.metrics for cb in telemetry if hasattr(cb, "metrics"))
    assert metrics.child(metrics.timed_steps)._value.get() == 2
    assert metrics.child(metrics.step_flops)._value.get() > 0
    assert metrics.child(metrics.steps)._value.get() == 3
