"""The benchmarks still run (each once at smoke size, so none rots), and the statistics decide right.

Not a measurement (`make bench` is).  The smoke run uses the session's Ray
cluster and calibration cache; it starts its own S3 server and stops only its
own processes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from bench import report, stats  # noqa: E402
from bench.profile import categorize, module_of, parse  # noqa: E402

ALL = ["throughput", "checkpoint", "recovery", "faults", "telemetry", "submit", "startup"]


@pytest.mark.parametrize("job", ["fashion-cnn", "alexnet"])
def test_plain_scripts_train_the_same_model_as_gradyard(job):
    from bench.contenders import Workload
    from bench.scripts.plain_models import WARMUP_STEPS
    from gradyard.steptime import STEADY_AFTER_STEPS

    assert Workload(job, steps=20, checkpoint_every=10).check_same_model() > 0
    assert WARMUP_STEPS == STEADY_AFTER_STEPS  # every contender times the same steps


@pytest.mark.ray
def test_every_benchmark_runs_once(tmp_path, ray_cluster):
    import os

    results, page = tmp_path / "latest.json", tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nHand-written interpretation.\n\n" + report.BEGIN + "\nSTALE-BLOCK\n" + report.END
                    + "\n\nHand-written notes after.\n")
    r = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--results", str(results), "--docs", str(page),
                        "--cluster", ray_cluster.address, ray_cluster.dashboard,
                        "--calibration", os.environ["GRADYARD_PROFILE_DIR"]],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    doc = json.loads(results.read_text())
    assert sorted(doc["benchmarks"]) == sorted(ALL)
    for name, b in doc["benchmarks"].items():
        assert b["status"] == "ok", (name, b.get("error"))
        assert b["tables"] and all(t["rows"] for t in b["tables"]), name

    raw = doc["benchmarks"]["throughput"]["raw"]["fashion-cnn"]
    assert set(raw) == {"torchrun_s3", "ray_train_s3", "gradyard_s3"}  # the smoke's S3 round
    for contender, runs in raw.items():
        assert len(runs) == 1 and runs[0]["steps_per_second"] > 0, contender
        assert len(runs[0]["checkpoint_seconds"]) >= 1, contender  # every contender checkpointed to S3
    targets = {t["name"]: t for b in doc["benchmarks"].values() for t in b.get("targets", [])}
    assert "fashion-cnn: gradyard → S3 / plain Ray Train → S3" in targets
    assert all(t["verdict"] == "not resolved" for t in targets.values())  # one round decides nothing
    arms = doc["benchmarks"]["telemetry"]["profile"]["arms"]
    assert sum(v for k, v in arms["on"].items() if k.startswith("gradyard.telemetry")) > 0
    assert not any(k.startswith("gradyard.telemetry") for k in arms["off"])  # no telemetry in that arm
    state = doc["benchmarks"]["checkpoint"]["states"][0]
    assert state["checkpoint_bytes"] > 0 and state["upload_ratio"]["estimate"] > 0
    # py-spy attached to the S3 server (a small checkpoint may leave it no busy sample to show)
    assert state["cpu_seconds"]["s3_server"]["n"] == 1 and isinstance(state["s3_server_profile"], list)
    assert doc["benchmarks"]["recovery"]["rounds"][0]["seconds_to_first_resumed_step"] > 0
    assert doc["benchmarks"]["faults"]["rounds"][0]["hang_detect_seconds"] > 0
    for name in ("submit", "startup"):
        assert all(v[0] > 0 for v in doc["benchmarks"][name]["seconds_to_first_step"].values()), name

    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written interpretation.") and text.endswith("Hand-written notes after.\n")
    assert "STALE-BLOCK" not in text and "do not quote" in text and "## 7. Start-up" in text
    assert "AKIA" not in text and "gy-bench-not-a-secret" not in text  # no S3 key on the page


@pytest.mark.unit
def test_the_interval_holds_the_true_ratio_95_times_in_100_at_the_rounds_a_bench_affords():
    """Simulated rounds of a known ratio with noise: the interval's coverage, at 3 and 4 rounds."""
    import random

    rng = random.Random(7)
    for n in (3, 4):
        held = sum(r["ci"][0] < 1.02 < r["ci"][1] for r in (
            stats.ratio([1.02 * math.exp(rng.gauss(0, 0.03)) for _ in range(n)]) for _ in range(2000)))
        assert 0.93 < held / 2000 < 0.97, (n, held / 2000)


