"""The benchmarks still run: each once at smoke size (a few steps, one round), so none rots.

Not a measurement (`make bench` is).  `python -m bench` starts its own Ray
cluster and S3 server on loopback and stops only its own processes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

ALL = ["throughput", "telemetry", "checkpoint", "recovery", "submit", "startup"]


@pytest.mark.parametrize("job", ["fashion-cnn", "alexnet"])
def test_plain_scripts_train_the_same_model_as_gradyard(job):
    sys.path.insert(0, str(ROOT))
    try:
        from bench.contenders import Workload

        assert Workload(job, steps=20, checkpoint_every=10).check_same_model() > 0
        from bench.scripts.plain_models import WARMUP_STEPS
        from gradyard.trainer import STEADY_AFTER_STEPS

        assert WARMUP_STEPS == STEADY_AFTER_STEPS  # every contender times the same steps
    finally:
        sys.path.remove(str(ROOT))


@pytest.mark.ray
def test_every_benchmark_runs_once(tmp_path):
    results, page = tmp_path / "latest.json", tmp_path / "benchmarks.md"
    r = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--allocator-split", "--results",
                        str(results), "--docs", str(page)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    doc = json.loads(results.read_text())
    assert sorted(doc["benchmarks"]) == sorted(ALL)
    for name, b in doc["benchmarks"].items():
        assert b["status"] == "ok", (name, b.get("error"))

    tp = doc["benchmarks"]["throughput"]["workloads"]["fashion-cnn"]
    for contender, s in tp["steps_per_second"].items():
        assert s["n"] == 1 and s["median"] > 0, contender
    assert {"gradyard_local/ray_train", "gradyard_s3/torchrun"} <= set(tp["ratios"])
    # --allocator-split: GRADYARD_MALLOC_TUNING=0 reached that contender's Ray workers.
    assert [x["host_allocator"]["tuned"] for x in tp["raw"]["gradyard_local_glibc_defaults"]] == [False]
    assert [x["host_allocator"]["tuned"] for x in tp["raw"]["gradyard_local"]] == [True]
    assert doc["benchmarks"]["telemetry"]["step_time_ratio_on_over_off"]["n"] == 2  # even: each arm first once
    ck = doc["benchmarks"]["checkpoint"]
    assert ck["parameters"] == 61_100_840 and ck["checkpoint_bytes"] > 4e8
    assert ck["upload"]["ratio"]["median"] > 0
    for state in (ck["cpu_seconds_per_checkpoint"], ck["small_state"]["cpu_seconds_per_checkpoint"]):
        assert state["writer_s3"]["median"] > 0 and state["s3_server"]["n"] > 0
    assert ck["s3_server_profile"]["samples"] > 0  # py-spy could attach to the S3 server
    assert doc["benchmarks"]["recovery"]["seconds_to_first_resumed_step"]["median"] > 0
    sub = doc["benchmarks"]["submit"]
    assert not sub["available"] or sub["seconds_to_first_step"]["gradyard"]["median"] > 0
    assert doc["benchmarks"]["startup"]["seconds_to_first_step"]["ray_train"]["median"] > 0

    text = page.read_text()
    assert "do not quote" in text and "## 5. Start-up on an embedded cluster" in text
    assert "AKIA" not in text and "gy-bench-not-a-secret" not in text  # no S3 key on the page


def test_profile_keeps_one_off_census_out_of_the_loop_shares():
    """The census and FLOP count of steps 1-7 precede the timed steps: not shares of the loop."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench.profile import ONE_OFF, parse_raw
    finally:
        sys.path.remove(str(ROOT))
    top = 'process 7:"ray::RayTrainWorker";MainThread;Trainer.fit (gradyard/trainer.py:360)'
    raw = "\n".join([
        f"{top};Trainer.train_step (gradyard/trainer.py:280);Tensor.backward (torch/_tensor.py:600) 10",
        f"{top};Trainer.fire (gradyard/trainer.py:240);CensusCallback.on_event (gradyard/analysis/callback.py:100) 5",
        f"{top};Trainer.fire (gradyard/trainer.py:240);FlopsMonitor.on_event (gradyard/telemetry/flops.py:131) 1",
        f"{top};Trainer.fire (gradyard/trainer.py:240);GradSyncMonitor.on_event (gradyard/telemetry/comm.py:150) 2",
        'process 7:"ray::RayTrainWorker";writer;CheckpointWriter._run (gradyard/checkpoint.py:277) 3',
    ])
    got = parse_raw(raw)
    cats = {k: v["samples"] for k, v in got["categories"].items()}
    assert got["samples"] == 21 and got["loop_samples"] == 12
    assert cats[ONE_OFF] == 6 and cats["background: checkpoint writer thread"] == 3
    assert cats["compute: backward + DDP allreduce"] == 10
    assert cats["gradyard: gradyard.telemetry.comm (GradSyncMonitor)"] == 2