@pytest.mark.unit
def test_a_target_is_met_missed_or_not_resolved_by_its_interval():
    met = stats.ratio([1.10, 1.07, 1.12, 1.03, 1.16], 0.97)
    assert met["verdict"] == "met" and met["ci"][0] > 0.97 and met["ci"][0] < met["estimate"] < met["ci"][1]
    missed = stats.ratio([0.45, 0.48, 0.43, 0.50, 0.41], 0.95)
    assert missed["verdict"] == "missed" and missed["ci"][1] < 0.95
    lower = stats.ratio([1.03, 1.01, 1.04, 1.02, 1.03], 1.02, better="lower")
    assert lower["verdict"] == "not resolved" and lower["ci"][0] < 1.02 < lower["ci"][1]
    # The interval narrows as 1/sqrt(rounds): more rounds of the same spread resolve it.
    assert lower["rounds_to_resolve"] > 5
    more = stats.ratio([1.03, 1.01, 1.04, 1.02, 1.03] * (lower["rounds_to_resolve"] // 5 + 2), 1.02, better="lower")
    assert more["verdict"] == "missed"
    assert stats.ratio([1.0, 1.2], 0.95) == {"n": 2, "values": [1.0, 1.2], "estimate": pytest.approx(1.0954, rel=1e-3),
                                              "target": 0.95, "better": "higher", "verdict": "not resolved",
                                              "rounds_to_resolve": None}  # two rounds give no interval
    assert stats.ratio([1.0] * 5, 1.0)["verdict"] == "not resolved"  # on the target exactly


@pytest.mark.unit
def test_the_page_keeps_its_hand_written_text_and_renders_tables_from_data():
    doc = {"generated_at": "2026-12-01T00:00:00", "command": "python -m bench", "total_seconds": 60, "size": "full",
           "machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "gpu": "none", "load_average_at_start": [1, 1, 1]},
           "versions": {"torch": "2"},
           "benchmarks": {"telemetry": {"status": "ok", "size": "full", "repeats": 4, "seconds": 1,
                                        "targets": [{"name": "on / off", **stats.ratio([1.001, 1.004, 1.002], 1.01, "lower")}],
                                        "tables": [{"title": "t", "columns": ["a", "b"],
                                                    "rows": [["step", stats.summary([0.5, 0.25, 1.0])], ["n", 1234]]}]}}}
    page = "# B\n\nmine\n\n" + report.BEGIN + "\nstale\n" + report.END + "\nafter\n"
    out = report.render(doc, page, {"telemetry": "5. Telemetry overhead"})
    assert out.startswith("# B\n\nmine\n\n" + report.BEGIN) and out.endswith(report.END + "\nafter\n")
    assert "stale" not in out and "## 5. Telemetry overhead" in out
    assert "| step | 0.5 (0.25–1) |" in out and "| n | 1,234 |" in out
    assert "| on / off ≤ 1.01 | 1× [0.999–1.01] | **met** |  |" in out
    assert report.render(doc, "", {}).startswith(report.BEGIN)  # a new page is the generated block


@pytest.mark.unit
def test_profile_samples_are_sorted_by_the_module_of_their_innermost_frame():
    import gradyard
    import torch

    gy, th = gradyard.__file__.rsplit("/", 1)[0], torch.__file__.rsplit("/", 1)[0]
    assert module_of(f"{gy}/telemetry/comm.py") == "gradyard.telemetry"
    assert module_of(f"{th}/nn/modules/conv.py") == "torch.nn"
    fit = f"Thread.run (threading.py:982);Trainer.fit ({gy}/trainer.py:360)"
    raw = "\n".join([
        f"thread (0x1): arm-on;{fit};Trainer.train_step ({gy}/trainer.py:280);Tensor.backward ({th}/_tensor.py:600) 90",
        f"thread (0x1): arm-on;{fit};Trainer.fire ({gy}/trainer.py:240);StepTimer.on_event ({gy}/telemetry/timing.py:80) 4",
        f"thread (0x2): arm-off;{fit};Trainer.train_step ({gy}/trainer.py:280);SGD.step ({th}/optim/sgd.py:10) 7",
        "thread (0x3): MainThread;main (telemetry_ab.py:170);Thread.join (threading.py:1119) 50",  # not in the loop
    ])
    arms = parse(raw, thread=r"thread \(\w+\): arm-(\w+)$")
    assert arms == {"on": {"torch._tensor": 90, "gradyard.telemetry": 4}, "off": {"torch.optim": 7}}
    assert categorize([("main", "x.py")]) is None


def test_the_gpu_script_runs_dry_on_the_cpu(tmp_path):
    """bench/gpu.sh --dry: every figure of a GPU day is produced (on CPU: NVML reported absent, not faked)."""
    import os

    out = tmp_path / "gpu.json"
    r = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--dry", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    doc = json.loads(out.read_text())
    assert doc["dry"] and [w["job"] for w in doc["workloads"]] == ["alexnet", "efficientnet-transfer"]
    for w in doc["workloads"]:
        assert all(s["n"] == 1 and s["median"] > 0 for s in w["steps_per_second"].values()), w["job"]
        assert w["gradyard_over_plain"]["verdict"] == "not resolved"  # one round decides nothing
        assert w["checkpoint_stall_over_step"]["n"] == 1  # the one checkpoint inside the timed steps
        assert w["mfu"] and 0 < w["mfu"] < 1 and w["peak_flops_used"] > 0  # scraped from the live endpoint
        assert not any(w["nvml_series"].values()) and w["nvml_series"]  # no GPU here: absent, and said so
        assert w["verdict"]["regime"]
    assert doc["peaks"]["measured_peak_flops"] and "dry run" in out.with_suffix(".md").read_text()


def test_the_gpu_scripts_cuda_tests_are_collected_without_ray(tmp_path):
    """A GPU machine has torch but no Ray: bench/gpu.sh's test step must still collect the CUDA tests."""
    import os

    fake = tmp_path / "ray"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no Ray on this machine')\n")
    r = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--collect"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "test_cuda_calibration_and_regimes" in r.stdout and "test_cuda_events_nccl_hook_and_nvml" in r.stdout
